"""The one entry point to every kernel: input validation, backend dispatch, torch.library registration.

Backend policy (env ``GROWLIB_BACKEND`` or ``with growlib.use_backend(...)``):

* ``auto``   Triton for CUDA tensors, the PyTorch reference (growlib.reference) for CPU tensors;
* ``triton`` always Triton; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter);
* ``torch``  always the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Sequence

import torch

from growlib import reference

BACKENDS = ("auto", "triton", "torch")
_state = threading.local()


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend policy in force: the innermost ``use_backend``, else ``$GROWLIB_BACKEND``, else auto."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check_backend(os.environ.get("GROWLIB_BACKEND", "auto"), "environment variable GROWLIB_BACKEND")


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the enclosed growlib calls with the given backend policy ('auto', 'triton' or 'torch')."""
    _check_backend(backend, "backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on ``device`` under the current policy."""
    policy = current_backend()
    if policy == "torch":
        return "torch"
    if policy == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda" or interpreting():
        return "triton"
    raise RuntimeError(
        f"backend 'triton' was forced for tensors on {device}, but Triton runs only on CUDA tensors or, on the "
        "CPU, under its interpreter: set TRITON_INTERPRET=1 before importing growlib, or use backend 'auto'/'torch'")


# ----------------------------------------------------------------------------------------------------------
# Structured maps
# ----------------------------------------------------------------------------------------------------------

def _validate_structured_map(dst, src, depth_weight, row_start, col_start, table_index, table_weight, alpha):
    if not isinstance(dst, (list, tuple)) or not dst:
        raise TypeError("dst must be a non-empty list of 2-D tensors")
    num_tasks = len(dst)
    if not isinstance(src, (list, tuple)) or len(src) != num_tasks:
        raise ValueError(f"src must be a list of {num_tasks} lists (one per dst tensor), got "
                         f"{type(src).__name__} of length {len(src) if isinstance(src, (list, tuple)) else '?'}")
    device, dst_dtype = dst[0].device, dst[0].dtype
    src_dtype = src[0][0].dtype if src[0] else None
    if depth_weight.dim() != 2 or depth_weight.shape[0] != num_tasks:
        raise ValueError(f"depth_weight must have shape ({num_tasks}, KD), got {tuple(depth_weight.shape)}")
    kd = depth_weight.shape[1]
    for name, t in (("row_start", row_start), ("col_start", col_start)):
        if t.shape != (num_tasks,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor of shape ({num_tasks},), got "
                             f"{t.dtype} {tuple(t.shape)}")
    if table_index.dim() != 2 or table_index.shape != table_weight.shape:
        raise ValueError(f"table_index and table_weight must both be (N, K), got {tuple(table_index.shape)} "
                         f"and {tuple(table_weight.shape)}")
    if table_index.dtype != torch.int32 or table_weight.dtype != torch.float32:
        raise TypeError(f"table_index must be int32 and table_weight float32, got {table_index.dtype} and "
                        f"{table_weight.dtype}")
    if depth_weight.dtype != torch.float32:
        raise TypeError(f"depth_weight must be float32, got {depth_weight.dtype}")
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    for name, t in (("depth_weight", depth_weight), ("row_start", row_start), ("col_start", col_start),
                    ("table_index", table_index), ("table_weight", table_weight)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but dst is on {device}: all tensors must share a device")

    n_table = table_index.shape[0]
    host_index = table_index.detach().cpu().long()
    rows_at, cols_at = row_start.tolist(), col_start.tolist()
    for t, out in enumerate(dst):
        if out.dim() != 2 or out.dtype != dst_dtype or out.device != device:
            raise ValueError(f"dst[{t}] must be a 2-D {dst_dtype} tensor on {device}, got "
                             f"{out.dim()}-D {out.dtype} on {out.device}")
        if len(src[t]) != kd:
            raise ValueError(f"src[{t}] must hold KD={kd} tensors (depth_weight.shape[1]), got {len(src[t])}")
        n_rows, n_cols = out.shape
        for name, start, n in (("row_start", rows_at[t], n_rows), ("col_start", cols_at[t], n_cols)):
            start = int(start)
            if start < 0 or start + n > n_table:
                raise ValueError(f"{name}[{t}]={start} with {n} entries runs past the table's {n_table} rows")
        for d, source in enumerate(src[t]):
            if source.dim() != 2 or source.dtype != src_dtype or source.device != device:
                raise ValueError(f"src[{t}][{d}] must be a 2-D {src_dtype} tensor on {device}, got "
                                 f"{source.dim()}-D {source.dtype} on {source.device}")
            for axis, start, n in ((0, rows_at[t], n_rows), (1, cols_at[t], n_cols)):
                idx = host_index[start:start + n]
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= source.shape[axis]):
                    raise ValueError(f"table entries for task {t} must index src[{t}][{d}] axis {axis} within "
                                     f"[0, {source.shape[axis]}), got [{int(idx.min())}, {int(idx.max())}]")
        if out.numel() and 0 in out.stride():
            raise ValueError(f"dst[{t}] has a zero stride (an expanded tensor): its elements would be written "
                             "by several programs at once")
    _check_no_overlap(dst, [s for row in src for s in row])


def _memory_span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range a tensor's elements occupy (a superset for strided views)."""
    start = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    return start, start + (last + 1) * t.element_size()


def _check_no_overlap(dst: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """Outputs must not overlap any source: the map is not in place.  Views whose byte ranges intersect (such
    as interleaved column slices of one tensor) are compared element by element, so disjoint ones pass."""
    spans = [(_memory_span(s), s) for s in sources if s.numel()]
    for t, out in enumerate(dst):
        if not out.numel():
            continue
        lo, hi = _memory_span(out)
        for (s_lo, s_hi), source in spans:
            if lo < s_hi and s_lo < hi and _elements_overlap(out, source):
                raise ValueError(f"dst[{t}] overlaps a source tensor: the map cannot run in place")


def _elements_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage share an element (exact, for views whose byte ranges intersect)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def offsets(t):
        index = torch.zeros((), dtype=torch.int64)
        for size, stride in zip(t.shape, t.stride()):
            index = index.unsqueeze(-1) + torch.arange(size) * stride
        return set((index.flatten() * t.element_size() + t.data_ptr()).tolist())

    return bool(offsets(a) & offsets(b))


@torch.library.custom_op("growlib::structured_map_", mutates_args=("dst",))
def _structured_map_op(dst: list[torch.Tensor], src: list[torch.Tensor], depth_weight: torch.Tensor,
                       row_start: torch.Tensor, col_start: torch.Tensor, table_index: torch.Tensor,
                       table_weight: torch.Tensor, alpha: float, blend: bool, rms: bool, backend: str) -> None:
    kd = depth_weight.shape[1]
    nested = [src[t * kd:(t + 1) * kd] for t in range(len(dst))]
    if backend == "triton":
        from growlib.kernels import structured_map as kernel
        impl = kernel.structured_map
    else:
        impl = reference.structured_map
    impl(dst, nested, depth_weight, row_start, col_start, table_index, table_weight,
         alpha=alpha if blend else None, rms=rms)


@_structured_map_op.register_fake
def _(dst, src, depth_weight, row_start, col_start, table_index, table_weight, alpha, blend, rms, backend):
    return None


def structured_map_(
    dst: Sequence[torch.Tensor],
    src: Sequence[Sequence[torch.Tensor]],
    depth_weight: torch.Tensor,
    row_start: torch.Tensor,
    col_start: torch.Tensor,
    table_index: torch.Tensor,
    table_weight: torch.Tensor,
    *,
    alpha: float | None = None,
    rms: bool = False,
) -> None:
    """Apply a structured map to many tensors at once, writing ``dst`` in place (see kernels/structured_map.py).

    With ``alpha`` the result is blended into dst: ``dst = (1 - alpha) * dst + alpha * mapped``.  With
    ``rms`` the inputs are non-negative second moments mapped through their square roots."""
    _validate_structured_map(dst, src, depth_weight, row_start, col_start, table_index, table_weight, alpha)
    backend = resolve_backend(dst[0].device)
    if backend == "triton":
        from growlib.kernels.structured_map import SUPPORTED_DTYPES
        for name, dtype in (("dst", dst[0].dtype), ("src", src[0][0].dtype)):
            if dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"the Triton backend supports {SUPPORTED_DTYPES} for {name}, got {dtype}; "
                                "use backend 'torch' for other dtypes")
    flat_src = [s for row in src for s in row]
    _structured_map_op(list(dst), flat_src, depth_weight, row_start, col_start, table_index, table_weight,
                       0.0 if alpha is None else float(alpha), alpha is not None, rms, backend)
