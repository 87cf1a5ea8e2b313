"""bias_activation and gated_activation, the frozen layers' fused MLP epilogues (interpreter on CPU), against
their PyTorch references.

The value cases live in growlib.kernels.cases, shared with ``growlib check-kernels``: awkward shapes (a single
row or element, prime sizes, widths just over a block, row counts just over a row block, strided inputs), fp32
judged against the fp64 reference and fp16 / bf16 by the three-way rule.
Here also: the HF activations themselves, forward-only inputs, and input validation."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib.kernels import cases as kernel_cases
from tests.conftest import DEVICE

# exp(-x) overflowing to inf is how the activations reach their limits; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return kernel_cases.randn(*shape, seed=seed, scale=scale, dtype=dtype, device=DEVICE)


def run(backend, fn, *args, **kwargs):
    with growlib.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", kernel_cases.cases_for("bias_activation") + kernel_cases.cases_for("gated_activation"),
                         ids=lambda case: case.id)
def test_kernel_matches_reference(case):
    assert not kernel_cases.failures(case.run(DEVICE))


def test_activations_are_the_hf_ones():
    """gelu is the exact erf form (BERT, ViT), gelu_tanh is GPT-2's gelu_new, silu * up is Llama's SwiGLU."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 401, dtype=torch.float64, device=DEVICE).unsqueeze(0)
    for hf_name, ours in (("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                          ("silu", "silu"), ("relu", "relu")):
        expected = ACT2FN[hf_name](x.float()).double()
        got = run("triton", growlib.bias_activation, x.float(), activation=ours).double()
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), hf_name
    gate_up = torch.cat([x, x.flip(-1)], dim=-1).float()
    got = run("triton", growlib.gated_activation, gate_up, activation="silu")
    assert torch.allclose(got, torch.nn.functional.silu(x.float()) * x.flip(-1).float(), rtol=1e-6, atol=1e-6)


def test_forward_only_ops_refuse_inputs_that_record_a_graph():
    x = randn(4, 8, seed=35).requires_grad_()
    with pytest.raises(RuntimeError, match="forward-only"):
        growlib.bias_activation(x, activation="gelu")
    with torch.no_grad():
        assert growlib.bias_activation(x, activation="gelu").grad_fn is None


def test_errors_name_the_parameter():
    x = randn(4, 8, seed=31)
    with pytest.raises(ValueError, match="activation must be one of"):
        growlib.bias_activation(x, activation="quick_gelu")
    with pytest.raises(ValueError, match="bias must have shape"):
        growlib.bias_activation(x, torch.ones(9, device=DEVICE), activation="gelu")
    with pytest.raises(ValueError, match="last axis must be even"):
        growlib.gated_activation(randn(4, 7, seed=32))
    with growlib.use_backend("triton"), pytest.raises(TypeError, match="Triton backend supports"):
        growlib.bias_activation(x.double(), activation="gelu")
