"""The parameter schema and the growth-map data types.

Every operator in growlib is a linear map from one model's parameters to another's, factored into a width
map per axis role and a depth map per tensor name (see the README). A *schema* is the model seen that way:
embeddings, a stack of identical layers, and a head, each tensor a 1-D or 2-D view in (out, in) convention
whose axes carry a role (``model``, ``ffn``, ``attn``, ...) and a side (``out`` or ``in``).

Only the adapters in ``growlib.models`` know how a Hugging Face state dict maps onto a schema; everything
here is architecture-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

OUT = "out"
IN = "in"

#: Roles whose size an operator may change.  ``attn`` and ``kv`` are head-structured (heads x head_dim,
#: head-major); the others are plain vectors of units.  Roles not listed here (``vocab``, ``pos``,
#: ``type``, ``patch``, ``labels``) are never resized and always map through the identity.
WIDTH_ROLES = ("model", "ffn", "attn", "kv")


@dataclass(frozen=True)
class Axis:
    """One axis of a canonical tensor: which size it has (role) and how a width map acts on it (side).

    ``out`` axes take the width map E (rows copied / averaged); ``in`` axes take F (columns scaled so the
    grown network computes the same function)."""

    role: str
    side: str

    def __post_init__(self):
        if self.side not in (OUT, IN):
            raise ValueError(f"Axis.side must be 'out' or 'in', got {self.side!r}")


@dataclass(frozen=True)
class SlotSpec:
    """How one HF parameter (or a slice of it) appears in the schema.

    ``view`` turns the HF storage tensor into the canonical (out, in) view without copying, e.g. a
    transpose for GPT-2's Conv1D or a slice of its fused ``c_attn``.  ``residual_out`` marks the last
    projection of a residual branch: the ODE multilevel operators fold the residual step size into it.

    ``head_split``: the view keeps the heads of its first, head-structured axis (``attn`` or ``kv``) apart,
    (heads, head_dim[, in]) instead of (heads * head_dim[, in]).  That is for storage no 2-D view can express:
    GPT-NeoX fuses Q, K and V per head ([q_h, k_h, v_h] for each head h), so the rows of one head of Q lie
    3 * head_dim rows after the previous one's and Q is a strided 3-D view.  ``canonical_shape`` gives the
    (out, in) shape every map works with; ``growlib.apply`` runs such a tensor head by head, still without a
    copy."""

    name: str
    layer: int | None
    source: str
    axes: tuple[Axis, ...]
    view: Callable[[torch.Tensor], torch.Tensor]
    residual_out: bool = False
    head_split: bool = False

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.name, self.layer)


@dataclass
class Schema:
    """A model seen as embeddings + L identical layers + head, with canonical views of its tensors.

    ``dims`` holds the size of every role plus ``heads``, ``kv_heads``, ``head_dim`` and ``layers``.
    ``tensors`` maps (name, layer) to the canonical view; writing into a view writes into the model."""

    family: str
    dims: dict[str, int]
    specs: list[SlotSpec]
    tensors: dict[tuple[str, int | None], torch.Tensor]
    tied_embeddings: bool = False

    @property
    def num_layers(self) -> int:
        return self.dims["layers"]

    def layer_names(self) -> list[str]:
        """Names of the tensors every layer holds, in schema order."""
        return [s.name for s in self.specs if s.layer == 0]

    def tensor(self, name: str, layer: int | None = None) -> torch.Tensor:
        try:
            return self.tensors[(name, layer)]
        except KeyError:
            raise KeyError(f"schema of family {self.family!r} has no tensor {name!r} at layer {layer}") from None

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


#: The head-structured roles, and the size in ``dims`` that counts their heads.
HEAD_ROLES = {"attn": "heads", "kv": "kv_heads"}


def canonical_shape(spec: SlotSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """The (out[, in]) shape of a slot: one size per axis, from its role."""
    return tuple(dims[a.role] for a in spec.axes)


def stored_shape(spec: SlotSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of a slot's view: its canonical shape, or (heads, head_dim[, in]) for a ``head_split`` one."""
    shape = canonical_shape(spec, dims)
    if not spec.head_split:
        return shape
    role = spec.axes[0].role
    if role not in HEAD_ROLES:
        raise ValueError(f"{spec.name!r} is head_split, but its first axis has role {role!r}, which has no heads")
    return (dims[HEAD_ROLES[role]], dims["head_dim"], *shape[1:])


