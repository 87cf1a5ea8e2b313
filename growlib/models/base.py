"""The adapter interface: the only place that knows a model family.

An adapter declares everything growlib needs to know about one Hugging Face family: how its parameters map onto
the schema (``dims``, ``specs``), how to build it at another size (``config_at``) or at a training size
(``training_model``), where its norms sit (pre- or post-LN, or a parallel residual), whether it uses rotary
embeddings (and on how much of each head), what it is trained on (``task``), its config fields, its layer class
and how to pack such a layer for the frozen stack (``pack_layer``).  The HF classes are named, not imported:
transformers' modeling modules load only when a model is built, so ``import growlib`` stays cheap."""

from __future__ import annotations

import copy
import importlib
from typing import Callable

import torch

from growlib.schema import IN, OUT, Axis, Schema, SlotSpec, bind_specs
from growlib.sharded import is_sharded, unsharded_class


def out_(role: str) -> Axis:
    return Axis(role, OUT)


def in_(role: str) -> Axis:
    return Axis(role, IN)


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t()


#: What a family is trained on by ``growlib train``: next-token prediction, masked tokens, or image labels.
TASKS = ("causal_lm", "masked_lm", "image_classification")

#: Config attribute of each schema role, for messages that tell a user which field to change.
CONFIG_FIELDS = {"model": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
                 "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "layers": "num_hidden_layers",
                 "vocab": "vocab_size", "pos": "max_position_embeddings", "type": "type_vocab_size",
                 "patch": "num_channels * patch_size ** 2", "labels": "num_labels"}


