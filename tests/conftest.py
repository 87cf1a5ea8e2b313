"""Test set-up: Triton kernels run through Triton's interpreter (CPU tensors) unless GROWLIB_TEST_DEVICE=cuda.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before growlib is imported.  With
GROWLIB_TEST_DEVICE=cuda on a GPU machine the kernel tests run the compiled kernels on CUDA tensors instead,
and the operator tests (whose models live on the CPU) run their Triton cases only under the interpreter."""

import os

import torch

ON_GPU = os.environ.get("GROWLIB_TEST_DEVICE") == "cuda"
if ON_GPU and not torch.cuda.is_available():
    raise RuntimeError("GROWLIB_TEST_DEVICE=cuda, but torch sees no CUDA device")
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run a test once with the PyTorch reference and once with the Triton kernels (interpreter on CPU)."""
    import growlib

    if request.param == "triton" and ON_GPU:
        pytest.skip("CPU-model Triton cases run under the interpreter; GPU runs cover tests/kernels")
    with growlib.use_backend(request.param):
        yield request.param
