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


def kron_expand(W: torch.Tensor, E: torch.Tensor, F: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Reference of ``growlib.ops.kron_expand``: ``out[l] = E_l (sum_j D[l, j] W[j]) F_l^T``.

    W (L1, O1, I1), D (L2, L1), E (O2, O1) shared by all layers or (L2, O2, O1) one per output layer, F
    likewise (I2, I1) or (L2, I2, I1) -> (L2, O2, I2) in W's dtype.  A plain einsum chain computed in fp32
    (fp64 for fp64 inputs) so that it is an oracle for the kernels rather than a second bf16 computation;
    autograd through it gives the gradients of all four inputs.  The depth mix runs first, on the small
    matrices (per-layer maps need it first), so no (L2, L1, ...) product is ever formed."""
    compute = _compute_dtype(W.dtype)
    mixed = torch.einsum("lj,jab->lab", D.to(compute), W.to(compute))
    rows = torch.einsum("loa,lab->lob" if E.dim() == 3 else "oa,lab->lob", E.to(compute), mixed)
    return torch.einsum("lob,lib->loi" if F.dim() == 3 else "lob,ib->loi", rows, F.to(compute)).to(W.dtype)


def kron_expand_vector(w: torch.Tensor, E: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Reference of ``growlib.ops.kron_expand_vector``, the 1-D form for biases and norms:
    ``out[l] = E_l sum_j D[l, j] w[j]``; w (L1, O1), D (L2, L1), E (O2, O1) or (L2, O2, O1) -> (L2, O2) in w's
    dtype, computed in fp32 (fp64 for fp64 inputs) like ``kron_expand``."""
    compute = _compute_dtype(w.dtype)
    mixed = torch.einsum("lj,ja->la", D.to(compute), w.to(compute))
    return torch.einsum("loa,la->lo" if E.dim() == 3 else "oa,la->lo", E.to(compute), mixed).to(w.dtype)


# ----------------------------------------------------------------------------------------------------------
# Forward-only fused blocks for frozen layers (kernels/fused_norm.py, fused_activation.py, rope.py)
# ----------------------------------------------------------------------------------------------------------

def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float, rms: bool,
             return_sum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of ``growlib.kernels.fused_norm.add_norm``: LayerNorm (or RMSNorm) of ``x + residual`` over
    the last axis, statistics taken from the unrounded sum; returns (out, sum or None) in x's dtype."""
    compute = _compute_dtype(x.dtype)
    s = x.to(compute)
    if residual is not None:
        s = s + residual.to(compute)
    centred = s if rms else s - s.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype), (s.to(x.dtype, copy=True) if return_sum else None)


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The activations of ``growlib.kernels.fused_activation`` (gelu, gelu_tanh, silu, relu)."""
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"activation must be one of gelu, gelu_tanh, silu, relu, got {name!r}")


def bias_activation(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Reference of ``growlib.kernels.fused_activation.bias_activation``: act(x + bias), in x's dtype."""
    y = x.to(_compute_dtype(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return apply_activation(y, activation).to(x.dtype)


def gated_activation(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Reference of ``growlib.kernels.fused_activation.gated_activation``: for ``x = [gate | up]`` (last axis
    2N), act(gate) * up (biases added first), in x's dtype."""
    y = x.to(_compute_dtype(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    gate, up = y.chunk(2, dim=-1)
    return (apply_activation(gate, activation) * up).to(x.dtype)


def rope_split_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> torch.Tensor:
    """Reference of ``growlib.kernels.rope.rope_split_qkv``: (B, S, (H + 2 KV) * D) -> (B, H + 2 KV, S, D),
    query and key heads rotated with HF's ``rotate_half`` convention, value heads copied."""
    compute = _compute_dtype(qkv.dtype)
    batch, seq_len, width = qkv.shape
    n_heads = num_heads + 2 * num_kv_heads
    heads = qkv.to(compute).reshape(batch, seq_len, n_heads, width // n_heads).transpose(1, 2)
    rotated = num_heads + num_kv_heads
    x = heads[:, :rotated]
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    x = x * cos.to(compute).unsqueeze(1) + turned * sin.to(compute).unsqueeze(1)
    return torch.cat((x, heads[:, rotated:]), dim=1).to(qkv.dtype).contiguous()
