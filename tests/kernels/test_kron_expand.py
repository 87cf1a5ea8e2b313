"""The Kronecker-factored (LiGO) expansion: Triton kernels (interpreter on CPU) against the PyTorch reference.

Values and the gradients of W, E, F and D at awkward shapes (size 1, primes, just over the 64-wide tile, the
issue's 48x80 -> 97x131) on contiguous tensors and non-contiguous views, and the 1-D form: the shared cases of
growlib.kernel_cases (``growlib check-kernels`` runs them too).  Here also: every order of the chain's three
steps, frozen inputs, bf16 rounding, empty axes, gradcheck of the reference in float64, and the errors bad
inputs raise."""

from __future__ import annotations

import itertools

import pytest
import torch

import growlib
from growlib import kernel_cases, ops, reference
from growlib.kernels import kron_expand as kernel
from tests.conftest import DEVICE

NAMES = kernel_cases.KRON_NAMES


def random_inputs(seed, dtype, small, large, views=False):
    return kernel_cases.kron_inputs(seed, dtype, small, large, DEVICE, views)


def check_against_reference(inputs, grad_out, wanted=NAMES):
    """Output and gradients through the Triton kernels, judged by the shared rule (growlib.kernel_cases)."""
    assert not kernel_cases.failures(kernel_cases.kron_comparisons(inputs, grad_out, wanted))


@pytest.mark.parametrize("case", kernel_cases.cases_for("kron_expand") + kernel_cases.cases_for("kron_expand_vector"),
                         ids=lambda case: case.id)
def test_values_and_gradients_match_reference(case):
    """The shared cases: sizes 1, primes, just over the tile, the issue's shape on views, shrinking depth, and
    the 1-D form; forward and backward."""
    assert not kernel_cases.failures(case.run(DEVICE))


@pytest.mark.parametrize("order", list(itertools.permutations(kernel.STEPS)), ids="-".join)
def test_every_step_order_gives_the_same_values_and_gradients(order, monkeypatch):
    """The cost model picks one order per shape; each of the six must be right, gradients included."""
    monkeypatch.setattr(kernel, "cheapest_order", lambda stack_shape, maps: order)
    inputs, grad_out = random_inputs(5, torch.float32, (2, 9, 20), (3, 17, 18))
    check_against_reference(inputs, grad_out)


@pytest.mark.parametrize("wanted", [("D",), ("E", "F", "D"), ("W",)], ids=["D", "EFD-frozen-W", "W"])
def test_frozen_inputs_get_no_gradient_and_the_rest_stay_right(wanted):
    inputs, grad_out = random_inputs(11, torch.float32, (3, 20, 17), (4, 33, 29))
    check_against_reference(inputs, grad_out, wanted)


