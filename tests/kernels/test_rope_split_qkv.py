"""rope_split_qkv, the frozen layers' fused QKV split + rotary embedding (interpreter on CPU), against its
PyTorch reference.

The value cases live in growlib.kernels.cases, shared with ``growlib check-kernels``: awkward shapes (a single
row or element, prime sizes, widths just over a block, row counts just over a row block, strided inputs), fp32
judged against the fp64 reference and fp16 / bf16 by the three-way rule.
Here also: HF's apply_rotary_pos_emb itself, and input validation."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib.kernels import cases as kernel_cases
from tests.conftest import DEVICE

def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return kernel_cases.randn(*shape, seed=seed, scale=scale, dtype=dtype, device=DEVICE)


def rotary_tables(batch, seq, head_dim, seed):
    return kernel_cases.rotary_tables(batch, seq, head_dim, seed, DEVICE)


def run(backend, fn, *args, **kwargs):
    with growlib.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", kernel_cases.cases_for("rope_split_qkv"), ids=lambda case: case.id)
def test_kernel_matches_reference(case):
    assert not kernel_cases.failures(case.run(DEVICE))


def test_rope_matches_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq, heads, kv_heads, head_dim = 2, 7, 4, 2, 16
    qkv = randn(batch, seq, (heads + 2 * kv_heads) * head_dim, seed=23)
    cos, sin = rotary_tables(batch, seq, head_dim, seed=24)
    q, k, _ = run("triton", growlib.rope_split_qkv, qkv, cos, sin, num_heads=heads, num_kv_heads=kv_heads)
    split = qkv.reshape(batch, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(split[:, :heads], split[:, heads:heads + kv_heads], cos, sin)
    assert torch.allclose(q, q_hf, atol=1e-6) and torch.allclose(k, k_hf, atol=1e-6)


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="qkv's last axis"):
        growlib.rope_split_qkv(randn(1, 3, 21, seed=33), *rotary_tables(1, 3, 4, seed=34), num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="cos must have shape"):
        growlib.rope_split_qkv(randn(1, 3, 16, seed=33), *rotary_tables(1, 4, 4, seed=34), num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads must be an int >= 1"):
        growlib.rope_split_qkv(randn(1, 3, 16, seed=33), *rotary_tables(1, 3, 4, seed=34), num_heads=4, num_kv_heads=0)
