"""Run a growth map from one schema into another: turn (schema, map) pairs into kernel tasks.

This is where the architecture-agnostic maps meet the tensors: every target tensor becomes one task
``target = sum_d D[l, d] * E_out @ source_d @ F_in^T`` for the structured-map kernel, all tasks of a dtype in
one launch."""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import torch

from growlib.kernels.structured_map import structured_map_
from growlib.schema import GrowthMap, Schema, SparseRows, WIDTH_ROLES, bind_specs

_SINGLE_COLUMN = SparseRows.identity(1)
_counters = threading.local()


@dataclass
class MapFlops:
    """FLOPs of the maps applied inside ``counting_map_flops`` (a multiply-add is 2 FLOPs)."""

    flops: float = 0.0


@contextlib.contextmanager
def counting_map_flops() -> Iterator[MapFlops]:
    """Count the FLOPs of every ``apply_map`` in the block, so schedules charge their transitions.

    Per task and depth source, the nested form the kernel computes: ``source @ F^T`` (2 K_F FLOPs per element
    of that product), ``E @ (.)`` (2 K_E per output element), the depth weight (2 per output element); a
    blend adds 3 per output element.  K is the table width (nonzeros per row, padding included)."""
    counter = MapFlops()
    stack = getattr(_counters, "stack", None)
    if stack is None:
        stack = _counters.stack = []
    stack.append(counter)
    try:
        yield counter
    finally:
        stack.remove(counter)


@contextlib.contextmanager
def uncounted_maps() -> Iterator[None]:
    """Charge the maps applied inside to no ``counting_map_flops``: copies an engine makes for itself (FSDP2
    building a sharded model anew), which the same schedule in one process does not make."""
    stack = getattr(_counters, "stack", None)
    _counters.stack = []
    try:
        yield
    finally:
        _counters.stack = stack


def _charge(task_flops: float) -> None:
    for counter in getattr(_counters, "stack", ()):
        counter.flops += task_flops


def _task_flops(out_shape: tuple[int, int], source_rows: int, n_sources: int, row_map: SparseRows,
                col_map: SparseRows, blended: bool) -> float:
    rows, cols = out_shape
    k_rows, k_cols = row_map.index.shape[1], col_map.index.shape[1]
    per_source = 2 * source_rows * cols * k_cols + 2 * rows * cols * k_rows + 2 * rows * cols
    return n_sources * per_source + (3 * rows * cols if blended else 0)


