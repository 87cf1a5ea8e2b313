"""Backend policy, input validation of the kernel entry point, and its torch.library registration."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib import ops
from tests.conftest import DEVICE


def one_task(rows=3, cols=4):
    dst = [torch.zeros(rows, cols)]
    src = [[torch.randn(rows, cols)]]
    table_index = torch.cat([torch.arange(rows), torch.arange(cols)]).to(torch.int32).unsqueeze(1)
    table_weight = torch.ones(rows + cols, 1)
    return dst, src, torch.ones(1, 1), torch.tensor([0]), torch.tensor([rows]), table_index, table_weight


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
    assert ops.resolve_backend(torch.device("cpu")) == "torch"
    assert ops.resolve_backend(torch.device("cuda")) == "triton"


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with growlib.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend(torch.device("cpu"))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        with growlib.use_backend("cuda"):
            pass


def _replace(args, position, value):
    args = list(args)
    args[position] = value
    return args


BAD_INPUTS = [
    ("empty dst", lambda a: _replace(a, 0, []), TypeError, "dst"),
    ("src length", lambda a: _replace(a, 1, []), ValueError, "src"),
    ("depth_weight shape", lambda a: _replace(a, 2, torch.ones(2, 1)), ValueError, "depth_weight"),
    ("depth_weight dtype", lambda a: _replace(a, 2, torch.ones(1, 1, dtype=torch.float64)), TypeError,
     "depth_weight"),
    ("row_start dtype", lambda a: _replace(a, 3, torch.tensor([0], dtype=torch.int32)), ValueError, "row_start"),
    ("col_start past table", lambda a: _replace(a, 4, torch.tensor([6])), ValueError, "col_start"),
    ("table dtype", lambda a: _replace(a, 5, a[5].long()), TypeError, "table_index"),
    ("table shapes", lambda a: _replace(a, 6, torch.ones(7, 2)), ValueError, "table_weight"),
    ("index past source", lambda a: _replace(a, 5, a[5] + 3), ValueError, "index"),
    ("dst not 2-D", lambda a: _replace(a, 0, [torch.zeros(12)]), ValueError, "dst"),
    ("src dtypes differ", lambda a: _replace(_replace(a, 1, [[a[1][0][0], a[1][0][0].double()]]), 2,
                                             torch.ones(1, 2)), ValueError, r"src\[0\]\[1\]"),
    ("src count", lambda a: _replace(a, 1, [[a[1][0][0], a[1][0][0]]]), ValueError, "KD"),
    ("in place", lambda a: _replace(a, 1, [[a[0][0]]]), ValueError, "overlaps"),
    ("negative index", lambda a: _replace(a, 5, a[5] - 1), ValueError, "index"),
    ("zero stride", lambda a: _replace(a, 0, [torch.zeros(1, 4).expand(3, 4)]), ValueError, "zero stride"),
]


@pytest.mark.parametrize("name,mutate,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_parameter(name, mutate, error, match):
    args = mutate(one_task())
    with pytest.raises(error, match=match):
        ops.structured_map_(*args)


def test_overlapping_views_are_refused_but_disjoint_interleaved_views_pass():
    base = torch.zeros(3, 8)
    dst, src, *rest = one_task()
    with pytest.raises(ValueError, match="overlaps"):
        ops.structured_map_([base[:, 0:4]], [[base[:, 2:6]]], *rest)
    ops.structured_map_([base[:, 0:4]], [[base[:, 4:8]]], *rest)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ops.structured_map_(*one_task(), alpha=alpha)


def test_triton_backend_rejects_float64():
    dst, src, *rest = one_task()
    rest = [t.to(DEVICE) for t in rest]
    with growlib.use_backend("triton"), pytest.raises(TypeError, match="torch"):
        ops.structured_map_([dst[0].double().to(DEVICE)], [[src[0][0].double().to(DEVICE)]], *rest)


def test_custom_op_registration_passes_opcheck():
    dst, src, dw, rs, cs, ti, tw = one_task()
    args = (dst, [s for row in src for s in row], dw, rs, cs, ti, tw, 0.5, True, False, "torch")
    torch.library.opcheck(torch.ops.growlib.structured_map_.default, args)



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
    PyTorch (growlib.reference), which needs no registration."""
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
        out = ops.kron_expand(W, E, F, D)
    grad_E, = torch.autograd.grad(out.square().sum(), E, create_graph=True)
    with pytest.raises(RuntimeError, match=r"no double backward\): use backend 'torch'"):
        grad_E.sum().backward()
