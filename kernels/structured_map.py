"""Structured (sparse) growth maps over many tensors in one launch.

Every task t writes one 2-D output ``dst[t]`` (rows x cols, any strides)::

    mapped[a, b] = sum_d depth_w[t, d] * sum_k sum_m  rw[a, k] * cw[b, m] * src[t][d][ri[a, k], ci[b, m]]

where (ri, rw) are the rows ``row_start[t] .. row_start[t] + rows`` of the shared (index, weight) table and
(ci, cw) the rows ``col_start[t] ..`` of the same table.  That is ``sum_d D[t, d] * E @ W_d @ F^T`` with E
and F given as a few nonzeros per row.  Epilogues, all in fp32:

* ``blend``: ``dst = (1 - alpha) * dst + alpha * mapped`` (fused interpolation);
* ``rms``: inputs are non-negative second moments; the map runs on their square roots with absolute
  weights and the result is squared, so the output stays non-negative and copies/averages invert exactly
  (``tl.sqrt_rn``, correctly rounded as torch's: ``tl.sqrt`` compiles to an approximation that flushes
  denormal moments to zero).

One program handles one (task, tile) pair from a host-built schedule, so a whole model (all tensors, all
layers) is one launch per dtype.  Tensors are addressed through int64 pointer tables.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import triton
import triton.language as tl

from growlib.kernels import launch

_TORCH_TO_TRITON = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TORCH_TO_TRITON)


@triton.jit
def _table_rows(tab_index, tab_weight, table_row, ok, K: tl.constexpr, RMS: tl.constexpr):
    """(indices, weights): K-tuples of the table's columns at rows ``table_row``; absolute weights for RMS."""
    indices = ()
    weights = ()
    for k in tl.static_range(K):
        indices = indices + (tl.load(tab_index + table_row * K + k, mask=ok, other=0).to(tl.int64),)
        weight = tl.load(tab_weight + table_row * K + k, mask=ok, other=0.0)
        weights = weights + (tl.abs(weight) if RMS else weight,)
    return indices, weights


