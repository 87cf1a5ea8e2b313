"""LiGO (Wang et al., ICLR 2023): a learned linear growth operator, Kronecker-factored into width and depth maps.

Every tensor name k of the large model is computed from the small model's stack of that tensor as

    W'_l = E_out,l (sum_j D_k[l, j] W_j) F_in,l^T         (biases and norms: E_l sum_j D_k[l, j] w_j)

with one ``growlib.kernels.kron_expand`` per tensor name over all large layers (per-layer width maps are passed
stacked, (L2, d2, d1)).  The learned coefficients are the width matrices (E for out-side axes, F for in-side
axes, both (d2, d1)) and one depth matrix D_k (L2, L1) per tensor name; the small model's weights are frozen
copies held as buffers.

Choices, where the paper (Wang et al., ICLR 2023) and its official code differ:

* Order: the depth mix runs first on the small matrices and the width maps act per LARGE layer (the official
  code's order).  It is the cheaper order, and it lets two large layers that copy the same small layer drift
  apart, which per-small-layer width maps (the paper's formula) cannot do before D moves.
* E and F are separate matrices per role and side, F initialised as E with its columns divided by the copy
  counts, i.e. the corrected Net2Net normalisation A = [I; S] diag(1 + S^T 1)^{-1}.  With F tied to E (the
  paper's Algorithm 1) no width initialisation would be function-preserving.
* Tying (``tie="paper"``): one residual-stream map (role ``model``) shared by the embeddings, norms, head and
  every layer's model-side axis; per large layer a map for Q's rows, K's rows, V's rows and the FFN's inner
  axis (Llama's gate and up share it, as SwiGLU multiplies their units pairwise).  O's input is tied to V's
  output: query head h reads the values of key/value head h // group, so O's in-map is V's in-map lifted
  from key/value heads to query heads (the identity lift without grouped-query attention).  ``down``'s
  input is tied to ``up``'s output through the shared FFN map.  ``tie="shared"`` uses one map per role for
  all layers.  A tied LM head is the embedding, expanded once.
* Initialisation: D from ``growlib.grow_depth_map`` and E, F from ``growlib.widen_map`` -- the very maps of
  the sparse operators, made dense -- so before fitting ``materialize()`` equals
  ``grow_depth(widen(small, ...), layers, depth_init)`` (LiGO's Proposition 1, with every inexact
  initialisation of the official code replaced by the exact operator it approximates).
* Fitting: AdamW with a warmup of 10% of the steps by default (the official README's 10000-step warmup over
  100 steps leaves the learning rate at 2e-6 and the operator barely moves), no weight decay by default
  (decay pulls E, F and D towards zero, away from the growth they start from), and under gradient
  accumulation the large weights are built once per optimizer step and backpropagated through once.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from growlib.kernels.kron_expand import STEPS, cheapest_order, kron_expand, kron_expand_vector
from growlib.models import adapter_for
from growlib.models.base import build_uninitialised

#: fit's progress: a line at the first and last step and at most every PROGRESS_INTERVAL_S seconds between
_progress = logging.getLogger("growlib.ligo")
PROGRESS_INTERVAL_S = 30.0
from growlib.operators.depth import GROW_METHODS, grow_depth_map
from growlib.operators.width import widen_map
from growlib.schema import IN, OUT, WIDTH_ROLES, Schema, SlotSpec, canonical_shape
from growlib.validate import require_choice, require_int, require_number

LIGO_WIDTH_INITS = ("net2net", "hypercloning", "bert2bert_fpi", "bert2bert_aki")
LIGO_DEPTH_INITS = GROW_METHODS
TIES = ("paper", "shared")
OPTIMIZERS = ("adamw", "sgd")

#: Sizes LiGO may grow, and sizes that must stay as they are (it keeps the head size and every table).
_GROWING = ("model", "ffn", "heads", "kv_heads", "layers")
_FIXED = ("head_dim", "vocab", "pos", "type", "patch", "labels")
#: Which role of ``widen_map`` initialises each width-map group.
_GROUP_ROLE = {"model": "model", "q": "attn", "k": "kv", "v": "kv", "ffn": "ffn"}


@dataclass(frozen=True)
class _MapRef:
    """The learned width matrix acting on one axis: a group (``model``, ``q``, ``k``, ``v``, ``ffn``) of a
    large layer (None: shared by all layers), a side (out: E, in: F) and whether it is lifted from key/value
    heads to query heads (O's input, tied to V's output)."""

    group: str
    layer: int | None
    side: str
    lift: bool = False

    @property
    def key(self) -> str:
        return f"{self.group}{'' if self.layer is None else self.layer}_{self.side}"


@dataclass(frozen=True)
class _LayerTask:
    """One tensor name of the layers: its frozen small stack, its depth matrix and, per large layer, the width
    map of each axis (None: a role that is never resized)."""

    name: str
    source: str
    depth: str
    maps: tuple[tuple[_MapRef | None, ...], ...]


@dataclass(frozen=True)
class _FixedTask:
    """One tensor outside the layers (embeddings, final norm, head): width maps only, no depth axis."""

    name: str
    source: str
    maps: tuple[_MapRef | None, ...]


@dataclass(frozen=True)
class _Assembly:
    """How the canonical tensors fill one HF parameter: a reshape of one tensor (``direct``), or each written
    through its view into a fresh tensor (GPT-2's fused ``c_attn``, Conv1D's transposed storage)."""

    specs: tuple[SlotSpec, ...]
    shape: tuple[int, ...]
    direct: bool


def lift_to_query_heads(kv_map: torch.Tensor, group: int, head_dim: int) -> torch.Tensor:
    """A (kv2, kv1) map over key/value units as the (kv2 * group, kv1 * group) map over query units.

    Query head ``k * group + r`` reads key/value head ``k`` (head-major layout), so unit (k', r', t') of the
    large model takes unit (k, r, t) with weight ``kv_map[(k', t'), (k, t)]`` when r = r', else 0.  Built by
    broadcasting against an identity (no matrix product), so it moves data but computes nothing."""
    if group == 1:
        return kv_map
    kv2, kv1 = kv_map.shape[0] // head_dim, kv_map.shape[1] // head_dim
    blocks = kv_map.reshape(kv2, 1, head_dim, kv1, 1, head_dim)
    eye = torch.eye(group, dtype=kv_map.dtype, device=kv_map.device).reshape(1, group, 1, 1, group, 1)
    return (blocks * eye).reshape(kv2 * group * head_dim, kv1 * group * head_dim)


def _chain_flops(shape: tuple[int, ...], steps: list[tuple[int, int]]) -> tuple[int, int]:
    """Forward and backward FLOPs of applying matrices along axes of a tensor of ``shape``, in the order of
    ``steps`` ((axis, rows of the matrix) each).  A step costs 2 * rows * (elements of its input); its
    backward computes the gradient of the matrix (as much again) and of its input (as much again, except for
    the first step, whose input is a frozen small weight)."""
    current, forward, backward = list(shape), 0, 0
    for position, (axis, rows) in enumerate(steps):
        cost = 2 * rows * math.prod(current)
        forward += cost
        backward += cost if position == 0 else 2 * cost
        current[axis] = rows
    return forward, backward


class LiGO(nn.Module):
    """The learned growth operator from ``small_model`` to a model of ``target_config`` (same family).

    ``depth_init`` is a ``growlib.grow_depth`` method (``stack``, ``interleave``, ``copy_top``), ``width_init``
    a ``growlib.widen`` method (``net2net``, ``bert2bert_fpi``, ``hypercloning``; ``bert2bert_aki`` is refused,
    see below), ``tie`` is ``paper`` (per-layer Q / K / V / FFN maps) or ``shared`` (one map per role), and
    ``seed`` chooses Net2Net's random copies.  The only parameters are the width matrices ``width[...]`` and the
    depth matrices ``depth[...]``; ``expanded()`` gives the large model's parameters as differentiable functions
    of them, ``fit()`` trains them on the large model's loss, ``materialize()`` returns the grown HF model and
    ``flops_per_expansion()`` counts what one expansion costs (for the trainer's FLOP budget)."""

    def __init__(self, small_model: nn.Module, target_config: PretrainedConfig, depth_init: str = "stack",
                 width_init: str = "net2net", tie: str = "paper", seed: int = 0):
        super().__init__()
        if not isinstance(small_model, nn.Module):
            raise TypeError(f"small_model must be a Hugging Face model (torch.nn.Module), got "
                            f"{type(small_model).__name__}")
        adapter = adapter_for(small_model, "small_model")
        require_choice("depth_init", depth_init, LIGO_DEPTH_INITS)
        require_choice("width_init", width_init, LIGO_WIDTH_INITS)
        require_choice("tie", tie, TIES)
        seed = require_int("seed", seed, minimum=0)
        if width_init == "bert2bert_aki":
            raise ValueError(
                "width_init='bert2bert_aki' gives the new units of layer l the rows of small layer l + 1, so "
                "the rows of one large tensor read different source layers; LiGO's factored form "
                "E_l (sum_j D[l, j] W_j) F_l^T mixes whole layers with one D row, so AKI is none of its "
                "operators.  Use 'bert2bert_fpi' here, or growlib.widen(..., method='bert2bert_aki') "
                "without LiGO")
        if not isinstance(target_config, PretrainedConfig):
            raise TypeError(f"target_config must be a transformers PretrainedConfig, got "
                            f"{type(target_config).__name__}")
        if type(target_config) is not type(small_model.config):
            raise ValueError(f"target_config must be a {type(small_model.config).__name__} like the small "
                             f"{type(small_model).__name__}'s config, got {type(target_config).__name__}")
        reference = next(small_model.parameters())
        self._model_class = type(small_model)
        self._adapter = adapter
        self._build_options = adapter.build_options(small_model)
        self.target_config = copy.deepcopy(target_config)
        self._large_dtype = reference.dtype
        self._small_training = small_model.training
        self._loss_type = getattr(small_model, "loss_type", None)  # GPT-2's, which transformers cannot infer
        self._home = reference.device
        self.tie, self.depth_init, self.width_init, self.seed = tie, depth_init, width_init, seed
        compute = torch.float64 if reference.dtype == torch.float64 else torch.float32

        small = adapter.schema(small_model)
        large_meta = self._build_large(torch.device("meta"))
        large = adapter.schema(large_meta)
        self._check_target(small, large)
        self.family = small.family
        self.source_dims, self.target_dims = dict(small.dims), dict(large.dims)
        self._group = small.dims["heads"] // small.dims["kv_heads"]
        self._head_dim = small.dims["head_dim"]

        width_map = widen_map(small.dims, hidden=large.dims["model"], intermediate=large.dims["ffn"],
                              heads=large.dims["heads"], method=width_init, seed=seed)
        depth_map = grow_depth_map(small.dims, large.dims["layers"], depth_init).depth.dense()
        self._initial_width = {role: (m.out_map.dense(), m.in_map.dense()) for role, m in width_map.width.items()}

        self.width = nn.ParameterDict()
        self.depth = nn.ParameterDict()
        self._buffer_count = 0
        self._layer_tasks: list[_LayerTask] = []
        self._fixed_tasks: list[_FixedTask] = []
        for spec in large.specs:
            if spec.layer is not None and spec.layer > 0:
                continue
            if spec.layer is None:
                source = self._frozen(small.tensor(spec.name).detach().clone(), compute)
                maps = tuple(self._map_for(spec, axis, None, compute) for axis in spec.axes)
                self._check_shape(spec, large, maps, None)
                self._fixed_tasks.append(_FixedTask(spec.name, source, maps))
                continue
            stack = torch.stack([small.tensor(spec.name, j).detach() for j in range(small.num_layers)])
            if spec.head_split:  # (layers, heads, head_dim[, in]) -> (layers, heads * head_dim[, in])
                stack = stack.flatten(1, 2)
            source = self._frozen(stack, compute)
            depth_key = spec.name.replace(".", "_")
            # clone: ``to`` returns its input when nothing changes, and parameters must not share storage
            self.depth[depth_key] = nn.Parameter(depth_map.to(device=self._home, dtype=compute).clone())
            maps = tuple(tuple(self._map_for(spec, axis, l, compute) for axis in spec.axes)
                         for l in range(large.num_layers))
            for l, layer_maps in enumerate(maps):
                self._check_shape(spec, large, layer_maps, l)
            self._layer_tasks.append(_LayerTask(spec.name, source, depth_key, maps))
        del self._initial_width
        self._assemblies = self._plan_assembly(large_meta, large)

    # -- construction ----------------------------------------------------------------------------------
    def _build_large(self, device: torch.device) -> nn.Module:
        """An ordinary HF model of the target config, uninitialised: its parameters are replaced by the
        expansion."""
        model = build_uninitialised(self._model_class, copy.deepcopy(self.target_config), device,
                                    **self._build_options)
        if self._loss_type:
            model.loss_type = self._loss_type
        return model.to(dtype=self._large_dtype)

    def _check_target(self, small: Schema, large: Schema) -> None:
        """target_config only grows the model, keeps the head size and tables, and holds the same tensors."""
        field = self._adapter.config_field
        for role in _GROWING:
            if role in small.dims and large.dims[role] < small.dims[role]:
                raise ValueError(f"target_config.{field(role)} must be >= the small model's "
                                 f"{small.dims[role]}: LiGO only grows models, got {large.dims[role]}")
        for role in _FIXED:
            if role in small.dims and large.dims.get(role) != small.dims[role]:
                why = ("LiGO keeps the head size and grows the number of heads" if role == "head_dim"
                       else "LiGO does not resize it")
                raise ValueError(f"target_config.{field(role)} must equal the small model's "
                                 f"{small.dims[role]} ({why}), got {large.dims.get(role)}")
        small_group = small.dims["heads"] // small.dims["kv_heads"]
        if large.dims["heads"] != small_group * large.dims["kv_heads"]:
            raise ValueError(f"target_config.{field('kv_heads')} must give "
                             f"{small_group} query heads per key/value head like the small model "
                             f"({large.dims['heads']} heads need {large.dims['heads'] // small_group} key/value "
                             f"heads), got {large.dims['kv_heads']}")
        if small.tied_embeddings != large.tied_embeddings:
            raise ValueError(f"target_config.tie_word_embeddings must match the small model "
                             f"(tied={small.tied_embeddings}), got tied={large.tied_embeddings}")
        small_slots = {(s.name, s.layer is None, s.axes) for s in small.specs if s.layer in (None, 0)}
        large_slots = {(s.name, s.layer is None, s.axes) for s in large.specs if s.layer in (None, 0)}
        if small_slots != large_slots:
            differ = sorted({name for name, _, _ in small_slots ^ large_slots})
            raise ValueError(f"target_config builds a model whose tensors differ from the small model's "
                             f"(e.g. a bias switched on or off): {differ}")

    def _frozen(self, tensor: torch.Tensor, compute: torch.dtype) -> str:
        name = f"frozen_{self._buffer_count}"
        self._buffer_count += 1
        self.register_buffer(name, tensor.to(device=self._home, dtype=compute).contiguous(), persistent=False)
        return name

    def _map_for(self, spec: SlotSpec, axis, layer: int | None, compute: torch.dtype) -> _MapRef | None:
        """The learned width matrix of one axis, created (from the width initialisation) on first use."""
        role, side = axis.role, axis.side
        if role not in WIDTH_ROLES:
            return None
        layer = None if self.tie == "shared" else layer
        module = spec.name.rsplit(".", 1)[0]
        if role == "model":
            ref = _MapRef("model", None, side)
        elif spec.layer is None:
            raise ValueError(f"LiGO has no width map for the {role!r} axis of {spec.name!r}, which lies outside "
                             "the layers")
        elif role == "ffn":
            ref = _MapRef("ffn", layer, side)
        elif role == "attn" and side == OUT:
            ref = _MapRef("q", layer, OUT)
        elif role == "attn" and side == IN:
            ref = _MapRef("v", layer, IN, lift=True)
        elif role == "kv" and side == OUT and module in self._adapter.kv_tie_groups:
            ref = _MapRef(self._adapter.kv_tie_groups[module], layer, OUT)
        else:
            raise ValueError(f"LiGO does not know which width map ties the {side}-side {role!r} axis of "
                             f"{spec.name!r}")
        if ref.key not in self.width:
            out_map, in_map = self._initial_width[_GROUP_ROLE[ref.group]]
            init = out_map if ref.side == OUT else in_map
            self.width[ref.key] = nn.Parameter(init.to(device=self._home, dtype=compute).clone())
        return ref

    def _check_shape(self, spec: SlotSpec, large: Schema, maps, layer: int | None) -> None:
        expected = canonical_shape(spec, large.dims)
        produced = tuple(large.dims[axis.role] if ref is None else self._matrix(ref).shape[0]
                         for axis, ref in zip(spec.axes, maps))
        if produced != expected:
            raise ValueError(f"LiGO would expand {spec.name!r} (layer {layer}) to {produced}, but the target "
                             f"model holds {expected}")

    def _plan_assembly(self, large_model: nn.Module, large: Schema) -> dict[str, _Assembly]:
        """For each HF parameter, how its canonical views fill it; every element must be covered exactly once
        (checked by counting writes through the views)."""
        params = dict(large_model.named_parameters(remove_duplicate=False))
        by_source: dict[str, list[SlotSpec]] = {}
        for spec in large.specs:
            by_source.setdefault(spec.source, []).append(spec)
        plans = {}
        for source, specs in by_source.items():
            shape = tuple(params[source].shape)
            if len(specs) == 1:
                view = specs[0].view(torch.empty(shape, device="meta"))
                if view.is_contiguous() and view.storage_offset() == 0 and view.numel() == math.prod(shape):
                    plans[source] = _Assembly(tuple(specs), shape, True)
                    continue
            writes = torch.zeros(shape, dtype=torch.uint8)
            for spec in specs:
                spec.view(writes).add_(1)
            if not bool((writes == 1).all()):
                raise ValueError(f"the {large.family} schema does not cover parameter {source!r} exactly once, so "
                                 "LiGO cannot assemble it")
            plans[source] = _Assembly(tuple(specs), shape, False)
        return plans

    # -- the expansion ---------------------------------------------------------------------------------
    def _matrix(self, ref: _MapRef) -> torch.Tensor:
        matrix = self.width[ref.key]
        return lift_to_query_heads(matrix, self._group, self._head_dim) if ref.lift else matrix

    def _matrix_or_identity(self, ref: _MapRef | None, size: int, like: torch.Tensor) -> torch.Tensor:
        if ref is not None:
            return self._matrix(ref)
        return torch.eye(size, dtype=like.dtype, device=like.device)

    def _layer_maps(self, refs: tuple[_MapRef | None, ...], size: int, like: torch.Tensor) -> torch.Tensor:
        """The width map of one axis of a tensor name: its matrix (d2, d1) when every large layer shares it,
        else the large layers' matrices stacked (L2, d2, d1)."""
        if len(set(refs)) == 1:
            return self._matrix_or_identity(refs[0], size, like)
        return torch.stack([self._matrix(ref) for ref in refs])

    def _expand_layers(self, task: _LayerTask) -> torch.Tensor:
        """(L2, O2[, I2]) for one tensor name: one ``kron_expand`` over all large layers, whether the width maps
        are shared (``tie='shared'``, the residual stream) or per layer (``tie='paper'``)."""
        stack = getattr(self, task.source)
        depth = self.depth[task.depth]
        E = self._layer_maps(tuple(maps[0] for maps in task.maps), stack.shape[1], stack)
        if stack.dim() == 2:
            return kron_expand_vector(stack, E, depth)
        F = self._layer_maps(tuple(maps[1] for maps in task.maps), stack.shape[2], stack)
        return kron_expand(stack, E, F, depth)

    def _columns_first(self, tensor: torch.Tensor, out_ref: _MapRef, in_ref: _MapRef) -> bool:
        """Whether E (W F^T) is cheaper than (E W) F^T for this tensor."""
        (o1, i1), o2, i2 = tensor.shape, self._matrix(out_ref).shape[0], self._matrix(in_ref).shape[0]
        return o1 * i1 * i2 + o2 * o1 * i2 < o2 * o1 * i1 + o2 * i1 * i2

    def _expand_fixed(self, task: _FixedTask) -> torch.Tensor:
        """E W F^T for a tensor outside the layers, skipping the identity of roles never resized."""
        out = getattr(self, task.source)
        if out.dim() == 1:
            # a matrix product with one column rather than a matrix-vector product, so that FLOP counters
            # (torch.utils.flop_counter ignores aten.mv) see what flops_per_expansion counts
            return out if task.maps[0] is None else (self._matrix(task.maps[0]) @ out.unsqueeze(1)).squeeze(1)
        out_ref, in_ref = task.maps
        if out_ref is not None and in_ref is not None and self._columns_first(out, out_ref, in_ref):
            return self._matrix(out_ref) @ (out @ self._matrix(in_ref).t())
        if out_ref is not None:
            out = self._matrix(out_ref) @ out
        return out if in_ref is None else out @ self._matrix(in_ref).t()

    def expanded(self) -> dict[str, torch.Tensor]:
        """{parameter name of the large model: tensor}, differentiable with respect to E, F and D.

        A tied LM head is not listed: it is the embedding (``torch.func.functional_call`` ties it)."""
        canonical: dict[tuple[str, int | None], torch.Tensor] = {}
        for task in self._layer_tasks:
            for l, tensor in enumerate(self._expand_layers(task).unbind(0)):
                canonical[(task.name, l)] = tensor
        for task in self._fixed_tasks:
            canonical[(task.name, None)] = self._expand_fixed(task)
        params = {}
        for source, plan in self._assemblies.items():
            if plan.direct:
                tensor = canonical[plan.specs[0].key].reshape(plan.shape)
            else:
                first = canonical[plan.specs[0].key]
                tensor = first.new_zeros(plan.shape)
                for spec in plan.specs:  # in-place writes through views: autograd routes the gradient back
                    view = spec.view(tensor)
                    view.copy_(canonical[spec.key].reshape(view.shape))  # a head-split view: heads apart
            params[source] = tensor.to(self._large_dtype)
        return params

    def flops_per_expansion(self, backward: bool = False) -> int:
        """FLOPs of one ``expanded()`` as the torch backend runs it (a multiply-add is 2 FLOPs): per tensor name
        one ``kron_expand`` over all large layers, its three steps in the cheapest valid order as both backends
        run them (per-layer maps cost what a shared map does); outside the layers E W F^T in the cheaper order.  With ``backward`` the gradients of
        E, F and D are added (the small weights are frozen, so the first product of each chain has no input
        gradient).  Lifts, stacks, reshapes and gathers move data and are not counted."""
        forward_total = backward_total = 0
        for task in self._layer_tasks:
            stack = getattr(self, task.source)
            widths = {step: self._layer_maps(tuple(maps[axis] for maps in task.maps), stack.shape[axis + 1], stack)
                      for axis, step in enumerate(("rows", "cols")[:stack.dim() - 1])}
            chain = {"depth": self.depth[task.depth], **widths}
            shape = tuple(stack.shape) if stack.dim() == 3 else (*stack.shape, 1)
            steps = [(STEPS.index(step), chain[step].shape[-2]) for step in cheapest_order(shape, chain)]
            forward, backward_flops = _chain_flops(shape, steps)
            forward_total += forward
            backward_total += backward_flops
        for task in self._fixed_tasks:
            tensor = getattr(self, task.source)
            steps = [(axis, self._matrix(ref).shape[0]) for axis, ref in enumerate(task.maps) if ref is not None]
            if len(steps) == 2 and self._columns_first(tensor, *task.maps):
                steps.reverse()
            forward, backward_flops = _chain_flops(tuple(tensor.shape), steps)
            forward_total += forward
            backward_total += backward_flops
        return forward_total + (backward_total if backward else 0)

    # -- using the result ------------------------------------------------------------------------------
    def materialize(self) -> nn.Module:
        """An ordinary HF model of ``target_config`` holding the current expansion (no graph, no LiGO)."""
        with torch.no_grad():
            tensors = self.expanded()
            model = self._build_large(self._device())
            params = dict(model.named_parameters(remove_duplicate=False))
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        return model.train(self._small_training)

    def fit(self, batches, steps: int = 100, lr: float = 2e-4, optimizer: str = "adamw",
            warmup_steps: int | None = None, grad_accum: int = 1, weight_decay: float = 0.0,
            max_grad_norm: float | None = 1.0) -> list[float]:
        """Train E, F and D on the large model's loss; returns the loss of every optimizer step (the mean over
        its micro-batches, measured before that step's update).

        ``batches``: a dict of model inputs with ``labels`` (used at every step) or an iterable of such dicts
        (restarted when exhausted, if it can be).  Each step consumes ``grad_accum`` micro-batches; the large
        weights are expanded once per step, the micro-batches' gradients with respect to them are summed, and
        one backward pass runs through the expansion.  The learning rate warms up linearly over
        ``warmup_steps`` (default: 10% of ``steps``) and decays linearly to zero at ``steps``; ``optimizer``
        is AdamW (betas 0.9 / 0.999, eps 1e-6, as the official code) or plain SGD.

        A non-finite loss stops the fit like the training loop: FloatingPointError, the operator restored to
        its state before ``fit``.  Progress goes to the ``growlib.ligo`` logger (the command line shows it)."""
        steps = require_int("steps", steps)
        grad_accum = require_int("grad_accum", grad_accum)
        require_choice("optimizer", optimizer, OPTIMIZERS)
        warmup_steps = max(1, round(0.1 * steps)) if warmup_steps is None else require_int(
            "warmup_steps", warmup_steps, minimum=0)
        if warmup_steps > steps:
            raise ValueError(f"warmup_steps must be <= steps={steps}, got {warmup_steps}")
        require_number("lr", lr, positive=True)
        require_number("weight_decay", weight_decay, minimum=0)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        micro_batches = _MicroBatches(batches, self._device())

        model = self._build_large(self._device()).train()
        for p in model.parameters():  # every call replaces them by the expansion: free the template's own
            p.requires_grad_(False)
            p.data = p.data.new_empty(0)
        params = list(self.parameters())
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            return (steps - step) / max(1, steps - warmup_steps)  # warmup_steps == steps: no decay phase

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        losses = []
        before = {name: t.detach().clone() for name, t in self.state_dict().items()}
        started = last_line = time.monotonic()
        for step in range(steps):
            expanded = self.expanded()
            leaves = {name: t.detach().requires_grad_(True) for name, t in expanded.items()}
            total = 0.0
            for _ in range(grad_accum):
                outputs = torch.func.functional_call(model, leaves, args=(), kwargs=next(micro_batches))
                loss = getattr(outputs, "loss", None)
                if loss is None:
                    raise ValueError("batches must hold the labels the model needs to return a loss "
                                     f"({type(model).__name__} returned none)")
                (loss / grad_accum).backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                self.load_state_dict(before)
                raise FloatingPointError(f"LiGO.fit: the loss is {total / grad_accum} at step {step + 1} of {steps} "
                                         f"(lr={lr:g}): the operator diverged and was restored to its state before "
                                         "fit; lower lr")
            grads = [(expanded[name], leaf.grad) for name, leaf in leaves.items()
                     if leaf.grad is not None and expanded[name].requires_grad]
            torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / grad_accum)
            now = time.monotonic()
            if step in (0, steps - 1) or now - last_line >= PROGRESS_INTERVAL_S:
                last_line = now
                _progress.info(f"LiGO fit: step {step + 1}/{steps}, loss {losses[-1]:.3f}, "
                               f"{now - started:.1f} s")
        return losses

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def extra_repr(self) -> str:
        s, t = self.source_dims, self.target_dims
        return (f"family={self.family}, layers {s['layers']}->{t['layers']}, hidden {s['model']}->{t['model']}, "
                f"ffn {s['ffn']}->{t['ffn']}, heads {s['heads']}->{t['heads']}, tie={self.tie}, "
                f"depth_init={self.depth_init}, width_init={self.width_init}")


class _MicroBatches:
    """Yields the training micro-batches on ``device``: one dict forever, or an iterable, restarted when it
    runs out (a one-shot iterator that runs out is an error, not a silent stop)."""

    def __init__(self, batches, device: torch.device):
        if isinstance(batches, Mapping):
            self._source = (batches,)
        elif isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)):
            self._source = batches
        else:
            raise TypeError(f"batches must be a dict of model inputs or an iterable of them, got "
                            f"{type(batches).__name__}")
        self._device = device
        self._iterator = iter(self._source)
        self._yielded = 0

    def __next__(self) -> dict:
        try:
            batch = next(self._iterator)
        except StopIteration:
            restarted = iter(self._source)
            if restarted is self._source or self._yielded == 0:
                raise ValueError(f"batches ran out after {self._yielded} micro-batches; pass a list, a "
                                 "re-iterable loader or enough batches for steps * grad_accum") from None
            self._iterator = restarted
            batch = next(self._iterator)
        if not isinstance(batch, Mapping):
            raise TypeError(f"each batch must be a dict of model inputs, got {type(batch).__name__}")
        self._yielded += 1
        return {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
