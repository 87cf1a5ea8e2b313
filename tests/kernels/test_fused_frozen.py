"""The forward-only fused kernels of frozen layers (interpreter on CPU) against their PyTorch references.

Awkward shapes: a single row or element, prime sizes, widths just over a block (the norm's power-of-two row
block, the activation's 256-column tile, a rotary half just over 64), row counts just over a row block, and
strided inputs.  fp32 is compared with the fp64 reference; fp16 / bf16 by the three-way rule against the same
reference run in the input dtype."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib import ops, reference
from tests.conftest import DEVICE

# exp(-x) overflowing to inf is how the activations reach their limits; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Per-dtype tolerance relative to max(1, |ref|).  fp16/bf16 also obey the three-way rule (see assert_matches);
# their tolerance is one unit in the last place, since the interpreter truncates where the GPU rounds.
TOLERANCE = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def run(backend, fn, *args, **kwargs):
    with growlib.use_backend(backend):
        return fn(*args, **kwargs)


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_matches(kernel, dtype, oracle, same_dtype):
    """fp32: |kernel - ref64| <= tol * max(1, |ref64|); fp16/bf16: <= 2 |torch_same_dtype - ref64| + that."""
    for got, exact, torch_got in zip(as_tuple(kernel), as_tuple(oracle), as_tuple(same_dtype)):
        assert got.dtype == dtype and got.shape == exact.shape
        scale = exact.abs().clamp_min(1.0)
        err = (got.double() - exact).abs()
        bound = TOLERANCE[dtype] * scale
        if dtype != torch.float32:
            bound = bound + 2 * (torch_got.double() - exact).abs()
        assert (err <= bound).all(), float((err / scale).max())


def check_op(fn, inputs: dict, dtype, **options):
    """Run ``fn`` on the Triton kernel and on the reference (in dtype and in fp64) and compare them."""
    cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k not in ("cos", "sin") else v)
            for k, v in inputs.items()}  # rotary tables stay fp32, as growlib.frozen passes them
    exact = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in cast.items()}
    kernel = run("triton", fn, **cast, **options)
    same_dtype = run("torch", fn, **cast, **options)
    oracle = run("torch", fn, **exact, **options)
    assert_matches(kernel, dtype, oracle, same_dtype)
    return kernel


# ----------------------------------------------------------------------------------------------------------
# add_norm
# ----------------------------------------------------------------------------------------------------------

# (leading shape, width): one element; a prime row count over a prime width; rows just over a row block
# (8 rows of 512 for width 257, which is just over a 256 block); a wide row.
NORM_SHAPES = [((1,), 1), ((3, 43), 37), ((17,), 257), ((2,), 4100)]
NORM_VARIANTS = {
    "layernorm+residual+sum": dict(rms=False, residual=True, weight=True, bias=True, return_sum=True),
    "layernorm-plain": dict(rms=False, residual=False, weight=True, bias=True, return_sum=False),
    "rmsnorm+residual+sum": dict(rms=True, residual=True, weight=True, bias=False, return_sum=True),
    "rmsnorm-no-affine": dict(rms=True, residual=False, weight=False, bias=False, return_sum=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=["one", "primes", "over-block", "wide"])
@pytest.mark.parametrize("variant", list(NORM_VARIANTS))
def test_add_norm_matches_reference(dtype, shape, variant):
    lead, n = shape
    v = NORM_VARIANTS[variant]
    inputs = {
        "x": randn(*lead, n, seed=1, scale=3.0) + 0.5,  # an offset, so centring matters
        "residual": randn(*lead, n, seed=2) if v["residual"] else None,
        "weight": randn(n, seed=3) + 1.0 if v["weight"] else None,
        "bias": randn(n, seed=4) if v["bias"] else None,
    }
    out = check_op(ops.add_norm, inputs, dtype, eps=1e-5, rms=v["rms"], return_sum=v["return_sum"])
    if v["return_sum"]:
        summed = out[1].double()
        expected = inputs["x"].to(dtype).double()
        if inputs["residual"] is not None:
            expected = expected + inputs["residual"].to(dtype).double()
        assert torch.allclose(summed, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


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

# one element; a prime row count over a prime width; rows just over the 16-row tile, width just over the
# 256-column tile; a 3-D input
ACTIVATION_SHAPES = [(1, 1), (43, 37), (17, 257), (2, 5, 19)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACTIVATION_SHAPES, ids=["one", "primes", "over-block", "3d"])
@pytest.mark.parametrize("activation", ops.FUSED_ACTIVATIONS)
def test_bias_activation_matches_reference(dtype, shape, activation):
    inputs = {"x": randn(*shape, seed=11, scale=3.0), "bias": randn(shape[-1], seed=12)}
    check_op(ops.bias_activation, inputs, dtype, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACTIVATION_SHAPES, ids=["one", "primes", "over-block", "3d"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gated_activation_matches_reference(dtype, shape, activation, with_bias):
    *lead, n = shape
    inputs = {"x": randn(*lead, 2 * n, seed=13, scale=3.0), "bias": randn(2 * n, seed=14) if with_bias else None}
    out = check_op(ops.gated_activation, inputs, dtype, activation=activation)
    assert out.shape == (*lead, n)


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

def rotary_tables(batch, seq, head_dim, seed):
    """cos / sin as HF builds them: angles position * inv_freq, duplicated over the two halves."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 50, (batch, seq), generator=g).double()
    inv_freq = 1.0 / (1000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


# (batch, seq, heads, kv_heads, head_dim, cos batch): the smallest case; GQA with shared tables; MHA with
# per-sequence tables and a rotary half (65) just over a power-of-two block; MQA over a prime seq
ROPE_CASES = [(1, 1, 1, 1, 2, 1), (3, 17, 4, 2, 8, 1), (2, 5, 3, 3, 130, 2), (2, 13, 5, 1, 6, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=["one", "gqa", "over-block", "mqa"])
def test_rope_split_matches_reference(dtype, case):
    batch, seq, heads, kv_heads, head_dim, cos_batch = case
    width = (heads + 2 * kv_heads) * head_dim
    qkv = randn(batch, seq, width + 3, seed=21)[..., 2:2 + width]  # tokens strided, as a slice of a wider output
    cos, sin = rotary_tables(cos_batch, seq, head_dim, seed=22)
    inputs = {"qkv": qkv, "cos": cos, "sin": sin}
    q, k, v = check_op(ops.rope_split_qkv, inputs, dtype, num_heads=heads, num_kv_heads=kv_heads)
    assert q.shape == (batch, heads, seq, head_dim) and k.shape == v.shape == (batch, kv_heads, seq, head_dim)
    split = qkv.to(dtype).reshape(batch, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    assert torch.equal(v, split[:, heads + kv_heads:])  # value heads are copied bit for bit


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
