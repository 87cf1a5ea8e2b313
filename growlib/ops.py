"""The one entry point to every kernel: input validation, backend dispatch, torch.library registration.

Backend policy (env ``GROWLIB_BACKEND`` or ``with growlib.use_backend(...)``):

* ``auto``   Triton for CUDA tensors, the PyTorch reference (growlib.reference) for CPU tensors;
* ``triton`` always Triton; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter);
* ``torch``  always the PyTorch reference.

Kernel entry points (the README's Kernels section tabulates them): ``structured_map_`` (in place, no
backward), ``kron_expand`` / ``kron_expand_vector`` (differentiable), and the forward-only fused ops of frozen
layers ``add_norm``, ``bias_activation``, ``gated_activation``, ``rope_split_qkv``.  Each docstring gives the
shapes, the dtypes each backend accepts and whether there is a backward.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Sequence

import torch

from growlib import reference

__all__ = ["BACKENDS", "current_backend", "use_backend", "resolve_backend", "interpreting",
           "structured_map_", "kron_expand", "kron_expand_vector", "add_norm", "bias_activation", "gated_activation",
           "rope_split_qkv"]

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
    """Whether Triton runs through its interpreter (``TRITON_INTERPRET=1``), which lets it take CPU tensors."""
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
    if device.type == "meta":
        raise ValueError("dst is on the meta device, which holds no data: a structured map needs real tensors "
                         "(build the model on a real device)")

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
    ``rms`` the inputs are non-negative second moments mapped through their square roots.

    ``dst``: T 2-D tensors of one dtype; ``src``: KD 2-D tensors of one dtype per dst tensor; both float32,
    float16 or bfloat16 on the Triton backend, any floating dtype on the torch one (arithmetic in fp32, fp64
    for fp64).  ``depth_weight`` (T, KD) float32, ``row_start`` / ``col_start`` (T,) int64, ``table_index`` /
    ``table_weight`` (N, K) int32 / float32, all on dst's device.  No backward: it writes in place, and the
    operators call it under ``torch.no_grad()``."""
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


# ----------------------------------------------------------------------------------------------------------
# Kronecker-factored (LiGO) expansion
# ----------------------------------------------------------------------------------------------------------

_KRON_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _validate_kron(W, E, F, D) -> None:
    """Shapes, dtypes and devices of ``kron_expand`` (F is None for the 1-D form, whose stack is named w)."""
    stack_name, stack_axes, stack_ndim = ("w", "(L1, O1)", 2) if F is None else ("W", "(L1, O1, I1)", 3)
    named = [(stack_name, W), ("E", E), ("D", D)] + ([] if F is None else [("F", F)])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if W.dim() != stack_ndim:
        raise ValueError(f"{stack_name} must be {stack_ndim}-D {stack_axes}, got shape {tuple(W.shape)}")
    if D.dim() != 2 or D.shape[1] != W.shape[0]:
        raise ValueError(f"D must be 2-D (L2, L1) with L1={W.shape[0]} ({stack_name}.shape[0]), got shape "
                         f"{tuple(D.shape)}")
    layers_out = D.shape[0]
    width_maps = [("E", E, "O", 1)] + ([] if F is None else [("F", F, "I", 2)])
    for name, t, axis, stack_axis in width_maps:
        size_in, size_name = W.shape[stack_axis], f"{axis}1={W.shape[stack_axis]} ({stack_name}.shape[{stack_axis}])"
        if t.dim() == 2 and t.shape[1] != size_in:
            raise ValueError(f"{name} must be 2-D ({axis}2, {axis}1) with {size_name}, got shape {tuple(t.shape)}")
        if t.dim() == 3 and (t.shape[0] != layers_out or t.shape[2] != size_in):
            raise ValueError(f"{name} must be 3-D (L2, {axis}2, {axis}1), one map per output layer, with "
                             f"L2={layers_out} (D.shape[0]) and {size_name}, got shape {tuple(t.shape)}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be 2-D ({axis}2, {axis}1), shared by all layers, or 3-D "
                             f"(L2, {axis}2, {axis}1), one map per output layer, got shape {tuple(t.shape)}")
    if W.dtype not in _KRON_DTYPES:
        raise TypeError(f"{stack_name} must be float32, bfloat16 or float64, got {W.dtype}")
    for name, t in named[1:]:
        if t.dtype != W.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {stack_name} has {W.dtype}: all inputs must share "
                            f"one dtype (cast {name} with .to({stack_name}.dtype))")
        if t.device != W.device:
            raise ValueError(f"{name} is on {t.device} but {stack_name} is on {W.device}: all inputs must share "
                             "a device")


def _kron_maps(E, F, D) -> dict[str, torch.Tensor]:
    """The chain's maps by step (kernels/kron_expand.py); no 'cols' step for the 1-D form (F None)."""
    return {"depth": D, "rows": E} if F is None else {"depth": D, "rows": E, "cols": F}


