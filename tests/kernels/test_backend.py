"""The backend policy (growlib.kernels.backend): which implementation an op runs."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib.kernels import backend


def test_backend_context_nests_and_restores():
    assert growlib.current_backend() == "auto"
    with growlib.use_backend("torch"):
        with growlib.use_backend("triton"):
            assert growlib.current_backend() == "triton"
        assert growlib.current_backend() == "torch"
    assert growlib.current_backend() == "auto"


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("GROWLIB_BACKEND", "torch")
    assert growlib.current_backend() == "torch"
    monkeypatch.setenv("GROWLIB_BACKEND", "cuda")
    with pytest.raises(ValueError, match="GROWLIB_BACKEND"):
        growlib.current_backend()


def test_auto_uses_reference_on_cpu_and_triton_on_cuda():
    assert backend.resolve_backend(torch.device("cpu")) == "torch"
    assert backend.resolve_backend(torch.device("cuda")) == "triton"


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with growlib.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve_backend(torch.device("cpu"))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        with growlib.use_backend("cuda"):
            pass