class Adapter:
    """Maps one HF model family onto the schema and builds its configs at other sizes.

    Subclasses set the class attributes below and implement ``dims``, ``specs``, ``config_at``,
    ``training_model``, ``layer_attention`` and ``pack_layer``."""

    #: the family's name, which is its Hugging Face ``model_type`` (what a config.json names it by)
    family: str = ""
    #: the transformers module defining the family's classes, imported only when a class is needed
    modeling_module: str = ""
    #: the model classes the adapter maps (by name, in ``modeling_module``); the first is the one trained
    model_class_names: tuple[str, ...] = ()
    #: the class of one transformer layer (what ``freeze_forward`` runs)
    layer_class_name: str = ""
    #: True for post-LN layers (BERT: the norm follows each residual add), False for pre-LN ones
    post_ln: bool = False
    #: True when attention rotates queries and keys (RoPE): the layers need the model's rotary embedding
    rotary: bool = False
    #: one of TASKS
    task: str = "causal_lm"
    #: config attributes that differ from CONFIG_FIELDS (e.g. GPT-2's ``n_embd``)
    config_field_overrides: dict[str, str] = {}
    #: LiGO's tie groups: the schema modules whose output width maps are learned per key/value group
    kv_tie_groups: dict[str, str] = {"attn.k": "k", "attn.v": "v"}
    #: image families: the learned tokens put before the patches (ViT's class token; DeiT's class and
    #: distillation tokens), so a sequence is patches + prefix_tokens long
    prefix_tokens: int = 0

    def supports(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` is one of the family's classes (or a class made from one, as FSDP's fully_shard
        makes ``FSDPGPT2LMHeadModel``)."""
        return any(c.__module__ == self.modeling_module and c.__name__ in self.model_class_names
                   for c in type(model).__mro__)

    def is_layer(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` is one of the family's transformer layers (or a subclass of its layer class)."""
        return any(c.__module__ == self.modeling_module and c.__name__ == self.layer_class_name
                   for c in type(module).__mro__)

    def model_class(self, name: str | None = None) -> type:
        """An HF class of the family (default: the one trained), imported now."""
        return getattr(importlib.import_module(self.modeling_module), name or self.model_class_names[0])

    def config_field(self, role: str) -> str:
        """The config attribute holding a role's size, as a user would set it."""
        return self.config_field_overrides.get(role, CONFIG_FIELDS.get(role, role))

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

    def training_model(self, size: dict, vocab_size: int, seq_len: int) -> torch.nn.Module:
        """A freshly initialised model of the trained class for ``growlib train``: ``size`` gives layers, hidden,
        heads, intermediate (and kv_heads); dropout off, so runs are comparable step for step."""
        raise NotImplementedError

    def parallel_residual(self, config) -> bool:
        """Whether a layer adds both branches to its input, ``x + attn(ln1(x)) + mlp(ln2(x))`` (GPT-NeoX's
        ``use_parallel_residual``: the MLP reads the layer's input, not the attention's output), rather than
        running them one after the other (``r = x + attn(ln1(x))``, then ``r + mlp(ln2(r))``, or post-LN)."""
        return False

    def rotary_fraction(self, config) -> float:
        """Rotary families: the fraction of each head's dimensions RoPE rotates (its first
        ``int(head_dim * fraction)``; GPT-NeoX / Pythia rotate a quarter), the rest passing through."""
        return 1.0

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        """What growlib sets on every model of the family it builds or loads (e.g. GPT-2's loss type); returns it."""
        return model

    def layer_attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The attention module of one layer (it carries HF's ``layer_idx``)."""
        raise NotImplementedError

    def pack_layer(self, layer: torch.nn.Module, dtype: torch.dtype):
        """One layer's weights as a ``growlib.models.packing.PackedLayer`` for the frozen stack."""
        raise NotImplementedError

    def rotary_embedding(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The rotary embedding a model of this family builds from ``layer``'s config (rotary families only)."""
        raise NotImplementedError(f"{self.family} layers use no rotary embedding")

    def demo_model(self) -> torch.nn.Module | None:
        """A randomly initialised model at a real size for ``growlib demo`` (None: not shown there)."""
        return None

    def build_options(self, model: torch.nn.Module) -> dict:
        """Constructor arguments beyond the config that decide which parameters ``model`` has (e.g. BERT's
        ``add_pooling_layer``), so a model of another size is built with the same ones; passed to ``specs``."""
        return {}

    def max_seq_len(self, config) -> int | None:
        """The longest token sequence a model of ``config`` embeds (None: no position table limits it, e.g.
        RoPE): by default the rows of its position table (``dims()['pos']``).  RoBERTa numbers positions from
        ``pad_token_id + 1``, so its table serves that many fewer tokens."""
        return self.dims(config).get("pos")

    # -- shared ----------------------------------------------------------------------------------------
    def schema(self, model: torch.nn.Module, named_tensors: dict[str, torch.Tensor] | None = None) -> Schema:
        """The schema of ``model``: canonical views of its parameters, or of ``named_tensors`` (same names
        and shapes, e.g. optimizer state); of a model FSDP2 shards, meta tensors of its parameters' shapes.
        Every parameter must be covered by a spec."""
        params = dict(model.named_parameters(remove_duplicate=False))
        tied = self.tied(model)
        specs = self.specs(unsharded_class(model), model.config, tied, **self.build_options(model))
        covered = {id(params[s.source]) for s in specs}
        missing = sorted(n for n, p in params.items() if id(p) not in covered)
        if missing:
            raise ValueError(f"the {self.family} adapter does not cover parameters {missing} of "
                             f"{type(model).__name__}; growlib refuses to drop them silently")
        if named_tensors is None and is_sharded(model):  # each rank holds a shard: shapes only (growlib.sharded)
            named_tensors = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in params.items()}
        elif named_tensors is None:
            named_tensors = {n: p.detach() for n, p in params.items()}
        return bind_specs(self.family, self.dims(model.config), specs, named_tensors, tied)

    @staticmethod
    def tied(model: torch.nn.Module) -> bool:
        """Whether the model's output head is the very tensor of its token embedding."""
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        return head is not None and head.weight is emb.weight

    def new_model(self, like: torch.nn.Module, dims: dict[str, int], initialise: bool = True) -> torch.nn.Module:
        """A model of ``like``'s class, device and dtype at the given sizes, built the ordinary way (so HF ties its
        weights and fills its buffers).  ``initialise`` False when the caller writes every parameter (a growth
        map's target): HF's random initialisation, which is about half of building a model, is skipped and the
        parameters hold whatever memory held until then."""
        config = self.config_at(like.config, dims)
        reference = next(like.parameters())
        if initialise:
            with torch.device(reference.device):
                model = unsharded_class(like)(config, **self.build_options(like))
        else:
            model = build_uninitialised(unsharded_class(like), config, reference.device,
                                        **self.build_options(like))
        take_settings_of(model, like)
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


def take_settings_of(model: torch.nn.Module, like: torch.nn.Module) -> None:
    """Give a model built anew ``like``'s dtype, training mode and loss type (e.g. GPT-2's, which transformers
    cannot infer from its class name)."""
    model.to(dtype=next(like.parameters()).dtype)
    model.train(like.training)
    if getattr(like, "loss_type", None):
        model.loss_type = like.loss_type


def build_uninitialised(model_class: type, config, device: torch.device, **options) -> torch.nn.Module:
    """``model_class(config)`` on ``device`` without HF's random initialisation (transformers' own
    ``no_init_weights``, as it loads checkpoints), its weights tied again afterwards: for a model whose every
    parameter is about to be overwritten."""
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = model_class(config, **options)
    model.tie_weights()
    return model


def weight_and_bias(name: str, layer: int | None, source: str, out_role: str, in_role: str | None,
                    has_bias: bool, view: Callable = identity, bias_view: Callable = identity,
                    residual_out: bool = False, head_split: bool = False) -> list[SlotSpec]:
    """Specs for a linear layer: ``name.weight`` (out_role, in_role) and optionally ``name.bias``; with
    ``head_split`` the views keep the heads of out_role apart (see ``SlotSpec.head_split``)."""
    axes = (out_(out_role),) if in_role is None else (out_(out_role), in_(in_role))
    specs = [SlotSpec(f"{name}.weight", layer, f"{source}.weight", axes, view, residual_out, head_split)]
    if has_bias:
        specs.append(SlotSpec(f"{name}.bias", layer, f"{source}.bias", (out_(out_role),), bias_view, residual_out,
                              head_split))
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
