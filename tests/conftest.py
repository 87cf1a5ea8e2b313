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


def pytest_collection_modifyitems(config, items):
    """Leave out the interpreted Triton case of tests parametrized by a family whose views are plain 2-D ones
    (tests/factories.py REFERENCE_ONLY_FAMILIES: OPT, DeiT): the kernels see nothing in them the first four
    families do not already send, and each such case costs about a second of the interpreter.  They run on the
    PyTorch reference; the summary counts the cases left out as deselected."""
    from tests.factories import REFERENCE_ONLY_FAMILIES

    def reference_only(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return params.get("backend") == "triton" and params.get("family") in REFERENCE_ONLY_FAMILIES

    left_out = [item for item in items if reference_only(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not reference_only(item)]
