"""The structured-map Triton kernel (interpreter on CPU) against the PyTorch reference.

The value cases (random tasks with awkward sizes: 1, primes, just over the 64-wide tile; strided and transposed
views; several depth sources and nonzeros per row; with and without the blend and RMS epilogues) live in
growlib.kernels.cases, shared with ``growlib check-kernels``; this file runs them and checks view semantics,
input validation and the torch.library registration."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib.kernels import cases as kernel_cases
from growlib.kernels import structured_map
from tests.conftest import DEVICE


@pytest.mark.parametrize("case", kernel_cases.cases_for("structured_map"), ids=lambda case: case.id)
def test_kernel_matches_reference(case):
    assert not kernel_cases.failures(case.run(DEVICE))


def test_tasks_not_written_stay_untouched_and_views_write_through():
    """Writing into column slices of one tensor (GPT-2's fused c_attn) touches exactly those columns."""
    base = torch.zeros(6, 12, device=DEVICE)
    src = torch.randn(6, 4, device=DEVICE)
    views = [base[:, 0:4], base[:, 8:12]]
    table_index = torch.arange(6, dtype=torch.int32, device=DEVICE).unsqueeze(1)
    table_weight = torch.ones(6, 1, device=DEVICE)
    for backend in ("triton", "torch"):
        base.zero_()
        with growlib.use_backend(backend):
            growlib.structured_map_(views, [[src], [src]], torch.ones(2, 1, device=DEVICE),
                                    torch.zeros(2, dtype=torch.int64, device=DEVICE),
                                    torch.zeros(2, dtype=torch.int64, device=DEVICE), table_index, table_weight)
        assert torch.equal(base[:, 0:4], src) and torch.equal(base[:, 8:12], src)
        assert torch.equal(base[:, 4:8], torch.zeros(6, 4, device=DEVICE))


def one_task(rows=3, cols=4):
    dst = [torch.zeros(rows, cols)]
    src = [[torch.randn(rows, cols)]]
    table_index = torch.cat([torch.arange(rows), torch.arange(cols)]).to(torch.int32).unsqueeze(1)
    table_weight = torch.ones(rows + cols, 1)
    return dst, src, torch.ones(1, 1), torch.tensor([0]), torch.tensor([rows]), table_index, table_weight


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
        growlib.structured_map_(*args)


def test_overlapping_views_are_refused_but_disjoint_interleaved_views_pass():
    base = torch.zeros(3, 8)
    dst, src, *rest = one_task()
    with pytest.raises(ValueError, match="overlaps"):
        growlib.structured_map_([base[:, 0:4]], [[base[:, 2:6]]], *rest)
    growlib.structured_map_([base[:, 0:4]], [[base[:, 4:8]]], *rest)


@pytest.mark.parametrize("seed", range(20))
def test_the_overlap_check_agrees_with_comparing_every_pair(seed):
    """The sorted walk finds an overlap exactly when some (output, source) pair shares an element, also past
    a long source that spans others (its end is carried forward) and between interleaved strided views."""
    generator = torch.Generator().manual_seed(seed)
    storage = torch.zeros(400)

    def view():
        start, length = (int(v) for v in torch.randint(0, 200, (2,), generator=generator))
        step = int(torch.randint(1, 4, (1,), generator=generator))
        return storage[start:start + length + 1:step]

    outputs = [view() for _ in range(int(torch.randint(1, 4, (1,), generator=generator)))]
    sources = [view() for _ in range(int(torch.randint(1, 12, (1,), generator=generator)))]
    elements = [set(range(v.storage_offset(), v.storage_offset() + v.numel() * v.stride(0), v.stride(0)))
                for v in (*outputs, *sources)]
    overlapping = any(elements[o] & elements[len(outputs) + s] for o in range(len(outputs))
                      for s in range(len(sources)))
    if overlapping:
        with pytest.raises(ValueError, match="overlaps"):
            structured_map._check_no_overlap(outputs, sources)
    else:
        structured_map._check_no_overlap(outputs, sources)


def test_the_overlap_check_looks_past_short_sources_to_a_long_one():
    storage = torch.zeros(300)
    long, short, output = storage[0:300:2], storage[50:60], storage[100:110:2]  # long shares 100, 102, ...
    with pytest.raises(ValueError, match="overlaps"):
        structured_map._check_no_overlap([output], [short, long])
    structured_map._check_no_overlap([storage[101:111:2]], [short, storage[0:300:3][:30]])  # ends at 87


def test_a_view_of_another_dtype_inside_source_elements_overlaps():
    storage = torch.zeros(8)
    sources, output = storage[0:8:2], storage.view(torch.bfloat16)[1:16:4]  # the high halves of 0, 2, 4, 6
    with pytest.raises(ValueError, match="overlaps"):
        structured_map._check_no_overlap([output], [sources])
    structured_map._check_no_overlap([storage.view(torch.bfloat16)[2:16:4]], [sources])  # elements 1, 3, 5, 7


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        growlib.structured_map_(*one_task(), alpha=alpha)


def test_triton_backend_rejects_float64():
    dst, src, *rest = one_task()
    rest = [t.to(DEVICE) for t in rest]
    with growlib.use_backend("triton"), pytest.raises(TypeError, match="torch"):
        growlib.structured_map_([dst[0].double().to(DEVICE)], [[src[0][0].double().to(DEVICE)]], *rest)


def test_custom_op_registration_passes_opcheck():
    dst, src, dw, rs, cs, ti, tw = one_task()
    args = (dst, [s for row in src for s in row], dw, rs, cs, ti, tw, 0.5, True, False, "torch")
    torch.library.opcheck(torch.ops.growlib.structured_map_.default, args)