class _TableBuilder:
    """Concatenates the sparse-row maps that tasks use into one (index, weight) table, each map once."""

    def __init__(self):
        self._start: dict[int, int] = {}
        self._maps: list[SparseRows] = []
        self._rows = 0

    def start_of(self, rows: SparseRows) -> int:
        key = id(rows)
        if key not in self._start:
            self._start[key] = self._rows
            self._maps.append(rows)
            self._rows += rows.n_out
        return self._start[key]

    def build(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        k = max(m.index.shape[1] for m in self._maps)
        index = torch.zeros(self._rows, k, dtype=torch.int32)
        weight = torch.zeros(self._rows, k, dtype=torch.float32)
        for m in self._maps:
            s = self._start[id(m)]
            index[s:s + m.n_out, :m.index.shape[1]] = m.index.to(torch.int32)
            weight[s:s + m.n_out, :m.index.shape[1]] = m.weight.to(torch.float32)
        return index.to(device), weight.to(device)


def check_map_fits(gmap: GrowthMap, source: Schema, target: Schema) -> None:
    """Raise TypeError / ValueError unless the map reads ``source``'s sizes and writes ``target``'s, on one
    device."""
    if not isinstance(gmap, GrowthMap):
        raise TypeError(f"gmap must be a growlib.GrowthMap (e.g. from growlib.coalesce_map), got "
                        f"{type(gmap).__name__}")
    for name, schema in (("source", source), ("target", target)):
        if not isinstance(schema, Schema):
            raise TypeError(f"{name} must be a growlib.Schema (growlib.schema_of(model)), got {type(schema).__name__}")
    devices = {name: {t.device for t in schema.tensors.values()} for name, schema in (("source", source),
                                                                                      ("target", target))}
    if len(devices["source"] | devices["target"]) > 1:
        raise ValueError(f"source tensors are on {sorted(map(str, devices['source']))} and target tensors on "
                         f"{sorted(map(str, devices['target']))}: a map runs on one device")
    if source.family != target.family:
        raise ValueError(f"source is a {source.family} schema but target is a {target.family} schema")
    if source.tied_embeddings != target.tied_embeddings:
        raise ValueError(f"source has tied_embeddings={source.tied_embeddings} but target has "
                         f"{target.tied_embeddings}: their heads are mapped differently")
    source_names = {s.name for s in source.specs}
    target_names = {s.name for s in target.specs}
    if source_names != target_names:
        raise ValueError(f"source and target hold different tensors (e.g. a head on one side only): "
                         f"{sorted(source_names ^ target_names)}")
    for label, schema, dims in (("source", source, gmap.source_dims), ("target", target, gmap.target_dims)):
        for role in WIDTH_ROLES + ("head_dim", "layers"):
            if role in dims and schema.dims.get(role) != dims[role]:
                raise ValueError(f"the growth map expects a {label} with {role}={dims[role]}, got "
                                 f"{schema.dims.get(role)}")


def depth_sources(gmap: GrowthMap, spec) -> list[tuple[tuple[str, int | None], float]] | None:
    """The source slots (schema keys) one target slot is computed from, each with its depth weight; None when
    the map leaves the slot as it is (a depth row of None)."""
    if spec.layer is None:
        return [((spec.name, None), 1.0)]
    row = gmap.depth_for(spec.name).rows[spec.layer]
    if row is None:
        return None
    if not row:  # a layer the map sets to zero: any source slot, weighed 0
        return [((spec.name, 0), 0.0)]
    return [((spec.name, j), w) for j, w in row]


# One parameter at a time: a parameter of the target is one group of slots (a fused QKV weight: three), each
# computed from the source slots of its name in the layers its depth row reads.  Streaming growth
# (growlib.grow_stream) and shard-local transitions (growlib.sharded) hold only one such group whole at a time.

def slots_by_parameter(schema: Schema, model: torch.nn.Module) -> dict[int, list]:
    """{id(parameter of ``model``): the slots of ``schema`` (``model``'s) that view it}, tied names merged."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    slots: dict[int, list] = {}
    for spec in schema.specs:
        slots.setdefault(id(parameters[spec.source]), []).append(spec)
    return slots


def source_slots(gmap: GrowthMap, source: Schema, specs: list) -> list:
    """The slots of ``source`` that ``gmap`` reads to compute the target slots ``specs``."""
    needed = {key for spec in specs for key, _ in depth_sources(gmap, spec)}
    return [spec for spec in source.specs if spec.key in needed]


def apply_map_to_slots(gmap: GrowthMap, source: Schema, source_specs: list, source_tensors: dict[str, torch.Tensor],
                       target: Schema, specs: list, target_tensor: torch.Tensor, *,
                       alpha: float | None = None) -> None:
    """``apply_map`` for the target slots ``specs`` of one parameter, written into ``target_tensor`` (that
    parameter whole), from ``source_tensors`` (the whole source parameters ``source_specs`` view, by name)."""
    apply_map(gmap, bind_specs(source.family, source.dims, source_specs, source_tensors, source.tied_embeddings),
              bind_specs(target.family, target.dims, specs, {spec.source: target_tensor for spec in specs},
                         target.tied_embeddings), alpha=alpha)


def apply_map(gmap: GrowthMap, source: Schema, target: Schema, *, alpha: float | None = None,
              rms: bool = False) -> None:
    """Write ``target <- gmap(source)`` in place; with ``alpha``, ``target <- (1-alpha) target + alpha gmap(source)``.

    ``rms`` maps non-negative second moments through their square roots (optimizer state)."""
    check_map_fits(gmap, source, target)
    tables = _TableBuilder()
    groups = defaultdict(list)  # (device, dst dtype, src dtype) -> tasks
    remapped: dict = {}  # row maps re-indexed for head-split sources, each built once
    for spec in target.specs:
        out = target.tensors[spec.key]
        keys = depth_sources(gmap, spec)
        if keys is None:
            continue
        sources = [(source.tensor(*key), w) for key, w in keys]
        first = sources[0][0]
        rows, cols = _rows_cols(first, spec)
        row_map = gmap.width_for(spec.axes[0].role, spec.axes[0].side, rows)
        col_map = (gmap.width_for(spec.axes[1].role, spec.axes[1].side, cols)
                   if len(spec.axes) == 2 else _SINGLE_COLUMN)
        if (row_map.n_out, col_map.n_out) != _rows_cols(out, spec):
            raise ValueError(f"target tensor {spec.name!r} (layer {spec.layer}) has shape {tuple(out.shape)}, "
                             f"but the map produces {(row_map.n_out, col_map.n_out)}")
        source_views, source_rows = _source_views(sources, spec, row_map, remapped)
        row_start, col_start = tables.start_of(source_rows), tables.start_of(col_map)
        for block, offset in _target_blocks(out, spec):
            groups[(out.device, out.dtype, first.dtype)].append((block, source_views, row_start + offset, col_start))
        _charge(_task_flops(_rows_cols(out, spec), rows, len(sources), row_map, col_map, alpha is not None))

    built_tables = {}
    for (device, _, _), tasks in groups.items():
        if device not in built_tables:
            built_tables[device] = tables.build(device)
        table_index, table_weight = built_tables[device]
        kd = max(len(t[1]) for t in tasks)
        dst, src, depth_w = [], [], torch.zeros(len(tasks), kd, dtype=torch.float32)
        for i, (out, sources, _, _) in enumerate(tasks):
            dst.append(out)
            padded = sources + [(sources[0][0], 0.0)] * (kd - len(sources))
            src.append([s for s, _ in padded])
            depth_w[i] = torch.tensor([w for _, w in padded], dtype=torch.float32)
        row_start = torch.tensor([t[2] for t in tasks], dtype=torch.int64, device=device)
        col_start = torch.tensor([t[3] for t in tasks], dtype=torch.int64, device=device)
        with torch.no_grad():
            structured_map_(dst, src, depth_w.to(device), row_start, col_start, table_index, table_weight,
                                alpha=alpha, rms=rms)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.unsqueeze(1)


# A head-split view (SlotSpec.head_split: (heads, head_dim[, in]), heads unevenly spaced in storage, e.g. GPT-NeoX's
# per-head fused QKV) is no 2-D tensor, so the kernel sees it differently on each side, still without a copy:
# as a target, one task per head ((head_dim, in) is an ordinary 2-D view), each reading its rows of the row map;
# as a source, the 2-D view of every row from its first head's first to its last head's last (the other
# projections' rows in between included), with the row map re-indexed to skip those.

def _is_head_split(t: torch.Tensor, spec) -> bool:
    return t.dim() == len(spec.axes) + 1


def _rows_cols(t: torch.Tensor, spec) -> tuple[int, int]:
    """The (rows, cols) a tensor has as a map sees it (its canonical shape, a vector as one column)."""
    if _is_head_split(t, spec):
        return t.shape[0] * t.shape[1], (t.shape[2] if t.dim() == 3 else 1)
    return tuple(_as_2d(t).shape)


def _target_blocks(out: torch.Tensor, spec) -> list[tuple[torch.Tensor, int]]:
    """The 2-D tensors the kernel writes for one target tensor, each with the offset of its first row in the
    row map: the tensor itself, or each head of a head-split one."""
    if not _is_head_split(out, spec):
        return [(_as_2d(out), 0)]
    head_dim = out.shape[1]
    return [(_as_2d(out[h]), h * head_dim) for h in range(out.shape[0])]


def _source_views(sources, spec, row_map: SparseRows, remapped: dict):
    """The kernel's 2-D source tensors of one task and the row map indexing them (re-indexed for head-split
    sources: unit (h, t) is row h * stride + t of the view spanning all heads)."""
    first = sources[0][0]
    if not _is_head_split(first, spec):
        return [(_as_2d(s), w) for s, w in sources], row_map
    heads, head_dim = first.shape[:2]
    strides = {tuple(s.stride()) for s, _ in sources}
    head_stride, row_stride = first.stride()[:2]
    if len(strides) != 1 or row_stride <= 0 or head_stride % row_stride:
        # heads not a whole number of rows apart: read a contiguous copy (sources are only read)
        return [(_as_2d(s.reshape(heads * head_dim, *s.shape[2:])), w) for s, w in sources], row_map
    spacing = head_stride // row_stride
    span = (heads - 1) * spacing + head_dim
    views = [(_as_2d(torch.as_strided(s, (span, *s.shape[2:]), (row_stride, *s.stride()[2:]))), w)
             for s, w in sources]
    key = (id(row_map), head_dim, spacing)
    if key not in remapped:
        index = row_map.index // head_dim * spacing + row_map.index % head_dim
        remapped[key] = (row_map, SparseRows(index, row_map.weight, span))
    return views, remapped[key][1]
