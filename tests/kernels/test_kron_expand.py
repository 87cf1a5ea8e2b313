"""The Kronecker-factored (LiGO) expansion: Triton kernels (interpreter on CPU) against the PyTorch reference.

Values and the gradients of W, E, F and D at awkward shapes (size 1, primes, just over the 64-wide tile, the
issue's 48x80 -> 97x131) on contiguous tensors and non-contiguous views, with width maps shared by all layers
or one per output layer, and the 1-D form: the shared cases of growlib.kernels.cases (``growlib check-kernels``
runs them too).  Here also: every valid order of the chain's three steps, frozen inputs, bf16 rounding, empty
axes, one launch chain whatever the layer count, gradcheck of the reference in float64, the custom op's
registration, and the errors bad inputs raise."""

from __future__ import annotations

import itertools

import pytest
import torch

import growlib
from growlib.kernels import cases as kernel_cases
from growlib.kernels import kron_expand as kernel
from growlib.kernels import launch
from tests.conftest import DEVICE

NAMES = kernel_cases.KRON_NAMES


def random_inputs(seed, dtype, small, large, views=False, per_layer=""):
    return kernel_cases.kron_inputs(seed, dtype, small, large, DEVICE, views, per_layer)


def check_against_reference(inputs, grad_out, wanted=NAMES):
    """Output and gradients through the Triton kernels, judged by the shared rule (growlib.kernels.cases)."""
    assert not kernel_cases.failures(kernel_cases.kron_comparisons(inputs, grad_out, wanted))


@pytest.mark.slow
@pytest.mark.parametrize("case", kernel_cases.cases_for("kron_expand") + kernel_cases.cases_for("kron_expand_vector"),
                         ids=lambda case: case.id)
def test_values_and_gradients_match_reference(case):
    """The shared cases: sizes 1, primes, just over the tile, the issue's shape on views, shrinking depth,
    per-layer width maps, and the 1-D form; forward and backward."""
    assert not kernel_cases.failures(case.run(DEVICE))


@pytest.mark.parametrize("order", list(itertools.permutations(kernel.STEPS)), ids="-".join)
def test_every_step_order_gives_the_same_values_and_gradients(order, monkeypatch):
    """The cost model picks one order per shape; each of the six must be right, gradients included."""
    monkeypatch.setattr(kernel, "cheapest_order", lambda stack_shape, maps: order)
    inputs, grad_out = random_inputs(5, torch.float32, (2, 9, 20), (3, 17, 18))
    check_against_reference(inputs, grad_out)


PER_LAYER_ORDERS = {"E": [("depth", "rows", "cols"), ("depth", "cols", "rows"), ("cols", "depth", "rows")],
                    "F": [("depth", "rows", "cols"), ("depth", "cols", "rows"), ("rows", "depth", "cols")],
                    "EF": [("depth", "rows", "cols"), ("depth", "cols", "rows")]}


def per_layer_maps(per_layer):
    (_, E, F, D), _ = random_inputs(5, torch.float32, (2, 9, 20), (3, 17, 18), per_layer=per_layer)
    return {"depth": D, "rows": E, "cols": F}


@pytest.mark.parametrize("per_layer", list(PER_LAYER_ORDERS))
def test_valid_orders_put_the_depth_mix_before_every_per_layer_map(per_layer):
    """A per-layer map acts on the output layers; a shared one may still run on the small stack."""
    maps = per_layer_maps(per_layer)
    assert kernel.valid_orders(maps) == PER_LAYER_ORDERS[per_layer]
    shared = {step: m if step == "depth" else m[0] if m.dim() == 3 else m for step, m in maps.items()}
    assert kernel.valid_orders(shared) == list(itertools.permutations(kernel.STEPS))


@pytest.mark.parametrize("per_layer, order", [(p, o) for p, orders in PER_LAYER_ORDERS.items() for o in orders],
                         ids=lambda value: value if isinstance(value, str) else "-".join(value))
def test_every_valid_order_with_per_layer_maps_gives_the_same_values_and_gradients(per_layer, order, monkeypatch):
    """Per-layer E and/or F: every order the chain may take is right, the per-layer gradients included."""
    monkeypatch.setattr(kernel, "cheapest_order", lambda stack_shape, maps: order)
    inputs, grad_out = random_inputs(5, torch.float32, (2, 9, 20), (3, 17, 18), per_layer=per_layer)
    check_against_reference(inputs, grad_out)