@torch.library.custom_op("growlib::kron_expand", mutates_args=())
def _kron_expand_op(W: torch.Tensor, E: torch.Tensor, F: torch.Tensor | None, D: torch.Tensor) -> list[torch.Tensor]:
    """The Triton expansion of W (L1, O1, I1) (the 1-D form as (L1, O1, 1) with F None), its steps in
    ``cheapest_order``: [out, the input of every step after the first].  Those inputs are what the backward
    needs (as autograd would save them for the same chain of matmuls), so the backward recomputes nothing."""
    from growlib.kernels import kron_expand as kernel
    maps = _kron_maps(E, F, D)
    out, stages = kernel.expand(W, maps, kernel.cheapest_order(W.shape, maps))
    return [out, *stages[1:]]


@_kron_expand_op.register_fake
def _(W, E, F, D):
    from growlib.kernels import kron_expand as kernel
    maps = _kron_maps(E, F, D)
    shapes = kernel.chain_shapes(W.shape, maps, kernel.cheapest_order(W.shape, maps))
    return [W.new_empty(shape) for shape in [shapes[-1], *shapes[1:-1]]]


@torch.library.custom_op("growlib::kron_expand_backward", mutates_args=())
def _kron_expand_backward_op(grad_out: torch.Tensor, stages: list[torch.Tensor], E: torch.Tensor,
                             F: torch.Tensor | None, D: torch.Tensor, wanted: list[bool]) -> list[torch.Tensor]:
    """The Triton backward of ``growlib::kron_expand``: the gradients of those of (W, E, F, D) that ``wanted``
    flags, in that order.  ``stages``: W and the step inputs the forward returned."""
    from growlib.kernels import kron_expand as kernel
    maps = _kron_maps(E, F, D)
    need_W, need_E, need_F, need_D = wanted
    steps = {step for step, need in (("rows", need_E), ("cols", need_F), ("depth", need_D)) if need}
    grad_W, grads = kernel.expand_backward(grad_out, stages, maps, kernel.cheapest_order(stages[0].shape, maps),
                                           steps, need_W)
    computed = (grad_W, grads.get("rows"), grads.get("cols"), grads.get("depth"))
    return [grad for grad, need in zip(computed, wanted) if need]


@_kron_expand_backward_op.register_fake
def _(grad_out, stages, E, F, D, wanted):
    return [t.new_empty(t.shape) for t, need in zip((stages[0], E, F, D), wanted) if need]


def _kron_setup_context(ctx, inputs, output) -> None:
    W, E, F, D = inputs
    ctx.mark_non_differentiable(*output[1:])  # the saved step inputs are returned only for the backward
    ctx.save_for_backward(W, *output[1:], E, F, D)


def _kron_backward(ctx, grads):
    W, *step_inputs, E, F, D = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad)  # F is None for the 1-D form and never needs one
    computed = iter(torch.ops.growlib.kron_expand_backward(grads[0], [W, *step_inputs], E, F, D, wanted))
    return tuple(next(computed) if need else None for need in wanted)


def _kron_no_double_backward(ctx, grads):
    raise RuntimeError("kron_expand's Triton backward is not differentiable itself (no double backward): use "
                       "backend 'torch' for higher-order gradients")


_kron_expand_op.register_autograd(_kron_backward, setup_context=_kron_setup_context)
_kron_expand_backward_op.register_autograd(_kron_no_double_backward)


def _kron_dispatch(W, E, F, D) -> torch.Tensor:
    _validate_kron(W, E, F, D)
    if resolve_backend(W.device) == "torch":
        if F is None:
            return reference.kron_expand_vector(W, E, D)
        return reference.kron_expand(W, E, F, D)
    from growlib.kernels.kron_expand import SUPPORTED_DTYPES
    if W.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton backend supports {SUPPORTED_DTYPES} for {'w' if F is None else 'W'}, got "
                        f"{W.dtype}; use backend 'torch' for other dtypes")
    if F is None:
        return _kron_expand_op(W.unsqueeze(-1), E, None, D)[0].squeeze(-1)
    return _kron_expand_op(W, E, F, D)[0]


