"""The adapter interface: the only place that knows how an HF model's parameters map onto a schema."""

from __future__ import annotations

import copy
from typing import Callable

import torch

from growlib.schema import IN, OUT, Axis, Schema, SlotSpec, bind_specs


def out_(role: str) -> Axis:
    return Axis(role, OUT)


def in_(role: str) -> Axis:
    return Axis(role, IN)


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t()


class Adapter:
    """Maps one HF model family onto the schema and builds its configs at other sizes.

    Subclasses set ``family`` and ``model_classes`` and implement ``dims``, ``specs`` and ``config_at``."""

    family: str = ""
    model_classes: tuple[type, ...] = ()

    def supports(self, model: torch.nn.Module) -> bool:
        return type(model) in self.model_classes

    # -- to implement ---------------------------------------------------------------------------------
    def dims(self, config) -> dict[str, int]:
        raise NotImplementedError

    def specs(self, model_class: type, config, tied: bool) -> list[SlotSpec]:
        """The model's tensors as schema slots; ``tied`` says the LM head shares the token embedding."""
        raise NotImplementedError

    def config_at(self, config, dims: dict[str, int]):
        """A copy of ``config`` whose model has the given role sizes (``model``, ``ffn``, ``heads``,
        ``kv_heads``, ``head_dim``, ``layers``)."""
        raise NotImplementedError

    def build_options(self, model: torch.nn.Module) -> dict:
        """Constructor arguments beyond the config that decide which parameters ``model`` has (e.g. BERT's
        ``add_pooling_layer``), so a model of another size is built with the same ones; passed to ``specs``."""
        return {}

    # -- shared ----------------------------------------------------------------------------------------
    def schema(self, model: torch.nn.Module, named_tensors: dict[str, torch.Tensor] | None = None) -> Schema:
        """The schema of ``model``: canonical views of its parameters, or of ``named_tensors`` (same names
        and shapes, e.g. optimizer state).  Every parameter must be covered by a spec."""
        params = dict(model.named_parameters(remove_duplicate=False))
        tied = self.tied(model)
        specs = self.specs(type(model), model.config, tied, **self.build_options(model))
        covered = {id(params[s.source]) for s in specs}
        missing = sorted(n for n, p in params.items() if id(p) not in covered)
        if missing:
            raise ValueError(f"the {self.family} adapter does not cover parameters {missing} of "
                             f"{type(model).__name__}; growlib refuses to drop them silently")
        if named_tensors is None:
            named_tensors = {n: p.detach() for n, p in params.items()}
        return bind_specs(self.family, self.dims(model.config), specs, named_tensors, tied)

    @staticmethod
    def tied(model: torch.nn.Module) -> bool:
        """Whether the model's output head is the very tensor of its token embedding."""
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        return head is not None and head.weight is emb.weight

    def new_model(self, like: torch.nn.Module, dims: dict[str, int]) -> torch.nn.Module:
        """A model of ``like``'s class, device and dtype at the given sizes, built the ordinary way (so HF
        ties its weights and fills its buffers); the caller overwrites every parameter."""
        config = self.config_at(like.config, dims)
        reference = next(like.parameters())
        with torch.device(reference.device):
            model = type(like)(config, **self.build_options(like))
        model.to(dtype=reference.dtype)
        model.train(like.training)
        if getattr(like, "loss_type", None):  # e.g. GPT-2's, which transformers cannot infer from its class name
            model.loss_type = like.loss_type
        got = self.dims(model.config)
        for role, size in dims.items():
            if got.get(role) != size:
                raise ValueError(f"cannot build a {self.family} model with {role}={size}: its config gives "
                                 f"{role}={got.get(role)}")
        return model

    @staticmethod
    def copied(config, **changes):
        config = copy.deepcopy(config)
        for key, value in changes.items():
            setattr(config, key, value)
        return config


def weight_and_bias(name: str, layer: int | None, source: str, out_role: str, in_role: str | None,
                    has_bias: bool, view: Callable = identity, bias_view: Callable = identity,
                    residual_out: bool = False) -> list[SlotSpec]:
    """Specs for a linear layer: ``name.weight`` (out_role, in_role) and optionally ``name.bias``."""
    axes = (out_(out_role),) if in_role is None else (out_(out_role), in_(in_role))
    specs = [SlotSpec(f"{name}.weight", layer, f"{source}.weight", axes, view, residual_out)]
    if has_bias:
        specs.append(SlotSpec(f"{name}.bias", layer, f"{source}.bias", (out_(out_role),), bias_view, residual_out))
    return specs


def norm(name: str, layer: int | None, source: str, has_bias: bool, side: str = OUT) -> list[SlotSpec]:
    """Specs for a LayerNorm / RMSNorm over the residual stream."""
    axes = (Axis("model", side),)
    specs = [SlotSpec(f"{name}.weight", layer, f"{source}.weight", axes, identity)]
    if has_bias:
        specs.append(SlotSpec(f"{name}.bias", layer, f"{source}.bias", axes, identity))
    return specs


def causal_lm_head(norm_source: str, norm_has_bias: bool, has_head: bool, tied: bool) -> list[SlotSpec]:
    """Specs for a decoder's final norm and, when it has an untied one, its LM head."""
    specs = norm("head.norm", None, norm_source, norm_has_bias, head_norm_side(tied and has_head))
    if has_head and not tied:
        specs.append(SlotSpec("head.out.weight", None, "lm_head.weight", (out_("vocab"), in_("model")), identity))
    return specs


def require_multi_head_attention(family: str, dims: dict[str, int]) -> None:
    """BERT, GPT-2 and ViT tie the attention width to the hidden size and have no grouped-query attention."""
    if dims["attn"] != dims["model"]:
        raise ValueError(f"{family} needs heads * head_dim == hidden size, got {dims['heads']} * "
                         f"{dims['head_dim']} != {dims['model']}")
    if dims["kv_heads"] != dims["heads"]:
        raise ValueError(f"{family} has no grouped-query attention: kv_heads must equal heads")


def head_norm_side(tied: bool) -> str:
    """The norm feeding a tied LM head takes the in-side width map: with the embedding copied unscaled, the
    head's input normalisation (e.g. de-coalescing's 1/2) is folded into that norm, which keeps logits exact."""
    return IN if tied else OUT
