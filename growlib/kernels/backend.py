"""Which implementation an op runs: the Triton kernel or its PyTorch reference.

Backend policy (env ``GROWLIB_BACKEND`` or ``with growlib.use_backend(...)``):

* ``auto``   Triton for CUDA tensors, the op's PyTorch reference for CPU tensors;
* ``triton`` always Triton; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter);
* ``torch``  always the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_state = threading.local()


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend policy in force: the innermost ``use_backend``, else ``$GROWLIB_BACKEND``, else auto."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check_backend(os.environ.get("GROWLIB_BACKEND", "auto"), "environment variable GROWLIB_BACKEND")


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the enclosed growlib calls with the given backend policy ('auto', 'triton' or 'torch')."""
    _check_backend(backend, "backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def interpreting() -> bool:
    """Whether Triton runs through its interpreter (``TRITON_INTERPRET=1``), which lets it take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on ``device`` under the current policy."""
    policy = current_backend()
    if policy == "torch":
        return "torch"
    if policy == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda" or interpreting():
        return "triton"
    raise RuntimeError(
        f"backend 'triton' was forced for tensors on {device}, but Triton runs only on CUDA tensors or, on the "
        "CPU, under its interpreter: set TRITON_INTERPRET=1 before importing growlib, or use backend 'auto'/'torch'")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reference computes in: fp64 for fp64 inputs, else fp32 (an oracle, not a second bf16 run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
