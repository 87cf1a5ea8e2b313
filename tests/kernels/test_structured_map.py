"""The structured-map Triton kernel (interpreter on CPU) against the PyTorch reference.

Random tasks with awkward sizes (1, primes, just over the 64-wide tile), strided and transposed views,
several depth sources and nonzeros per row, with and without the blend and RMS epilogues."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib import ops, reference
from tests.conftest import DEVICE

# Per-dtype tolerance, relative to max(1, |ref|).  fp16/bf16 also obey the three-way rule below.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def random_table(generator, sizes_out_in, k):
    """One (index, weight) table holding a random sparse-row map per (n_out, n_in) pair; returns starts."""
    index, weight, starts, start = [], [], [], 0
    for n_out, n_in in sizes_out_in:
        index.append(torch.randint(0, n_in, (n_out, k), generator=generator, dtype=torch.int32))
        w = torch.randn(n_out, k, generator=generator)
        w[torch.rand(n_out, k, generator=generator) < 0.2] = 0.0  # padding entries
        weight.append(w)
        starts.append(start)
        start += n_out
    return torch.cat(index), torch.cat(weight), starts


def random_tasks(seed, dtype, shapes, kd, k, transpose_every=2):
    """Tasks mapping random sources (src_rows, src_cols) to outputs (rows, cols)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for (rows, cols), (src_rows, src_cols) in shapes:
        pairs += [(rows, src_rows), (cols, src_cols)]
    table_index, table_weight, starts = random_table(g, pairs, k)
    dst, src = [], []
    for t, ((rows, cols), (src_rows, src_cols)) in enumerate(shapes):
        out = torch.randn(cols, rows, generator=g).t() if t % transpose_every else torch.randn(rows, cols, generator=g)
        dst.append(out.to(dtype))
        sources = []
        for d in range(kd):
            s = torch.randn(src_rows, src_cols + 3, generator=g)[:, 1:1 + src_cols]  # strided view
            sources.append(s.to(dtype) if d % 2 == 0 else s.t().contiguous().t().to(dtype))
        src.append(sources)
    depth_weight = torch.randn(len(shapes), kd, generator=g)
    row_start = torch.tensor(starts[0::2], dtype=torch.int64)
    col_start = torch.tensor(starts[1::2], dtype=torch.int64)
    return ([t.to(DEVICE) for t in dst], [[s.to(DEVICE) for s in row] for row in src],
            *(t.to(DEVICE) for t in (depth_weight, row_start, col_start, table_index, table_weight)))


SHAPES = [
    [((1, 1), (1, 1))],
    [((5, 7), (3, 11)), ((65, 1), (13, 1)), ((2, 67), (2, 31))],
    [((66, 65), (33, 65)), ((13, 17), (26, 34))],
]


def run(backend, dst, *args, **kwargs):
    out = [t.clone() for t in dst]
    with growlib.use_backend(backend):
        ops.structured_map_(out, *args, **kwargs)
    return out


def assert_matches(kernel, dtype, oracle, same_dtype):
    for got, exact, torch_got in zip(kernel, oracle, same_dtype):
        scale = exact.abs().clamp_min(1.0)
        err = (got.double() - exact).abs()
        if dtype == torch.float32:
            assert (err <= TOLERANCE[dtype] * scale).all(), float((err / scale).max())
        else:
            torch_err = (torch_got.double() - exact).abs()
            assert (err <= 2 * torch_err + TOLERANCE[dtype] * scale).all(), float((err / scale).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", SHAPES, ids=["one", "primes", "over-block"])
@pytest.mark.parametrize("epilogue", ["plain", "blend", "rms", "rms-blend"])
def test_kernel_matches_reference(dtype, shapes, epilogue):
    kd, k = (1, 1) if shapes is SHAPES[0] else (3, 2)
    dst, src, dw, rs, cs, ti, tw = random_tasks(7, dtype, shapes, kd, k)
    rms = epilogue.startswith("rms")
    if rms:  # second moments are non-negative
        src = [[s.abs() for s in row] for row in src]
        dst = [t.abs() for t in dst]
    alpha = 0.3 if epilogue.endswith("blend") else None
    kernel = run("triton", dst, src, dw, rs, cs, ti, tw, alpha=alpha, rms=rms)
    same_dtype = run("torch", dst, src, dw, rs, cs, ti, tw, alpha=alpha, rms=rms)
    oracle = [t.double() for t in dst]  # fp64 on the same device: the kernel's inputs, computed exactly
    reference.structured_map(oracle, [[s.double() for s in row] for row in src], dw, rs, cs, ti, tw,
                             alpha=alpha, rms=rms)
    assert_matches(kernel, dtype, oracle, same_dtype)
    if rms:
        assert all((t >= 0).all() for t in kernel)


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
            ops.structured_map_(views, [[src], [src]], torch.ones(2, 1, device=DEVICE),
                                torch.zeros(2, dtype=torch.int64, device=DEVICE),
                                torch.zeros(2, dtype=torch.int64, device=DEVICE), table_index, table_weight)
        assert torch.equal(base[:, 0:4], src) and torch.equal(base[:, 8:12], src)
        assert torch.equal(base[:, 4:8], torch.zeros(6, 4, device=DEVICE))