def bind_specs(family: str, dims: dict[str, int], specs: Sequence[SlotSpec],
               named_tensors: Mapping[str, torch.Tensor], tied_embeddings: bool) -> Schema:
    """Build a schema by applying each spec's view to the named tensor it reads.

    ``named_tensors`` may be a model's parameters or any tensors of the same shapes (optimizer state), so
    the same specs serve both.  Every spec must find its tensor: nothing is skipped silently."""
    tensors = {}
    for spec in specs:
        if spec.source not in named_tensors:
            raise KeyError(f"{family} schema needs tensor {spec.source!r}, which is missing")
        view = spec.view(named_tensors[spec.source])
        expected = stored_shape(spec, dims)
        if tuple(view.shape) != expected:
            raise ValueError(
                f"{family} tensor {spec.source!r} viewed as {spec.name!r}: expected shape {expected} from the "
                f"config, got {tuple(view.shape)}")
        tensors[spec.key] = view
    return Schema(family=family, dims=dict(dims), specs=list(specs), tensors=tensors,
                  tied_embeddings=tied_embeddings)


@dataclass(frozen=True)
class SparseRows:
    """A (n_out, n_in) matrix with at most K nonzeros per row: ``y[i] = sum_k weight[i, k] * x[index[i, k]]``.

    Padding entries have weight 0 (index 0).  Weights are float64 so maps compose without rounding."""

    index: torch.Tensor
    weight: torch.Tensor
    n_in: int

    def __post_init__(self):
        if self.index.shape != self.weight.shape or self.index.dim() != 2:
            raise ValueError(f"SparseRows: index and weight must both be (n_out, K), got "
                             f"{tuple(self.index.shape)} and {tuple(self.weight.shape)}")
        if self.index.numel() and (int(self.index.min()) < 0 or int(self.index.max()) >= self.n_in):
            raise ValueError(f"SparseRows: indices must lie in [0, {self.n_in})")

    @property
    def n_out(self) -> int:
        return self.index.shape[0]

    @staticmethod
    def identity(n: int) -> "SparseRows":
        return SparseRows(torch.arange(n).unsqueeze(1), torch.ones(n, 1, dtype=torch.float64), n)

    def dense(self) -> torch.Tensor:
        """The map as a dense float64 matrix (for tests and small-scale analysis)."""
        out = torch.zeros(self.n_out, self.n_in, dtype=torch.float64)
        out.scatter_add_(1, self.index, self.weight)
        return out


@dataclass(frozen=True)
class WidthMap:
    """The width map of one role: ``E`` for out-side axes, ``F`` for in-side axes, both (d2, d1)."""

    out_map: SparseRows
    in_map: SparseRows

    def __post_init__(self):
        if (self.out_map.n_out, self.out_map.n_in) != (self.in_map.n_out, self.in_map.n_in):
            raise ValueError("WidthMap: out_map and in_map must have the same shape")

    def side(self, side: str) -> SparseRows:
        return self.out_map if side == OUT else self.in_map


@dataclass(frozen=True)
class DepthMap:
    """Target layer l = sum over (j, w) in ``rows[l]`` of w * source layer j.

    A row of ``None`` leaves the target's layer as it is (only meaningful when writing into an existing
    model, e.g. prolongation writes back only the coarse model's slots)."""

    rows: tuple[tuple[tuple[int, float], ...] | None, ...]
    n_in: int

    def __post_init__(self):
        for l, row in enumerate(self.rows):
            for j, _ in row or ():
                if not 0 <= j < self.n_in:
                    raise ValueError(f"DepthMap row {l} reads source layer {j}, outside [0, {self.n_in})")

    @property
    def n_out(self) -> int:
        return len(self.rows)

    def scaled(self, factor: float) -> "DepthMap":
        return DepthMap(tuple(None if r is None else tuple((j, w * factor) for j, w in r) for r in self.rows),
                        self.n_in)

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.n_out, self.n_in, dtype=torch.float64)
        for l, row in enumerate(self.rows):
            for j, w in row or ():
                out[l, j] += w
        return out


@dataclass
class GrowthMap:
    """A linear map between two schemas: width maps per role, a depth map per tensor name.

    Roles without a width map map through the identity; tensor names without an entry in
    ``depth_by_name`` use ``depth``.  ``target_dims`` records the sizes the map produces."""

    source_dims: dict[str, int]
    target_dims: dict[str, int]
    width: dict[str, WidthMap]
    depth: DepthMap
    depth_by_name: dict[str, DepthMap] = field(default_factory=dict)

    def depth_for(self, name: str) -> DepthMap:
        return self.depth_by_name.get(name, self.depth)

    def width_for(self, role: str, side: str, size: int) -> SparseRows:
        if role in self.width:
            return self.width[role].side(side)
        return SparseRows.identity(size)
