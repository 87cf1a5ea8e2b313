"""QKV split + rotary position embedding in one pass over a fused QKV projection's output.

A row of ``qkv`` (one token) holds H query heads, then KV key heads, then KV value heads, each of D values.
The kernel writes all of them into one (B, H + 2 KV, S, D) buffer, the layout scaled-dot-product attention
reads, rotating query and key heads on the way (HF's ``rotate_half`` convention)::

    out[..., j]       = x[j] * cos[j]         - x[j + D/2] * sin[j]
    out[..., j + D/2] = x[j + D/2] * cos[j + D/2] + x[j] * sin[j + D/2]        (0 <= j < D/2)

and copying value heads unchanged.  ``cos`` / ``sin`` are (B or 1, S, D), as a model's rotary embedding
returns them, so scaled RoPE variants (linear, dynamic, llama3, ...) come for free.  One program handles one
token and a block of heads.

This module holds the op whole: the Triton kernel and its launcher ``rope_split_qkv_triton``, the PyTorch
reference ``rope_split_qkv_reference``, and the public ``rope_split_qkv`` (validation, backend dispatch, the
custom op ``growlib::rope_split_qkv``).  Tests: tests/kernels/test_rope_split_qkv.py; benchmark:
perf/bench_frozen.py.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from growlib.kernels import launch
from growlib.kernels.backend import compute_dtype
from growlib.kernels.frozen.checks import check_floating_tensor, check_forward_only, fused_backend
from growlib.validate import require_int

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rope_split_kernel(
    qkv_ptr, cos_ptr, sin_ptr, out_ptr,
    seq_len, n_heads, n_rotated, half,
    stride_qkv, stride_cos_b, stride_cos_s, stride_sin_b, stride_sin_s,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    heads = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF).to(tl.int64)
    j_ok = j < half
    ok = (heads < n_heads)[:, None] & j_ok[None, :]
    head_dim = 2 * half

    src = qkv_ptr + token * stride_qkv + heads[:, None] * head_dim + j[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=ok, other=0.0).to(tl.float32)
    cos_at = cos_ptr + b * stride_cos_b + s * stride_cos_s + j
    sin_at = sin_ptr + b * stride_sin_b + s * stride_sin_s + j
    cos1 = tl.load(cos_at, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_at + half, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_at, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_at + half, mask=j_ok, other=0.0).to(tl.float32)[None, :]

    rotated = (heads < n_rotated)[:, None]
    y1 = tl.where(rotated, x1 * cos1 - x2 * sin1, x1)
    y2 = tl.where(rotated, x2 * cos2 + x1 * sin2, x2)

    dst = out_ptr + ((b * n_heads + heads[:, None]) * seq_len + s) * head_dim + j[None, :]
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + half, y2.to(out_ptr.dtype.element_ty), mask=ok)


def launch_config(n_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): a program covers a whole rotary half (a power of two >= D / 2) of up
    to 2048 / BLOCK_HALF heads.  Elementwise, no shared memory to speak of: one choice suits every GPU
    (tests/kernels/test_launch_configs.py compiles it for sm_80/90)."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = max(1, min(triton.next_power_of_2(n_heads), 2048 // block_half))
    return block_h, block_half, 4


def rope_split_qkv_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> torch.Tensor:
    """Rotate and split (B, S, (H + 2 KV) * D) ``qkv`` (tokens may be strided, features contiguous) into a
    contiguous (B, H + 2 KV, S, D) tensor; ``cos`` / ``sin`` are (B or 1, S, D) with contiguous last axis.
    Callers validate (the public function below does) and slice q, k, v out of the result."""
    batch, seq_len, width = qkv.shape
    n_heads = num_heads + 2 * num_kv_heads
    head_dim = width // n_heads
    out = torch.empty((batch, n_heads, seq_len, head_dim), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out
    rows = qkv.reshape(batch * seq_len, width)  # a view whenever tokens are evenly strided
    half = head_dim // 2
    block_h, block_half, num_warps = launch_config(n_heads, head_dim)
    launch.note("rope_split_qkv", dtype=str(qkv.dtype).removeprefix("torch."), BLOCK_H=block_h,
                BLOCK_HALF=block_half, num_warps=num_warps)

    def batch_stride(t):
        return 0 if t.shape[0] == 1 else t.stride(0)

    with torch.cuda.device(qkv.device) if qkv.device.type == "cuda" else contextlib.nullcontext():
        _rope_split_kernel[(batch * seq_len, launch.ceil_div(n_heads, block_h))](
            rows, cos, sin, out,
            seq_len, n_heads, num_heads + num_kv_heads, half,
            rows.stride(0), batch_stride(cos), cos.stride(1), batch_stride(sin), sin.stride(1),
            BLOCK_H=block_h, BLOCK_HALF=block_half,
            num_warps=num_warps,
        )
    return out

# ----------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------

def rope_split_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> torch.Tensor:
    """Reference of ``rope_split_qkv_triton``: (B, S, (H + 2 KV) * D) -> (B, H + 2 KV, S, D),
    query and key heads rotated with HF's ``rotate_half`` convention, value heads copied."""
    compute = compute_dtype(qkv.dtype)
    batch, seq_len, width = qkv.shape
    n_heads = num_heads + 2 * num_kv_heads
    heads = qkv.to(compute).reshape(batch, seq_len, n_heads, width // n_heads).transpose(1, 2)
    rotated = num_heads + num_kv_heads
    x = heads[:, :rotated]
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    x = x * cos.to(compute).unsqueeze(1) + turned * sin.to(compute).unsqueeze(1)
    return torch.cat((x, heads[:, rotated:]), dim=1).to(qkv.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------
# The op: validation, backend dispatch, torch.library registration
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("growlib::rope_split_qkv", mutates_args=())
def _rope_split_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                   backend: str) -> torch.Tensor:
    if backend == "triton":
        impl = rope_split_qkv_triton
    else:
        impl = rope_split_qkv_reference
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
    check_floating_tensor("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D (batch, seq, (heads + 2 * kv_heads) * head_dim), got shape "
                         f"{tuple(qkv.shape)}")
    require_int("num_heads", num_heads)
    require_int("num_kv_heads", num_kv_heads)
    batch, seq_len, width = qkv.shape
    n_heads = num_heads + 2 * num_kv_heads
    if width % n_heads:
        raise ValueError(f"qkv's last axis ({width}) must be (num_heads + 2 * num_kv_heads) = {n_heads} heads of "
                         "one head size")
    head_dim = width // n_heads
    if head_dim % 2:
        raise ValueError(f"the head size must be even for rotary embeddings, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_floating_tensor(name, t, qkv.device)
        if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq_len, head_dim):
            raise ValueError(f"{name} must have shape ({batch} or 1, {seq_len}, {head_dim}) (batch, seq, head_dim), "
                             f"got {tuple(t.shape)}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    check_forward_only("rope_split_qkv", qkv=qkv, cos=cos, sin=sin)
    heads = _rope_split_op(qkv, cos, sin, num_heads, num_kv_heads, fused_backend(qkv, "qkv"))
    rotated = num_heads + num_kv_heads
    return heads[:, :num_heads], heads[:, num_heads:rotated], heads[:, rotated:]