@pytest.mark.parametrize("sum_batch", [False, True], ids=["per-layer", "summed"])
def test_gemm_rounds_bf16_to_nearest_even_like_torch(sum_batch):
    """Integer operands make every fp32 sum exact, so the bf16 result must equal torch's rounding of it bit
    for bit: sums of up to 14 bits round to bf16's 8, ties included.  The summed case splits its K range
    into fp32 partials added on the host."""
    g = torch.Generator().manual_seed(8)
    a = torch.randint(-255, 256, (3, 20, 150), generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randint(-1, 2, (1, 150, 37), generator=g).to(DEVICE, torch.bfloat16).expand(3, 150, 37)
    exact = a.double() @ b.double()
    got = kernel.batched_matmul(a, b, sum_batch=sum_batch)
    expected = (exact.sum(0) if sum_batch else exact).float().to(torch.bfloat16)
    assert torch.equal(got, expected)


def test_cheapest_order_puts_the_depth_mix_where_it_saves_work():
    """Growth (L2 > L1): the width GEMMs run on the L1 small layers first, the depth mix last; shrinking depth:
    the depth mix first, on the small matrices.  Among the width maps, the cheaper side goes first."""
    def maps(l1, l2, o1, o2, i1, i2):
        return (l1, o1, i1), {"depth": torch.empty(l2, l1), "rows": torch.empty(o2, o1),
                              "cols": torch.empty(i2, i1)}

    bert_ffn = maps(12, 24, 3072, 4096, 768, 1024)
    assert kernel.cheapest_order(*bert_ffn) == ("rows", "cols", "depth")
    assert kernel.cheapest_order(*maps(24, 12, 1024, 768, 1024, 768))[0] == "depth"
    assert kernel.cheapest_order(*maps(12, 12, 100, 4000, 100, 200)) == ("depth", "cols", "rows")


@pytest.mark.parametrize("shapes", [((0, 3, 4), (5, 3), (6, 4), (2, 0)), ((2, 3, 4), (0, 3), (6, 4), (2, 2)),
                                    ((2, 3, 4), (5, 3), (6, 4), (0, 2))], ids=["L1=0", "O2=0", "L2=0"])
def test_empty_axes_give_what_the_reference_gives(shapes):
    """No program runs on an empty axis; a sum over none is zero."""
    inputs = [torch.randn(shape, device=DEVICE) for shape in shapes]
    grad_out = torch.ones(shapes[3][0], shapes[1][0], shapes[2][0], device=DEVICE)
    got = kernel_cases.value_and_grads(kernel_cases.kron_through("triton"), inputs, grad_out)
    expected = kernel_cases.value_and_grads(reference.kron_expand, inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_reference_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    W, E, F, D = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                  for shape in ((2, 3, 4), (5, 3), (3, 4), (3, 2)))
    assert torch.autograd.gradcheck(reference.kron_expand, (W, E, F, D))
    assert torch.autograd.gradcheck(reference.kron_expand_vector, (W[:, :, 0].detach().requires_grad_(), E, D))


def test_reference_is_the_sum_over_layers_it_claims():
    """The oracle itself, against the definition written out layer by layer."""
    (W, E, F, D), _ = random_inputs(1, torch.float64, (2, 3, 4), (3, 5, 6))
    expected = torch.stack([sum(D[l, j] * E @ W[j] @ F.T for j in range(2)) for l in range(3)])
    assert torch.allclose(reference.kron_expand(W, E, F, D), expected)
    assert torch.allclose(reference.kron_expand_vector(W[:, :, 0], E, D),
                          torch.stack([sum(D[l, j] * E @ W[j, :, 0] for j in range(2)) for l in range(3)]))


def test_float64_runs_on_the_torch_backend_and_is_refused_by_triton():
    (W, E, F, D), _ = random_inputs(4, torch.float64, (2, 3, 4), (3, 5, 6))
    with growlib.use_backend("torch"):
        assert ops.kron_expand(W, E, F, D).dtype == torch.float64
    with growlib.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        ops.kron_expand(W, E, F, D)


def _replace(args, position, value):
    args = list(args)
    args[position] = value
    return args


BAD_INPUTS = [
    ("W not 3-D", lambda a: _replace(a, 0, a[0][0]), ValueError, "W must be 3-D"),
    ("E not 2-D", lambda a: _replace(a, 1, a[1][None]), ValueError, "E must be 2-D"),
    ("O1 mismatch", lambda a: _replace(a, 1, a[1].new_ones(5, 4)), ValueError, r"E .*O1=3"),
    ("I1 mismatch", lambda a: _replace(a, 2, a[2].new_ones(6, 3)), ValueError, r"F .*I1=4"),
    ("L1 mismatch", lambda a: _replace(a, 3, a[3].new_ones(3, 5)), ValueError, r"D .*L1=2"),
    ("not a tensor", lambda a: _replace(a, 2, [[1.0]]), TypeError, "F must be a torch.Tensor"),
    ("unsupported dtype", lambda a: [t.half() for t in a], TypeError, "W must be float32, bfloat16 or float64"),
    ("dtypes differ", lambda a: _replace(a, 3, a[3].double()), TypeError, "D has dtype torch.float64"),
    ("devices differ", lambda a: _replace(a, 1, a[1].to("meta")), ValueError, "E is on meta"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make_bad, error, message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_errors_naming_the_parameter(backend, make_bad, error, message):
    good = [torch.ones(shape, device=DEVICE) for shape in ((2, 3, 4), (5, 3), (6, 4), (3, 2))]
    with growlib.use_backend(backend), pytest.raises(error, match=message):
        ops.kron_expand(*make_bad(good))


def test_vector_form_errors_name_w():
    with pytest.raises(ValueError, match=r"w must be 2-D \(L1, O1\)"):
        ops.kron_expand_vector(torch.ones(2, 3, 4), torch.ones(5, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"E .*O1=3 \(w.shape\[1\]\)"):
        ops.kron_expand_vector(torch.ones(2, 3), torch.ones(5, 4), torch.ones(3, 2))
