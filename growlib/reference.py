"""PyTorch references of every kernel: the CPU path, the tests' oracle and the benchmarks' baseline.

Each function has the signature of its launcher in ``growlib.kernels`` and computes the same thing with
plain tensor operations, in fp32 (fp64 when the inputs are fp64)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def map_task(out: torch.Tensor, sources: Sequence[torch.Tensor], depth_weights: torch.Tensor,
             r_idx: torch.Tensor, r_w: torch.Tensor, c_idx: torch.Tensor, c_w: torch.Tensor,
             alpha: float | None, rms: bool) -> None:
    """One task of ``structured_map``, with its table rows already sliced: pure tensor code, so
    ``torch.compile`` can trace it (the benchmarks compile it)."""
    compute = _compute_dtype(out.dtype)
    r_idx, r_w, c_idx, c_w = r_idx.long(), r_w.to(compute), c_idx.long(), c_w.to(compute)
    d_w = depth_weights.to(compute)
    if rms:
        r_w, c_w, d_w = r_w.abs(), c_w.abs(), d_w.abs()
    acc = torch.zeros(out.shape, dtype=compute, device=out.device)
    for d, source in enumerate(sources):
        x = source.to(compute)
        if rms:
            x = x.clamp_min(0).sqrt()
        # gathered[a, k, b, m] = x[r_idx[a, k], c_idx[b, m]]; nested sums in the kernel's order (D (E (W F^T)))
        gathered = x[r_idx][:, :, c_idx]
        per_row_copy = (gathered * c_w).sum(-1)
        acc += d_w[d] * (per_row_copy * r_w.unsqueeze(-1)).sum(1)
    if alpha is not None:
        old = out.to(compute)
        if rms:
            old = old.clamp_min(0).sqrt()
        acc = (1.0 - alpha) * old + alpha * acc
    if rms:
        acc = acc * acc
    out.copy_(acc)


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
    task: Callable = map_task,
) -> None:
    """Reference of ``growlib.kernels.structured_map.structured_map``; writes ``dst`` in place.

    Host-side bookkeeping (table offsets, skipping zero-weight sources) happens here; the arithmetic is
    ``task`` (``map_task``, or a compiled version of it)."""
    weights = depth_weight.tolist()
    for t, (out, r0, c0) in enumerate(zip(dst, row_start.tolist(), col_start.tolist())):
        live = [d for d, w in enumerate(weights[t]) if w != 0.0]
        n_rows, n_cols = out.shape
        task(out, [src[t][d] for d in live], depth_weight[t, live],
             table_index[r0:r0 + n_rows], table_weight[r0:r0 + n_rows],
             table_index[c0:c0 + n_cols], table_weight[c0:c0 + n_cols], alpha, rms)
