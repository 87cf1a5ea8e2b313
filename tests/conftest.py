"""Test set-up: on a machine without a GPU, run Triton kernels through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before growlib is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run a test once with the PyTorch reference and once with the Triton kernels (interpreter on CPU)."""
    import growlib

    with growlib.use_backend(request.param):
        yield request.param
