"""QKV split + rotary position embedding in one pass over a fused QKV projection's output.

A row of ``qkv`` (one token) holds H query heads, then KV key heads, then KV value heads, each of D values.
The kernel writes all of them into one (B, H + 2 KV, S, D) buffer, the layout scaled-dot-product attention
reads, rotating query and key heads on the way (HF's ``rotate_half`` convention)::

    out[..., j]       = x[j] * cos[j]         - x[j + D/2] * sin[j]
    out[..., j + D/2] = x[j + D/2] * cos[j + D/2] + x[j] * sin[j + D/2]        (0 <= j < D/2)

and copying value heads unchanged.  ``cos`` / ``sin`` are (B or 1, S, D), as a model's rotary embedding
returns them, so scaled RoPE variants (linear, dynamic, llama3, ...) come for free.  One program handles one
token and a block of heads.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from growlib.kernels import launch

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


def rope_split_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> torch.Tensor:
    """Rotate and split (B, S, (H + 2 KV) * D) ``qkv`` (tokens may be strided, features contiguous) into a
    contiguous (B, H + 2 KV, S, D) tensor; ``cos`` / ``sin`` are (B or 1, S, D) with contiguous last axis.
    Callers validate (growlib.ops does) and slice q, k, v out of the result."""
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
        _rope_split_kernel[(batch * seq_len, triton.cdiv(n_heads, block_h))](
            rows, cos, sin, out,
            seq_len, n_heads, num_heads + num_kv_heads, half,
            rows.stride(0), batch_stride(cos), cos.stride(1), batch_stride(sin), sin.stride(1),
            BLOCK_H=block_h, BLOCK_HALF=block_half,
            num_warps=num_warps,
        )
    return out
