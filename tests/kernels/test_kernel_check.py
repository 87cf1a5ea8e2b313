"""``growlib check-kernels`` and the case list it shares with tests/kernels: the list is well formed, the
command runs and prints its table, and a broken kernel makes it fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from growlib.kernels import cases as kernel_cases
from growlib.kernels import check as kernel_check
from growlib.kernels import kron_expand, structured_map
from growlib.kernels.cases import FUSED_TOLERANCE, KRON_TOLERANCE, compare
from growlib.kernels.frozen import activation as fused_activation
from growlib.kernels.frozen import add_norm as fused_norm
from growlib.kernels.frozen import rope_split_qkv as rope
from tests.conftest import DEVICE, ON_GPU

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPPORTED_DTYPES = {"structured_map": structured_map.SUPPORTED_DTYPES, "kron_expand": kron_expand.SUPPORTED_DTYPES,
                    "kron_expand_vector": kron_expand.SUPPORTED_DTYPES, "add_norm": fused_norm.SUPPORTED_DTYPES,
                    "bias_activation": fused_activation.SUPPORTED_DTYPES,
                    "gated_activation": fused_activation.SUPPORTED_DTYPES, "rope_split_qkv": rope.SUPPORTED_DTYPES}

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def test_case_list_is_well_formed():
    """Unique ids; every op in every dtype its kernel supports; the quick subset covers every table row (kernel,
    epilogue and dtype) of the full list; every case has a tolerance for its dtype."""
    cases = kernel_cases.all_cases()
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids))
    assert set(kernel_cases.OPS) == set(SUPPORTED_DTYPES)
    for op, dtypes in SUPPORTED_DTYPES.items():
        assert {case.dtype for case in kernel_cases.cases_for(op)} == set(dtypes), op
    quick = kernel_cases.quick_cases()
    assert {(c.kernel, c.dtype) for c in quick} == {(c.kernel, c.dtype) for c in cases}
    assert len(quick) < len(cases) // 3
    for case in cases:
        assert case.dtype in case.tolerance.atol and callable(case.check), case.id
    with pytest.raises(ValueError, match="op must be one of"):
        kernel_cases.cases_for("matmul")


def test_three_way_rule():
    """bf16 may be k = 2 times as far from ref64 as torch's own bf16, plus atol; fp32 gets atol alone; NaN,
    a wrong dtype, a missing or an unexpected gradient fail."""
    exact = torch.tensor([1.0, -2.0, 100.0], dtype=torch.float64)
    torch_bf16 = exact + torch.tensor([0.0, 0.05, 0.5], dtype=torch.float64)
    within = (exact + torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)).to(torch.bfloat16)
    assert compare("out", within, exact, torch_bf16, torch.bfloat16, FUSED_TOLERANCE).passed
    beyond = (exact + torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64)).to(torch.bfloat16)
    result = compare("out", beyond, exact, torch_bf16, torch.bfloat16, FUSED_TOLERANCE)
    assert not result.passed and result.worst_ratio > 1
    assert compare("out", exact.float() + 1e-6, exact, None, torch.float32, FUSED_TOLERANCE).passed
    assert not compare("out", exact.float() + 1e-5, exact, None, torch.float32, FUSED_TOLERANCE).passed
    # per-tensor scale: an error of 1e-4 on a small element of a tensor whose largest value is 100 passes
    assert compare("out", exact.float() + torch.tensor([1e-4, 0, 0]), exact, None, torch.float32, KRON_TOLERANCE).passed
    assert not compare("out", exact.float() + torch.tensor([1e-4, 0, 0]), exact, None, torch.float32,
                       FUSED_TOLERANCE).passed
    assert not compare("out", torch.full((3,), float("nan")), exact, None, torch.float32, FUSED_TOLERANCE).passed
    assert not compare("out", exact.double(), exact, None, torch.float32, FUSED_TOLERANCE).passed
    assert compare("grad W", None, None, None, torch.float32, KRON_TOLERANCE).passed
    assert not compare("grad W", exact.float(), None, None, torch.float32, KRON_TOLERANCE).passed
    assert not compare("grad W", None, exact, None, torch.float32, KRON_TOLERANCE).passed


@pytest.mark.subprocess
def test_check_kernels_command_prints_a_passing_table():
    """``python -m growlib.cli check-kernels --quick`` as a user runs it: without TRITON_INTERPRET in the
    environment, so on the CPU it re-runs itself in a fresh process with the interpreter switched on."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "growlib.cli", "check-kernels", "--quick"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    quick = kernel_cases.quick_cases()
    assert f"{len(quick)} of {len(quick)} cases passed" in out and not re.search("FAIL", out)
    rows = {(m.group(1), m.group(2)) for m in re.finditer(r"^(\S+(?: backward)?)\s+(float32|float16|bfloat16)\s+\d+"
                                                          r"\s+\S+\s+\S+\s+.*PASS$", out, re.MULTILINE)}
    expected = {(c.kernel, kernel_cases.dtype_name(c.dtype)) for c in quick}
    expected |= {(f"{kernel} backward", dtype) for kernel, dtype in expected if kernel.startswith("kron_expand")}
    assert rows == expected
    assert "2*|torch-ref64| + 8e-03*max(1,|ref64|)" in out  # the rule is printed with the numbers


def test_a_broken_kernel_fails_the_check(monkeypatch, capsys):
    """A kernel 1% off, and one that raises, fail their cases, and the command exits 1 naming them."""
    real = fused_activation.bias_activation_triton
    monkeypatch.setattr(fused_activation, "bias_activation_triton", lambda x, bias, act: real(x, bias, act) * 1.01)

    def crash(*args, **kwargs):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(rope, "rope_split_qkv_triton", crash)

    device = kernel_check.check_device()
    assert device == DEVICE
    results = kernel_check.run_cases(kernel_cases.cases_for("bias_activation", quick=True)
                                     + kernel_cases.cases_for("rope_split_qkv", quick=True), device)
    assert results and not any(result.passed for result in results)
    assert all("kernel exploded" in r.error for r in results if r.case.op == "rope_split_qkv")

    assert kernel_check.main(["--quick", "--kernel", "bias_activation", "--kernel", "gated_activation"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^bias_activation\s+float32 .*FAIL$", out, re.MULTILINE)
    assert re.search(r"^gated_activation\s+float32 .*PASS$", out, re.MULTILINE)  # the intact kernel still passes
    assert "Failures:" in out and "bias_activation/gelu/over-block/float32: out: worst" in out


def test_kernels_of_the_wrong_kind_are_refused(monkeypatch):
    """Interpreted kernels cannot be checked as if on CUDA, nor compiled ones on the CPU: the check refuses
    rather than testing something else."""
    if ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # asks for the CPU, but the kernels were compiled
    else:
        monkeypatch.delenv("TRITON_INTERPRET")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but the kernels are interpreted
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 must be set before triton is imported"):
        kernel_check.check_device()
