"""LayerNorm / RMSNorm with the residual add folded in: one read of each input, one write of each output.

For rows ``x`` (and optionally ``residual``) of width N::

    s   = x + residual                                  (fp32)
    out = (s - mean(s)) / sqrt(var(s) + eps) * w + b    LayerNorm
    out = s / sqrt(mean(s^2) + eps) * w (+ b)           RMSNorm

and, on request, ``s`` itself is written too: a pre-LN block needs the new residual stream and the
normalised input of its next branch, and computing both in one pass saves a full read and write of the
hidden states per branch.  The statistics come from the fp32 sum, before it is rounded to the storage dtype.

One program normalises BLOCK_M whole rows (BLOCK_N >= N, a power of two), so a row is read once.

This module holds the op whole: the Triton kernel and its launcher ``add_norm_triton``, the PyTorch reference
``add_norm_reference``, and the public ``add_norm`` (validation, backend dispatch, the custom op
``growlib::add_norm``).  Tests: tests/kernels/test_add_norm.py; benchmark: perf/bench_frozen.py.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from growlib.kernels import launch
from growlib.kernels.backend import compute_dtype
from growlib.kernels.frozen.checks import (as_rows, check_floating_tensor, check_forward_only, check_last_axis,
                                          check_vector, fused_backend)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 16384  # one row must fit in a program's registers


@triton.jit
def _add_norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr,
    n_rows, n_cols,
    stride_x, stride_res, stride_out, stride_sum,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_SUM: tl.constexpr, RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]

    s = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if STORE_SUM:
        tl.store(sum_ptr + rows[:, None] * stride_sum + cols[None, :], s.to(sum_ptr.dtype.element_ty), mask=ok)

    if RMS:
        centred = s
    else:
        mean = tl.sum(s, axis=1) / n_cols
        centred = tl.where(ok, s - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / n_cols
    y = centred * tl.rsqrt(var + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, about 4k elements a program (fewer programs under the
    interpreter, enough work per program on the GPU).  Only the row reductions use shared memory (a few KB),
    so one choice suits every GPU (tests/kernels/test_launch_configs.py compiles the widest for sm_80/90)."""
    block_n = triton.next_power_of_2(max(n_cols, 1))
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = max(1, min(16, block_m * block_n // 512))
    return block_m, block_n, num_warps


def add_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    return_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """norm(x + residual) over the last axis of 2-D ``x`` (rows may be strided, columns contiguous).

    Returns ``(out, sum)``, ``sum`` being ``x + residual`` in x's dtype when ``return_sum`` (else None).
    Callers validate (the public function below does): same dtype and device, ``weight`` / ``bias`` of length N."""
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if return_sum else None
    if n_rows == 0 or n_cols == 0:
        return out, summed
    block_m, block_n, num_warps = launch_config(n_cols)
    launch.note("add_norm", dtype=str(x.dtype).removeprefix("torch."), RMS=rms, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=num_warps)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _add_norm_kernel[(launch.ceil_div(n_rows, block_m),)](
            x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, out, summed if summed is not None else out,
            n_rows, n_cols,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            summed.stride(0) if summed is not None else 0,
            float(eps),
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            STORE_SUM=return_sum, RMS=rms,
            BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return out, summed

# ----------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------

def add_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float, rms: bool,
             return_sum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of ``add_norm_triton``: LayerNorm (or RMSNorm) of ``x + residual`` over
    the last axis, statistics taken from the unrounded sum; returns (out, sum or None) in x's dtype."""
    compute = compute_dtype(x.dtype)
    s = x.to(compute)
    if residual is not None:
        s = s + residual.to(compute)
    centred = s if rms else s - s.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype), (s.to(x.dtype, copy=True) if return_sum else None)


# ----------------------------------------------------------------------------------------------------------
# The op: validation, backend dispatch, torch.library registration
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("growlib::add_norm", mutates_args=())
def _add_norm_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float, rms: bool, return_sum: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        impl = add_norm_triton
    else:
        impl = add_norm_reference
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
    ``MAX_WIDTH``), any floating dtype on the torch one; ``residual`` of x's shape and
    dtype; ``weight`` / ``bias`` of x's last axis, any floating dtype.  Outputs in x's dtype.  Forward-only:
    no backward, and inputs that require grad are refused while grad is enabled."""
    n = check_last_axis("x", x)
    if residual is not None:
        check_floating_tensor("residual", residual, x.device)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x: expected {x.dtype} {tuple(x.shape)}, got {residual.dtype} "
                             f"{tuple(residual.shape)}")
    weight = check_vector("weight", weight, n, x.device, "x's last axis")
    bias = check_vector("bias", bias, n, x.device, "x's last axis")
    if not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    check_forward_only("add_norm", x=x, residual=residual, weight=weight, bias=bias)
    backend = fused_backend(x, "x")
    if backend == "triton":
        if n > MAX_WIDTH:
            raise ValueError(f"x's last axis ({n}) is wider than the Triton norm kernel's {MAX_WIDTH} (a row is "
                             "held in one program): use backend 'torch'")
    out, summed = _add_norm_op(as_rows(x), None if residual is None else as_rows(residual), weight, bias, float(eps),
                               bool(rms), bool(return_sum), backend)
    if return_sum:
        return out.view(x.shape), summed.view(x.shape)
    return out.view(x.shape)
