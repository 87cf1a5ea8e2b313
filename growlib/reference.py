"""PyTorch references of every kernel: the CPU path, the tests' oracle and the benchmarks' baseline.

Each function has the signature of its launcher in ``growlib.kernels`` and computes the same thing with
plain tensor operations, in fp32 (fp64 when the inputs are fp64)."""

from __future__ import annotations

from typing import Sequence

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    """Reference of ``growlib.kernels.structured_map.structured_map``; writes ``dst`` in place."""
    for t, out in enumerate(dst):
        compute = _compute_dtype(out.dtype)
        n_rows, n_cols = out.shape
        r0, c0 = int(row_start[t]), int(col_start[t])
        r_idx, r_w = table_index[r0:r0 + n_rows].long(), table_weight[r0:r0 + n_rows].to(compute)
        c_idx, c_w = table_index[c0:c0 + n_cols].long(), table_weight[c0:c0 + n_cols].to(compute)
        d_w = depth_weight[t].to(compute)
        if rms:
            r_w, c_w, d_w = r_w.abs(), c_w.abs(), d_w.abs()
        acc = torch.zeros(n_rows, n_cols, dtype=compute, device=out.device)
        for d, source in enumerate(src[t]):
            if float(d_w[d]) == 0.0:
                continue
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
