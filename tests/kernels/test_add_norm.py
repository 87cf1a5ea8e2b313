"""add_norm, the frozen layers' fused residual add + LayerNorm / RMSNorm (interpreter on CPU), against its
PyTorch reference.

The value cases live in growlib.kernels.cases, shared with ``growlib check-kernels``: awkward shapes (a single
row or element, prime sizes, widths just over a block, row counts just over a row block, strided inputs), fp32
judged against the fp64 reference and fp16 / bf16 by the three-way rule.
Here also: strided rows and eps, and input validation."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib.kernels import cases as kernel_cases
from growlib.kernels.frozen.add_norm import add_norm_reference
from tests.conftest import DEVICE

def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return kernel_cases.randn(*shape, seed=seed, scale=scale, dtype=dtype, device=DEVICE)


def run(backend, fn, *args, **kwargs):
    with growlib.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", kernel_cases.cases_for("add_norm"), ids=lambda case: case.id)
def test_kernel_matches_reference(case):
    assert not kernel_cases.failures(case.run(DEVICE))


def test_add_norm_reads_strided_rows_and_respects_eps():
    """Rows that are column slices of a wider tensor, and an eps large enough to change the result."""
    wide = randn(13, 80, seed=5, scale=0.05)
    x, residual = wide[:, 3:68], wide[:, 10:75]
    weight, bias = randn(65, seed=6), randn(65, seed=7)
    for eps in (1e-6, 1e-2):
        kernel = run("triton", growlib.add_norm, x, residual, weight, bias, eps=eps)
        oracle = add_norm_reference(x.double(), residual.double(), weight, bias, eps, False, False)[0]
        assert torch.allclose(kernel.double(), oracle, rtol=1e-5, atol=1e-5)
    small_eps = run("triton", growlib.add_norm, x, residual, weight, bias, eps=1e-6)
    assert not torch.allclose(small_eps, kernel, atol=1e-3)


def test_errors_name_the_parameter():
    x = randn(4, 8, seed=31)
    with pytest.raises(ValueError, match="weight must have shape"):
        growlib.add_norm(x, weight=torch.ones(7, device=DEVICE), eps=1e-5)
    with pytest.raises(ValueError, match="residual must match x"):
        growlib.add_norm(x, x.double(), eps=1e-5)
    with pytest.raises(ValueError, match="eps must be"):
        growlib.add_norm(x, eps=-1.0)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        growlib.add_norm(x.long(), eps=1e-5)