@triton.jit
def _structured_map_kernel(
    prog_task, prog_tile,                      # (P,) int32: which task and which tile each program does
    dst_ptr, dst_meta,                         # (T,) int64 addresses; (T, 4) int64 rows, cols, stride_r, stride_c
    src_ptr, src_strides, depth_w,             # (T, KD) int64; (T, KD, 2) int64; (T, KD) fp32
    row_start, col_start,                      # (T,) int64 first table row of the task's row / column map
    tab_index, tab_weight,                     # (N, K) int32 / fp32 shared sparse-row table
    alpha,
    KD: tl.constexpr, K: tl.constexpr,
    SRC_DTYPE: tl.constexpr, DST_DTYPE: tl.constexpr,
    BLEND: tl.constexpr, RMS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    task = tl.load(prog_task + pid).to(tl.int64)
    tile = tl.load(prog_tile + pid)
    n_rows = tl.load(dst_meta + task * 4 + 0)
    n_cols = tl.load(dst_meta + task * 4 + 1)
    d_stride_r = tl.load(dst_meta + task * 4 + 2)
    d_stride_c = tl.load(dst_meta + task * 4 + 3)
    # Tile counts fit int32 (the schedule is int32), and an int32 division is a few instructions where an
    # int64 one is a subroutine call.
    n_col_tiles = tl.cdiv(n_cols, BLOCK_C).to(tl.int32)
    rows = (tile // n_col_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = (tile % n_col_tiles).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    # The tile's rows of the (index, weight) table, K of each, loaded once: they do not depend on the layer d.
    r_idx, r_w = _table_rows(tab_index, tab_weight, tl.load(row_start + task) + rows, row_ok, K, RMS)
    c_idx, c_w = _table_rows(tab_index, tab_weight, tl.load(col_start + task) + cols, col_ok, K, RMS)

    # Nested sums D (E (W F^T)): each level adds only K (or KD) terms, so averaging copies that de-coalescing
    # made (two equal terms a level) is exact and coalesce(decoalesce(x)) == x holds bit for bit.
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for d in tl.static_range(KD):
        w_d = tl.load(depth_w + task * KD + d)
        if RMS:
            w_d = tl.abs(w_d)
        src = tl.load(src_ptr + task * KD + d).to(tl.pointer_type(SRC_DTYPE))
        s_stride_r = tl.load(src_strides + (task * KD + d) * 2 + 0)
        s_stride_c = tl.load(src_strides + (task * KD + d) * 2 + 1)
        layer_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(K):
            # Only terms of nonzero weight are read: padded table entries and sources have weight 0, and so do
            # rows and columns outside the tile (masked table loads).
            row_live = r_w[k] * w_d != 0.0
            row_src = src + r_idx[k] * s_stride_r
            row_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for m in tl.static_range(K):
                col_live = c_w[m] != 0.0
                x = tl.load(row_src[:, None] + (c_idx[m] * s_stride_c)[None, :],
                            mask=row_live[:, None] & col_live[None, :], other=0.0).to(tl.float32)
                if RMS:
                    x = tl.sqrt_rn(tl.maximum(x, 0.0))
                row_acc += c_w[m][None, :] * x
            layer_acc += r_w[k][:, None] * row_acc
        acc += w_d * layer_acc

    dst = tl.load(dst_ptr + task).to(tl.pointer_type(DST_DTYPE))
    d_offs = rows[:, None] * d_stride_r + cols[None, :] * d_stride_c
    if BLEND:
        old = tl.load(dst + d_offs, mask=tile_ok, other=0.0).to(tl.float32)
        if RMS:
            old = tl.sqrt_rn(tl.maximum(old, 0.0))
        acc = (1.0 - alpha) * old + alpha * acc
    if RMS:
        acc = acc * acc
    tl.store(dst + d_offs, acc.to(DST_DTYPE), mask=tile_ok)


def launch_config(capability: tuple[int, int] | None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) on a GPU of compute ``capability``: 16 x 64 tiles over 8 warps, 4 elements
    a thread.  Under Triton's interpreter (capability None), 64 x 64 tiles: a quarter of the programs, each
    simulated one at a time, for the same result (a tile only decides which program writes which elements).

    The kernel is a gather, and ptxas issues all KD * K * K loads of an element before it adds any, so its
    registers grow with the elements a thread holds times KD * K * K, plus a 64-bit address per load and the
    hoisted table entries of the thread's rows and columns.  At 64 x 64 over 4 warps (32 elements a thread) the
    coalescing maps (KD = K = 2) took all 255 registers and spilled ~900 bytes a thread; at 4 elements a thread
    every variant stays at or under 80 without spilling on sm_80 and sm_90 (tests/kernels/test_launch_configs.py
    checks <= 128), three blocks fit an SM, and each thread still has up to KD * K * K * 4 loads in flight.
    1024 elements a program is the block of Triton's vector-add tutorial; perf/bench_structured.py measures
    the bandwidth on a GPU.  No dot and no pipelined loads: almost no shared memory, so one configuration
    suits every GPU."""
    if capability is None:
        return 64, 64, 4
    return 16, 64, 8


def structured_map(
    dst: Sequence[torch.Tensor],
    src: Sequence[Sequence[torch.Tensor]],
    depth_weight: torch.Tensor,
    row_start: torch.Tensor,
    col_start: torch.Tensor,
    table_index: torch.Tensor,
    table_weight: torch.Tensor,
    *,
    alpha: float | None = None,
    rms: bool = False,
) -> None:
    """Launch the structured-map kernel over T tasks (see the module docstring); writes ``dst`` in place.

    dst: T 2-D tensors of one dtype; src: T sequences of KD 2-D tensors of one dtype (pad with any tensor
    and depth weight 0); depth_weight (T, KD) fp32; row_start / col_start (T,) int64; table_index (N, K)
    int32 and table_weight (N, K) fp32.  All on one device.  Callers validate shapes (growlib.ops does)."""
    num_tasks = len(dst)
    if num_tasks == 0:
        return
    kd = depth_weight.shape[1]
    k = table_index.shape[1]
    device = dst[0].device
    block_r, block_c, num_warps = launch_config(launch.device_capability(device))

    dst_meta = torch.tensor([[t.shape[0], t.shape[1], t.stride(0), t.stride(1)] for t in dst], dtype=torch.int64)
    dst_ptr = torch.tensor([t.data_ptr() for t in dst], dtype=torch.int64)
    src_ptr = torch.tensor([[s.data_ptr() for s in row] for row in src], dtype=torch.int64)
    src_strides = torch.tensor([[[s.stride(0), s.stride(1)] for s in row] for row in src], dtype=torch.int64)

    tiles = [triton.cdiv(r, block_r) * triton.cdiv(c, block_c) for r, c in dst_meta[:, :2].tolist()]
    prog_task = torch.repeat_interleave(torch.arange(num_tasks, dtype=torch.int32), torch.tensor(tiles))
    first_program = torch.cumsum(torch.tensor([0] + tiles[:-1]), 0)
    prog_tile = (torch.arange(len(prog_task)) - first_program[prog_task.long()]).to(torch.int32)
    if len(prog_task) == 0:
        return

    def on_device(t):
        return t.to(device, non_blocking=True)

    launch.note("structured_map", src=str(src[0][0].dtype).removeprefix("torch."),
                dst=str(dst[0].dtype).removeprefix("torch."), BLEND=alpha is not None, RMS=rms, KD=kd, K=k,
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    # Triton launches on the current CUDA device: make it the tensors' device.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _structured_map_kernel[(len(prog_task),)](
            on_device(prog_task), on_device(prog_tile),
            on_device(dst_ptr), on_device(dst_meta),
            on_device(src_ptr), on_device(src_strides), depth_weight,
            row_start, col_start, table_index, table_weight,
            float(alpha) if alpha is not None else 0.0,
            KD=kd, K=k,
            SRC_DTYPE=_TORCH_TO_TRITON[src[0][0].dtype], DST_DTYPE=_TORCH_TO_TRITON[dst[0].dtype],
            BLEND=alpha is not None, RMS=rms,
            BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=num_warps,
        )