def kron_expand(W: torch.Tensor, E: torch.Tensor, F: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """LiGO's Kronecker-factored expansion of one tensor name stacked over layers:
    ``out[l] = E_l (sum_j D[l, j] W[j]) F_l^T``, in one chain of batched GEMMs however many layers there are.

    W (L1, O1, I1), D (L2, L1), E (O2, O1) shared by all output layers or (L2, O2, O1) one per output layer,
    F likewise (I2, I1) or (L2, I2, I1); all of one dtype (float32 or bfloat16; float64 on the torch backend)
    and one device -> (L2, O2, I2) in that dtype.  Differentiable with respect to all four (the Triton
    backend's backward once, the torch backend's to any order).  The Triton backend is the custom op
    ``growlib::kron_expand`` (with ``growlib::kron_expand_backward``), so ``torch.compile`` keeps it whole."""
    return _kron_dispatch(W, E, F, D)


def kron_expand_vector(w: torch.Tensor, E: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The 1-D form of ``kron_expand`` for biases and norms: ``out[l] = E_l sum_j D[l, j] w[j]``.

    w (L1, O1), D (L2, L1), E (O2, O1) or (L2, O2, O1) -> (L2, O2).  Dtypes and backward as ``kron_expand``:
    differentiable with respect to all three."""
    return _kron_dispatch(w, E, None, D)


# ----------------------------------------------------------------------------------------------------------
# Forward-only fused blocks for frozen layers (growlib.frozen)
# ----------------------------------------------------------------------------------------------------------

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")


def _check_floating_tensor(name: str, t, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}: all tensors must share a device")


def _check_vector(name: str, t, size: int, device: torch.device, what: str) -> torch.Tensor | None:
    """An optional per-feature vector (norm weight, bias) of length ``size``, made contiguous."""
    if t is None:
        return None
    _check_floating_tensor(name, t, device)
    if tuple(t.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},) ({what}), got {tuple(t.shape)}")
    return t.contiguous()


def _check_forward_only(op: str, **tensors) -> None:
    """These ops have no backward: refuse to silently cut a graph that autograd is recording."""
    if torch.is_grad_enabled():
        needing = [name for name, t in tensors.items() if t is not None and t.requires_grad]
        if needing:
            raise RuntimeError(f"{op} is forward-only (it has no backward), but {', '.join(needing)} requires grad: "
                               "call it under torch.no_grad() / torch.inference_mode(), or detach the inputs")


def _fused_backend(x: torch.Tensor, name: str) -> str:
    backend = resolve_backend(x.device)
    if backend == "triton" and x.dtype not in FUSED_DTYPES:
        raise TypeError(f"the Triton backend supports {FUSED_DTYPES} for {name}, got {x.dtype}; use backend "
                        "'torch' for other dtypes")
    return backend


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, last axis) with contiguous columns: a view whenever the layout allows one."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_last_axis(name: str, x) -> int:
    _check_floating_tensor(name, x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last axis, got shape {tuple(x.shape)}")
    return x.shape[-1]


@torch.library.custom_op("growlib::add_norm", mutates_args=())
def _add_norm_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float, rms: bool, return_sum: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from growlib.kernels import fused_norm as kernel
        impl = kernel.add_norm
    else:
        impl = reference.add_norm
    out, summed = impl(x, residual, weight, bias, eps, rms, return_sum)
    return out, summed if summed is not None else x.new_empty(0)


@_add_norm_op.register_fake
def _(x, residual, weight, bias, eps, rms, return_sum, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape if return_sum else (0,))


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    rms: bool = False,
    return_sum: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (or, with ``rms``, RMSNorm) of ``x + residual`` over the last axis, in one pass.

    Returns ``out``, or with ``return_sum`` ``(out, x + residual)``: a pre-LN block gets its new residual
    stream and the normalised input of its next branch from one read of both.  Statistics are taken in fp32
    from the unrounded sum.  ``eps`` defaults to ``torch.nn.LayerNorm``'s; HF layers pass their config's
    (Llama 1e-6, BERT 1e-12).  ``x`` float32, float16 or bfloat16 on the Triton backend (last axis at most
    ``kernels.fused_norm.MAX_WIDTH``), any floating dtype on the torch one; ``residual`` of x's shape and
    dtype; ``weight`` / ``bias`` of x's last axis, any floating dtype.  Outputs in x's dtype.  Forward-only:
    no backward, and inputs that require grad are refused while grad is enabled (see kernels/fused_norm.py)."""
    n = _check_last_axis("x", x)
    if residual is not None:
        _check_floating_tensor("residual", residual, x.device)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x: expected {x.dtype} {tuple(x.shape)}, got {residual.dtype} "
                             f"{tuple(residual.shape)}")
    weight = _check_vector("weight", weight, n, x.device, "x's last axis")
    bias = _check_vector("bias", bias, n, x.device, "x's last axis")
    if not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _check_forward_only("add_norm", x=x, residual=residual, weight=weight, bias=bias)
    backend = _fused_backend(x, "x")
    if backend == "triton":
        from growlib.kernels.fused_norm import MAX_WIDTH
        if n > MAX_WIDTH:
            raise ValueError(f"x's last axis ({n}) is wider than the Triton norm kernel's {MAX_WIDTH} (a row is "
                             "held in one program): use backend 'torch'")
    out, summed = _add_norm_op(_rows(x), None if residual is None else _rows(residual), weight, bias, float(eps),
                               bool(rms), bool(return_sum), backend)
    if return_sum:
        return out.view(x.shape), summed.view(x.shape)
    return out.view(x.shape)


@torch.library.custom_op("growlib::fused_activation", mutates_args=())
def _activation_op(x: torch.Tensor, bias: torch.Tensor | None, activation: str, gated: bool,
                   backend: str) -> torch.Tensor:
    if backend == "triton":
        from growlib.kernels import fused_activation as kernel
        impl = kernel.gated_activation if gated else kernel.bias_activation
    else:
        impl = reference.gated_activation if gated else reference.bias_activation
    return impl(x, bias, activation)


@_activation_op.register_fake
def _(x, bias, activation, gated, backend):
    return x.new_empty((x.shape[0], x.shape[1] // 2 if gated else x.shape[1]))


def _activation(op: str, x, bias, activation: str, gated: bool) -> torch.Tensor:
    n = _check_last_axis("x", x)
    if gated and n % 2:
        raise ValueError(f"x's last axis must be even ([gate | up] halves), got {n}")
    bias = _check_vector("bias", bias, n, x.device, "x's last axis")
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {FUSED_ACTIVATIONS}, got {activation!r}")
    _check_forward_only(op, x=x, bias=bias)
    out = _activation_op(_rows(x), bias, activation, gated, _fused_backend(x, "x"))
    return out.view(*x.shape[:-1], out.shape[-1])


def bias_activation(x: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str) -> torch.Tensor:
    """``act(x + bias)`` in one elementwise pass (the epilogue of an MLP's first matmul).  ``activation`` is
    'gelu' (exact erf), 'gelu_tanh' (GPT-2's gelu_new), 'silu' or 'relu'.  ``x`` float32, float16 or
    bfloat16 on the Triton backend, any floating dtype on the torch one; ``bias`` of x's last axis; output in
    x's dtype.  Forward-only, like ``add_norm``."""
    return _activation("bias_activation", x, bias, activation, gated=False)


def gated_activation(x: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for ``x = [gate | up]`` (last axis 2N, the output of one fused gate+up matmul), with
    an optional bias of length 2N added first; returns (..., N).  'silu' gives SwiGLU.  Dtypes as
    ``bias_activation``; forward-only."""
    return _activation("gated_activation", x, bias, activation, gated=True)


@torch.library.custom_op("growlib::rope_split_qkv", mutates_args=())
def _rope_split_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                   backend: str) -> torch.Tensor:
    if backend == "triton":
        from growlib.kernels import rope as kernel
        impl = kernel.rope_split_qkv
    else:
        impl = reference.rope_split_qkv
    return impl(qkv, cos, sin, num_heads, num_kv_heads)


@_rope_split_op.register_fake
def _(qkv, cos, sin, num_heads, num_kv_heads, backend):
    n_heads = num_heads + 2 * num_kv_heads
    return qkv.new_empty((qkv.shape[0], n_heads, qkv.shape[1], qkv.shape[2] // n_heads))


def rope_split_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int,
                   num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused QKV projection's output (B, S, (H + 2 KV) * D) into q (B, H, S, D) and k, v (B, KV, S, D),
    rotating q and k by ``cos`` / ``sin`` (B or 1, S, D) as HF's ``apply_rotary_pos_emb`` does, in one pass.
    q, k and v are views of one contiguous (B, H + 2 KV, S, D) tensor, in qkv's dtype: float32, float16 or
    bfloat16 on the Triton backend, any floating dtype on the torch one (cos / sin any floating dtype).
    Forward-only, like ``add_norm``."""
    _check_floating_tensor("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D (batch, seq, (heads + 2 * kv_heads) * head_dim), got shape "
                         f"{tuple(qkv.shape)}")
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    batch, seq_len, width = qkv.shape
    n_heads = num_heads + 2 * num_kv_heads
    if width % n_heads:
        raise ValueError(f"qkv's last axis ({width}) must be (num_heads + 2 * num_kv_heads) = {n_heads} heads of "
                         "one head size")
    head_dim = width // n_heads
    if head_dim % 2:
        raise ValueError(f"the head size must be even for rotary embeddings, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check_floating_tensor(name, t, qkv.device)
        if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq_len, head_dim):
            raise ValueError(f"{name} must have shape ({batch} or 1, {seq_len}, {head_dim}) (batch, seq, head_dim), "
                             f"got {tuple(t.shape)}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    _check_forward_only("rope_split_qkv", qkv=qkv, cos=cos, sin=sin)
    heads = _rope_split_op(qkv, cos, sin, num_heads, num_kv_heads, _fused_backend(qkv, "qkv"))
    rotated = num_heads + num_kv_heads
    return heads[:, :num_heads], heads[:, num_heads:rotated], heads[:, rotated:]