def test_cheapest_order_with_per_layer_maps_is_the_cheapest_valid_one():
    """Depth grown 2 -> 16 layers: shared maps run on the 2 small layers before the depth mix; a per-layer map
    must wait for it, and then the map that grows its axis least goes first."""
    W, D = torch.empty(2, 64, 64), torch.empty(16, 2)
    grow_rows, keep_cols = torch.empty(256, 64), torch.empty(64, 64)
    shared = {"depth": D, "rows": grow_rows, "cols": keep_cols}
    assert kernel.cheapest_order(W.shape, shared) == ("cols", "rows", "depth")
    per_layer_rows = {"depth": D, "rows": grow_rows.expand(16, -1, -1), "cols": keep_cols}
    assert kernel.cheapest_order(W.shape, per_layer_rows) == ("cols", "depth", "rows")
    both = {"depth": D, "rows": grow_rows.expand(16, -1, -1), "cols": keep_cols.expand(16, -1, -1)}
    assert kernel.cheapest_order(W.shape, both) == ("depth", "cols", "rows")
    for maps in (per_layer_rows, both):
        order = kernel.cheapest_order(W.shape, maps)
        assert sum(kernel.step_costs(W.shape, maps, order)) == min(
            sum(kernel.step_costs(W.shape, maps, valid)) for valid in kernel.valid_orders(maps))


