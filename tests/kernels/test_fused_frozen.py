"""The forward-only fused kernels of frozen layers (interpreter on CPU) against their PyTorch references.

The value cases live in growlib.kernel_cases, shared with ``growlib check-kernels``: awkward shapes (a single
row or element, prime sizes, widths just over a block (the norm's power-of-two row block, the activation's
256-column tile, a rotary half just over 64), row counts just over a row block, strided inputs), every norm
variant and activation, fp32 judged against the fp64 reference and fp16 / bf16 by the three-way rule.  Here
also: strided rows and eps, the HF activations and rotary embedding themselves, and input validation."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib import kernel_cases, ops, reference
from tests.conftest import DEVICE

# exp(-x) overflowing to inf is how the activations reach their limits; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return kernel_cases.randn(*shape, seed=seed, scale=scale, dtype=dtype, device=DEVICE)


def rotary_tables(batch, seq, head_dim, seed):
    return kernel_cases.rotary_tables(batch, seq, head_dim, seed, DEVICE)


def run(backend, fn, *args, **kwargs):
    with growlib.use_backend(backend):
        return fn(*args, **kwargs)


FUSED_CASES = [case for op in ("add_norm", "bias_activation", "gated_activation", "rope_split_qkv")
               for case in kernel_cases.cases_for(op)]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda case: case.id)
def test_kernel_matches_reference(case):
    assert not kernel_cases.failures(case.run(DEVICE))


# ----------------------------------------------------------------------------------------------------------
# add_norm
# ----------------------------------------------------------------------------------------------------------

def test_add_norm_reads_strided_rows_and_respects_eps():
    """Rows that are column slices of a wider tensor, and an eps large enough to change the result."""
    wide = randn(13, 80, seed=5, scale=0.05)
    x, residual = wide[:, 3:68], wide[:, 10:75]
    weight, bias = randn(65, seed=6), randn(65, seed=7)
    for eps in (1e-6, 1e-2):
        kernel = run("triton", ops.add_norm, x, residual, weight, bias, eps=eps)
        oracle = reference.add_norm(x.double(), residual.double(), weight, bias, eps, False, False)[0]
        assert torch.allclose(kernel.double(), oracle, rtol=1e-5, atol=1e-5)
    small_eps = run("triton", ops.add_norm, x, residual, weight, bias, eps=1e-6)
    assert not torch.allclose(small_eps, kernel, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# bias + activation, gated activation
# ----------------------------------------------------------------------------------------------------------

def test_activations_are_the_hf_ones():
    """gelu is the exact erf form (BERT, ViT), gelu_tanh is GPT-2's gelu_new, silu * up is Llama's SwiGLU."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 401, dtype=torch.float64, device=DEVICE).unsqueeze(0)
    for hf_name, ours in (("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                          ("silu", "silu"), ("relu", "relu")):
        expected = ACT2FN[hf_name](x.float()).double()
        got = run("triton", ops.bias_activation, x.float(), activation=ours).double()
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), hf_name
    gate_up = torch.cat([x, x.flip(-1)], dim=-1).float()
    got = run("triton", ops.gated_activation, gate_up, activation="silu")
    assert torch.allclose(got, torch.nn.functional.silu(x.float()) * x.flip(-1).float(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# QKV split + RoPE
# ----------------------------------------------------------------------------------------------------------

def test_rope_matches_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq, heads, kv_heads, head_dim = 2, 7, 4, 2, 16
    qkv = randn(batch, seq, (heads + 2 * kv_heads) * head_dim, seed=23)
    cos, sin = rotary_tables(batch, seq, head_dim, seed=24)
    q, k, _ = run("triton", ops.rope_split_qkv, qkv, cos, sin, num_heads=heads, num_kv_heads=kv_heads)
    split = qkv.reshape(batch, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(split[:, :heads], split[:, heads:heads + kv_heads], cos, sin)
    assert torch.allclose(q, q_hf, atol=1e-6) and torch.allclose(k, k_hf, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------

def test_errors_name_the_parameter():
    x = randn(4, 8, seed=31)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.add_norm(x, weight=torch.ones(7, device=DEVICE), eps=1e-5)
    with pytest.raises(ValueError, match="residual must match x"):
        ops.add_norm(x, x.double(), eps=1e-5)
    with pytest.raises(ValueError, match="eps must be"):
        ops.add_norm(x, eps=-1.0)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ops.add_norm(x.long(), eps=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.bias_activation(x, activation="quick_gelu")
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_activation(x, torch.ones(9, device=DEVICE), activation="gelu")
    with pytest.raises(ValueError, match="last axis must be even"):
        ops.gated_activation(randn(4, 7, seed=32))
    with pytest.raises(ValueError, match="qkv's last axis"):
        ops.rope_split_qkv(randn(1, 3, 21, seed=33), *rotary_tables(1, 3, 4, seed=34), num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="cos must have shape"):
        ops.rope_split_qkv(randn(1, 3, 16, seed=33), *rotary_tables(1, 4, 4, seed=34), num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        ops.rope_split_qkv(randn(1, 3, 16, seed=33), *rotary_tables(1, 3, 4, seed=34), num_heads=4, num_kv_heads=0)
    with growlib.use_backend("triton"), pytest.raises(TypeError, match="Triton backend supports"):
        ops.bias_activation(x.double(), activation="gelu")


def test_forward_only_ops_refuse_inputs_that_record_a_graph():
    x = randn(4, 8, seed=35).requires_grad_()
    with pytest.raises(RuntimeError, match="forward-only"):
        ops.bias_activation(x, activation="gelu")
    with torch.no_grad():
        assert ops.bias_activation(x, activation="gelu").grad_fn is None
