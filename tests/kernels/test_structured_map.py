"""The structured-map Triton kernel (interpreter on CPU) against the PyTorch reference.

The value cases (random tasks with awkward sizes: 1, primes, just over the 64-wide tile; strided and transposed
views; several depth sources and nonzeros per row; with and without the blend and RMS epilogues) live in
growlib.kernel_cases, shared with ``growlib check-kernels``; this file runs them and checks view semantics."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib import kernel_cases, ops
from tests.conftest import DEVICE


@pytest.mark.parametrize("case", kernel_cases.cases_for("structured_map"), ids=lambda case: case.id)
def test_kernel_matches_reference(case):
    assert not kernel_cases.failures(case.run(DEVICE))


def test_tasks_not_written_stay_untouched_and_views_write_through():
    """Writing into column slices of one tensor (GPT-2's fused c_attn) touches exactly those columns."""
    base = torch.zeros(6, 12, device=DEVICE)
    src = torch.randn(6, 4, device=DEVICE)
    views = [base[:, 0:4], base[:, 8:12]]
    table_index = torch.arange(6, dtype=torch.int32, device=DEVICE).unsqueeze(1)
    table_weight = torch.ones(6, 1, device=DEVICE)
    for backend in ("triton", "torch"):
        base.zero_()
        with growlib.use_backend(backend):
            ops.structured_map_(views, [[src], [src]], torch.ones(2, 1, device=DEVICE),
                                torch.zeros(2, dtype=torch.int64, device=DEVICE),
                                torch.zeros(2, dtype=torch.int64, device=DEVICE), table_index, table_weight)
        assert torch.equal(base[:, 0:4], src) and torch.equal(base[:, 8:12], src)
        assert torch.equal(base[:, 4:8], torch.zeros(6, 4, device=DEVICE))