def test_per_layer_maps_that_repeat_one_map_equal_the_shared_map(backend):
    """E and F given once per layer, all alike, expand as the shared map does; their per-layer gradients add
    up to the shared map's gradient."""
    (W, E, F, D), grad_out = random_inputs(6, torch.float32, (3, 11, 7), (4, 13, 9))
    shared = kernel_cases.value_and_grads(growlib.kron_expand, (W, E, F, D), grad_out)
    repeated = kernel_cases.value_and_grads(growlib.kron_expand, (W, E.expand(4, -1, -1), F.expand(4, -1, -1), D),
                                            grad_out)
    torch.testing.assert_close(repeated[0], shared[0], rtol=1e-5, atol=1e-5)
    for position in (2, 3):  # grad E, grad F
        assert repeated[position].shape == (4, *shared[position].shape)
        torch.testing.assert_close(repeated[position].sum(0), shared[position], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers_out", [3, 7])
@pytest.mark.parametrize("per_layer", ["", "EF"], ids=["shared", "per-layer"])
def test_one_launch_per_step_whatever_the_layer_count(per_layer, layers_out):
    """Forward: one batched GEMM per step; backward: one per matrix gradient and one per input gradient the
    chain still needs (none for the frozen stack's step), however many output layers there are."""
    inputs, grad_out = random_inputs(9, torch.float32, (2, 5, 6), (layers_out, 7, 8), per_layer=per_layer)
    W, *maps = inputs
    maps = [m.detach().requires_grad_() for m in maps]
    with launch.recorded() as forward:
        with growlib.use_backend("triton"):
            out = growlib.kron_expand(W, *maps)
    with launch.recorded() as backward:
        out.backward(grad_out)
    assert [r["kernel"] for r in forward] == ["kron_gemm"] * 3
    assert [r["kernel"] for r in backward] == ["kron_gemm"] * 5
    unsummed = [r for r in backward if not r["SUM_BATCH"]]
    assert len(unsummed) == 2 + 2 * (per_layer == "EF")  # two input gradients, and dE[l], dF[l] per layer


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
    expected = kernel_cases.value_and_grads(kernel.kron_expand_reference, inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_reference_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    W, E, F, D = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                  for shape in ((2, 3, 4), (5, 3), (3, 4), (3, 2)))
    assert torch.autograd.gradcheck(kernel.kron_expand_reference, (W, E, F, D))
    assert torch.autograd.gradcheck(kernel.kron_expand_vector_reference, (W[:, :, 0].detach().requires_grad_(), E, D))
    E_l, F_l = (torch.randn(3, *m.shape, generator=g, dtype=torch.float64, requires_grad=True) for m in (E, F))
    assert torch.autograd.gradcheck(kernel.kron_expand_reference, (W, E_l, F_l, D))
    assert torch.autograd.gradcheck(kernel.kron_expand_vector_reference, (W[:, :, 0].detach().requires_grad_(), E_l, D))


def test_reference_is_the_sum_over_layers_it_claims():
    """The oracle itself, against the definition written out layer by layer."""
    (W, E, F, D), _ = random_inputs(1, torch.float64, (2, 3, 4), (3, 5, 6))
    expected = torch.stack([sum(D[l, j] * E @ W[j] @ F.T for j in range(2)) for l in range(3)])
    assert torch.allclose(kernel.kron_expand_reference(W, E, F, D), expected)
    assert torch.allclose(kernel.kron_expand_vector_reference(W[:, :, 0], E, D),
                          torch.stack([sum(D[l, j] * E @ W[j, :, 0] for j in range(2)) for l in range(3)]))


@pytest.mark.parametrize("per_layer", ["E", "F", "EF"])
def test_reference_with_per_layer_maps_is_the_sum_it_claims(per_layer):
    """out[l] = E_l (sum_j D[l, j] W_j) F_l^T, each output layer through its own maps."""
    (W, E, F, D), _ = random_inputs(1, torch.float64, (2, 3, 4), (3, 5, 6), per_layer=per_layer)
    E_l = E if E.dim() == 3 else E.expand(3, -1, -1)
    F_l = F if F.dim() == 3 else F.expand(3, -1, -1)
    expected = torch.stack([E_l[l] @ sum(D[l, j] * W[j] for j in range(2)) @ F_l[l].T for l in range(3)])
    assert torch.allclose(kernel.kron_expand_reference(W, E, F, D), expected)
    if per_layer != "F":
        assert torch.allclose(kernel.kron_expand_vector_reference(W[:, :, 0], E, D),
                              torch.stack([E_l[l] @ sum(D[l, j] * W[j, :, 0] for j in range(2)) for l in range(3)]))


def test_float64_runs_on_the_torch_backend_and_is_refused_by_triton():
    (W, E, F, D), _ = random_inputs(4, torch.float64, (2, 3, 4), (3, 5, 6))
    with growlib.use_backend("torch"):
        assert growlib.kron_expand(W, E, F, D).dtype == torch.float64
    with growlib.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        growlib.kron_expand(W, E, F, D)


def _replace(args, position, value):
    args = list(args)
    args[position] = value
    return args


BAD_INPUTS = [
    ("W not 3-D", lambda a: _replace(a, 0, a[0][0]), ValueError, "W must be 3-D"),
    ("E 4-D", lambda a: _replace(a, 1, a[1][None, None]), ValueError,
     r"E must be 2-D \(O2, O1\), shared by all layers, or 3-D \(L2, O2, O1\), one map per output layer"),
    ("per-layer E, L2 mismatch", lambda a: _replace(a, 1, a[1].expand(2, 5, 3)), ValueError,
     r"E must be 3-D \(L2, O2, O1\), one map per output layer, with L2=3 \(D.shape\[0\]\) and O1=3"),
    ("per-layer F, I1 mismatch", lambda a: _replace(a, 2, a[2].new_ones(3, 6, 5)), ValueError,
     r"F must be 3-D \(L2, I2, I1\), .* with L2=3 \(D.shape\[0\]\) and I1=4 \(W.shape\[2\]\)"),
    ("D not 2-D", lambda a: _replace(a, 3, a[3][None]), ValueError, r"D must be 2-D \(L2, L1\) with L1=2"),
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
        growlib.kron_expand(*make_bad(good))


def test_vector_form_errors_name_w():
    with pytest.raises(ValueError, match=r"w must be 2-D \(L1, O1\)"):
        growlib.kron_expand_vector(torch.ones(2, 3, 4), torch.ones(5, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"E .*O1=3 \(w.shape\[1\]\)"):
        growlib.kron_expand_vector(torch.ones(2, 3), torch.ones(5, 4), torch.ones(3, 2))


def kron_args(per_layer: bool, vector: bool = False):
    """Tiny W (L1=2), E, F (one per output layer with ``per_layer``) and D (L2=3), all requiring grad, as the
    custom op takes them: the 1-D form is a stack with one column and no F."""
    g = torch.Generator().manual_seed(3)
    layers = (3,) if per_layer else ()
    W = torch.randn(2, 3, 1 if vector else 4, generator=g)
    E = torch.randn(*layers, 5, 3, generator=g)
    F = None if vector else torch.randn(*layers, 6, 4, generator=g)
    D = torch.randn(3, 2, generator=g)
    return [None if t is None else t.to(DEVICE).requires_grad_() for t in (W, E, F, D)]


@pytest.mark.parametrize("per_layer, vector", [(False, False), (True, False), (True, True)],
                         ids=["shared", "per-layer", "per-layer-1d"])
def test_kron_expand_custom_op_passes_opcheck(per_layer, vector):
    """growlib::kron_expand (the Triton backend, through the interpreter on the CPU): schema, fake tensors,
    autograd registration and AOT dispatch with its backward op.  The torch backend is plain differentiable
    PyTorch (kron_expand_reference), which needs no registration."""
    torch.library.opcheck(torch.ops.growlib.kron_expand.default, kron_args(per_layer, vector))


@pytest.mark.parametrize("wanted", [[True, True, True, True], [False, True, False, True]], ids=["all", "E-and-D"])
def test_kron_expand_backward_custom_op_passes_opcheck(wanted):
    W, E, F, D = (t.detach() for t in kron_args(per_layer=True))
    out, *step_inputs = torch.ops.growlib.kron_expand(W, E, F, D)
    args = (torch.randn_like(out), [W, *step_inputs], E, F, D, wanted)
    torch.library.opcheck(torch.ops.growlib.kron_expand_backward.default, args)
    assert [g.shape for g in torch.ops.growlib.kron_expand_backward(*args)] == [
        t.shape for t, need in zip((W, E, F, D), wanted) if need]


def test_kron_expand_triton_backward_refuses_double_backward():
    """The Triton backward is differentiable once (a second derivative needs the torch backend)."""
    W, E, F, D = kron_args(per_layer=True)
    with growlib.use_backend("triton"):
        out = growlib.kron_expand(W, E, F, D)
    grad_E, = torch.autograd.grad(out.square().sum(), E, create_graph=True)
    with pytest.raises(RuntimeError, match=r"no double backward\): use backend 'torch'"):
        grad_E.sum().backward()
