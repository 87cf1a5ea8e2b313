"""Bias + activation, and gated (GLU) activations, as one elementwise pass over a matmul's output.

``bias_activation``:   out = act(x + bias)                          x: (M, N)
``gated_activation``:  out = act(g + bias[:N]) * (u + bias[N:])     x: (M, 2N) = [g | u], out: (M, N)

The gated form reads the output of one fused gate+up matmul (SwiGLU is ``act='silu'``), so the MLP's
intermediate is read once and written once at half the width.  Activations, computed in fp32:

* ``gelu``       x * Phi(x) with the exact erf (BERT, ViT: HF ``gelu``);
* ``gelu_tanh``  the tanh approximation (GPT-2: HF ``gelu_new`` / ``gelu_pytorch_tanh`` / ``gelu_fast``),
  written as x * sigmoid(2z) through exp, so it needs no libdevice tanh;
* ``silu``       x * sigmoid(x);
* ``relu``.

This module holds the ops whole: the Triton kernel and its launchers ``bias_activation_triton`` /
``gated_activation_triton``, the PyTorch references ``bias_activation_reference`` / ``gated_activation_reference``,
and the public ``bias_activation`` / ``gated_activation`` (validation, backend dispatch, the custom op
``growlib::fused_activation``).  Tests: tests/kernels/test_activation.py; benchmark: perf/bench_frozen.py.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from growlib.kernels import launch
from growlib.kernels.backend import compute_dtype
from growlib.kernels.frozen.checks import as_rows, check_forward_only, check_last_axis, check_vector, fused_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
_ACTIVATION_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 0:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # 0.5 * (1 + tanh(z)) = sigmoid(2z): no libdevice tanh, no cancellation where tanh(z) is near -1, and
        # exp overflowing to inf still gives the right limit.
        y = x / (1.0 + tl.exp(-2.0 * inner))
    elif ACT == 2:
        y = x / (1.0 + tl.exp(-x))
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _activation_kernel(
    x_ptr, b_ptr, out_ptr,
    n_rows, n_cols,
    stride_x, stride_out,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < n_cols
    ok = (rows < n_rows)[:, None] & col_ok[None, :]
    at = x_ptr + rows[:, None] * stride_x + cols[None, :]

    x = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = _activate(x, ACT)
    if GATED:
        up = tl.load(at + n_cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            up += tl.load(b_ptr + n_cols + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = y * up
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def launch_config() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 16 x 256 tiles, 4k elements a program, over 8 warps: 16 elements a
    thread keep it near 80 registers (over 4 warps the gated GELU took 145 and ptxas spilled the fp16 gated
    ReLU on sm_90).  Elementwise, no shared memory to speak of: one choice suits every GPU
    (tests/kernels/test_launch_configs.py compiles every variant for sm_80/90 and checks)."""
    return 16, 256, 8


def _launch(x: torch.Tensor, bias: torch.Tensor | None, activation: str, gated: bool) -> torch.Tensor:
    n_rows = x.shape[0]
    n_cols = x.shape[1] // 2 if gated else x.shape[1]
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_n, num_warps = launch_config()
    grid = (launch.ceil_div(n_rows, block_m), launch.ceil_div(n_cols, block_n))
    launch.note("gated_activation" if gated else "bias_activation", dtype=str(x.dtype).removeprefix("torch."),
                ACT=activation, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _activation_kernel[grid](
            x, bias if bias is not None else x, out,
            n_rows, n_cols, x.stride(0), out.stride(0),
            ACT=_ACTIVATION_CODE[activation], HAS_BIAS=bias is not None, GATED=gated,
            BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return out


def bias_activation_triton(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(x + bias) for 2-D ``x`` (rows may be strided, columns contiguous) and ``bias`` of length N or None.
    Callers validate (the public function below does)."""
    return _launch(x, bias, activation, gated=False)


def gated_activation_triton(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(gate) * up for 2-D ``x = [gate | up]`` of width 2N and ``bias`` of length 2N or None; returns
    (M, N).  Callers validate (the public function below does)."""
    return _launch(x, bias, activation, gated=True)

# ----------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------

def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The activations of the kernel (gelu, gelu_tanh, silu, relu)."""
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"activation must be one of gelu, gelu_tanh, silu, relu, got {name!r}")


def bias_activation_reference(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Reference of ``bias_activation_triton``: act(x + bias), in x's dtype."""
    y = x.to(compute_dtype(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return apply_activation(y, activation).to(x.dtype)


def gated_activation_reference(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Reference of ``gated_activation_triton``: for ``x = [gate | up]`` (last axis
    2N), act(gate) * up (biases added first), in x's dtype."""
    y = x.to(compute_dtype(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    gate, up = y.chunk(2, dim=-1)
    return (apply_activation(gate, activation) * up).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# The op: validation, backend dispatch, torch.library registration
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("growlib::fused_activation", mutates_args=())
def _activation_op(x: torch.Tensor, bias: torch.Tensor | None, activation: str, gated: bool,
                   backend: str) -> torch.Tensor:
    if backend == "triton":
        impl = gated_activation_triton if gated else bias_activation_triton
    else:
        impl = gated_activation_reference if gated else bias_activation_reference
    return impl(x, bias, activation)


@_activation_op.register_fake
def _(x, bias, activation, gated, backend):
    return x.new_empty((x.shape[0], x.shape[1] // 2 if gated else x.shape[1]))


def _activation(op: str, x, bias, activation: str, gated: bool) -> torch.Tensor:
    n = check_last_axis("x", x)
    if gated and n % 2:
        raise ValueError(f"x's last axis must be even ([gate | up] halves), got {n}")
    bias = check_vector("bias", bias, n, x.device, "x's last axis")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_forward_only(op, x=x, bias=bias)
    out = _activation_op(as_rows(x), bias, activation, gated, fused_backend(x, "x"))
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
