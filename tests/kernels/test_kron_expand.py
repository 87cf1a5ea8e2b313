"""The Kronecker-factored (LiGO) expansion: Triton kernels (interpreter on CPU) against the PyTorch reference.

Values and the gradients of W, E, F and D at awkward shapes (size 1, primes, just over the 64-wide tile, the
issue's 48x80 -> 97x131), every order of the chain's three steps, frozen inputs, non-contiguous views, the 1-D
form; gradcheck of the reference in float64; and the errors bad inputs raise."""

from __future__ import annotations

import itertools

import pytest
import torch

import growlib
from growlib import ops, reference
from growlib.kernels import kron_expand as kernel
from tests.conftest import DEVICE

# Per-dtype tolerance, relative to the largest |ref| of the tensor compared (at least 1): a sum's rounding error
# follows the size of its terms, not of the sum.  bf16 also obeys the three-way rule in assert_close.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3}

# (L1, O1, I1) -> (L2, O2, I2)
SHAPES = {
    "issue": ((3, 48, 80), (5, 97, 131)),
    "size-one": ((1, 1, 3), (2, 1, 2)),
    "primes": ((2, 7, 13), (3, 17, 11)),
    "over-block": ((2, 65, 33), (3, 66, 65)),
    "shrink": ((5, 40, 24), (2, 17, 30)),
}
NAMES = ("W", "E", "F", "D")


def random_inputs(seed, dtype, small, large, views=False):
    """W, E, F, D scaled so that outputs and gradients are of order one.  With ``views`` they are strided
    and transposed views rather than contiguous tensors."""
    (l1, o1, i1), (l2, o2, i2) = small, large
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(l1, o1, i1 + 2, generator=g)[:, :, 1:-1] if views else torch.randn(l1, o1, i1, generator=g)
    E = (torch.randn(o1, o2, generator=g).mT if views else torch.randn(o2, o1, generator=g)) / o1 ** 0.5
    F = (torch.randn(i1, i2, generator=g).mT if views else torch.randn(i2, i1, generator=g)) / i1 ** 0.5
    D = torch.randn(l2, l1, generator=g) / l1 ** 0.5
    grad_out = torch.randn(l2, o2, i2, generator=g)
    return [t.to(DEVICE, dtype) for t in (W, E, F, D)], grad_out.to(DEVICE, dtype)


def value_and_grads(fn, inputs, grad_out, wanted=NAMES):
    """fn's output and the gradients of the ``wanted`` inputs (None for the others, which are frozen)."""
    leaves = [t.detach().requires_grad_(name in wanted) for name, t in zip(NAMES, inputs)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)
    by_name = dict(zip([n for n in NAMES if n in wanted], grads))
    return [out.detach()] + [by_name.get(name) for name in NAMES]


def through_ops(backend):
    def fn(W, E, F, D):
        with growlib.use_backend(backend):
            return ops.kron_expand(W, E, F, D)
    return fn


def eager_same_dtype(W, E, F, D):
    """The einsum chain a user would write, in the inputs' own dtype: the bf16 baseline of the three-way rule."""
    return torch.einsum("lob,ib->loi", torch.einsum("oa,lab->lob", E, torch.einsum("lj,jab->lab", D, W)), F)


def assert_close(got, exact, torch_got, dtype, name):
    """fp32: within TOLERANCE of the fp64 oracle.  bf16: |kernel - ref64| <= 2 |eager bf16 - ref64| + atol."""
    assert got.dtype == dtype and got.shape == exact.shape, (name, got.dtype, got.shape)
    atol = TOLERANCE[dtype] * max(1.0, float(exact.abs().max()))
    err = (got.double() - exact).abs()
    allowed = atol + (2 * (torch_got.double() - exact).abs() if dtype != torch.float32 else 0.0)
    assert (err <= allowed).all(), (name, float(err.max()) / atol)


def assert_matches(kernel_results, oracle, same_dtype, dtype):
    for name, got, exact, torch_got in zip(("out",) + NAMES, kernel_results, oracle, same_dtype):
        if exact is None:
            assert got is None, name
        else:
            assert_close(got, exact, torch_got, dtype, name)


def check_against_reference(inputs, grad_out, wanted=NAMES):
    dtype = inputs[0].dtype
    got = value_and_grads(through_ops("triton"), inputs, grad_out, wanted)
    oracle = value_and_grads(reference.kron_expand, [t.double() for t in inputs], grad_out.double(), wanted)
    same_dtype = value_and_grads(eager_same_dtype, inputs, grad_out, wanted)
    assert_matches(got, oracle, same_dtype, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_values_and_gradients_match_reference(dtype, shape):
    inputs, grad_out = random_inputs(3, dtype, *SHAPES[shape], views=shape == "issue")
    check_against_reference(inputs, grad_out)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("small, large", [((1, 1), (3, 2)), ((3, 70), (4, 67))], ids=["size-one", "over-block"])
def test_vector_form_matches_reference(dtype, small, large):
    (l1, o1), (l2, o2) = small, large
    g = torch.Generator().manual_seed(2)
    w = torch.randn(l1, o1, generator=g).to(DEVICE, dtype)
    E = (torch.randn(o2, o1, generator=g) / o1 ** 0.5).to(DEVICE, dtype)
    D = (torch.randn(l2, l1, generator=g) / l1 ** 0.5).to(DEVICE, dtype)
    grad_out = torch.randn(l2, o2, generator=g).to(DEVICE, dtype)

    def run(fn, args, grad):
        leaves = [t.detach().requires_grad_() for t in args]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad)]

    def through_triton(w, E, D):
        with growlib.use_backend("triton"):
            return ops.kron_expand_vector(w, E, D)

    got = run(through_triton, (w, E, D), grad_out)
    oracle = run(reference.kron_expand_vector, [t.double() for t in (w, E, D)], grad_out.double())
    same_dtype = run(lambda w, E, D: torch.einsum("oa,la->lo", E, D @ w), (w, E, D), grad_out)
    for name, got_t, exact, torch_t in zip(("out", "w", "E", "D"), got, oracle, same_dtype):
        assert_close(got_t, exact, torch_t, dtype, name)


@pytest.mark.parametrize("shapes", [((0, 3, 4), (5, 3), (6, 4), (2, 0)), ((2, 3, 4), (0, 3), (6, 4), (2, 2)),
                                    ((2, 3, 4), (5, 3), (6, 4), (0, 2))], ids=["L1=0", "O2=0", "L2=0"])
def test_empty_axes_give_what_the_reference_gives(shapes):
    """No program runs on an empty axis; a sum over none is zero."""
    inputs = [torch.randn(shape, device=DEVICE) for shape in shapes]
    grad_out = torch.ones(shapes[3][0], shapes[1][0], shapes[2][0], device=DEVICE)
    got = value_and_grads(through_ops("triton"), inputs, grad_out)
    expected = value_and_grads(reference.kron_expand, inputs, grad_out)
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
