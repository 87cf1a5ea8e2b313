"""A frozen layer's weights packed for growlib.frozen's forward-only stack: the pieces each adapter's
``pack_layer`` assembles (fused QKV, fused gate+up, in the compute dtype) and the HF activation names the fused
kernels implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from growlib.kernels.frozen.add_norm import add_norm

# HF activation names -> the fused kernels' activations.  The tanh-approximated GELUs differ only in how they
# round, so they share one kernel.
ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu",
               "relu": "relu"}


@dataclass
class PackedNorm:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    rms: bool

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, return_sum: bool = False):
        return add_norm(x, residual, self.weight, self.bias, eps=self.eps, rms=self.rms, return_sum=return_sum)


@dataclass
class PackedLinear:
    """``x @ W^T + b``; ``in_major`` weights (GPT-2's Conv1D) are stored (in, out) and used as ``x @ W``, so
    neither layout is copied."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    in_major: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.in_major:
            return F.linear(x, self.weight, self.bias)
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)


@dataclass
class PackedLayer:
    norm1: PackedNorm      # pre-LN: before attention; post-LN (BERT): after the attention residual add
    norm2: PackedNorm      # pre-LN: before the MLP (parallel residual: on the layer's input); post-LN: after
                           # the MLP residual add
    qkv: PackedLinear      # rows: H query heads, then KV key heads, then KV value heads
    out: PackedLinear
    up: PackedLinear       # no bias: the bias is added in the activation pass
    up_bias: torch.Tensor | None
    down: PackedLinear
    activation: str
    gated: bool       # up holds [gate | up]: act(gate) * up
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    rotary: bool
    rotary_dims: int | None = None    # RoPE rotates the first rotary_dims of each head (None: all of it)
    parallel_residual: bool = False   # h + attn(norm1(h)) + mlp(norm2(h)) (GPT-NeoX), not one branch after the other
    #: sliding-window attention (Mistral, Qwen2's sliding layers): each query sees only the last
    #: ``sliding_window`` positions, itself included; None: every position its mask allows
    sliding_window: int | None = None


def packed(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor in the compute dtype, contiguous; shares the parameter's storage when it already is."""
    return None if t is None else t.detach().to(dtype).contiguous()


def fused(tensors: Sequence[torch.Tensor | None], dtype: torch.dtype, what: str) -> torch.Tensor | None:
    """Concatenation along the output axis (fused QKV or gate+up), or None when none of the parts has one."""
    present = [t is not None for t in tensors]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"the {what} projections must all have biases or none: growlib cannot fuse a mix")
    return torch.cat([t.detach().to(dtype) for t in tensors], dim=0)


def fused_linear(parts: Sequence[torch.nn.Module], dtype: torch.dtype, what: str) -> PackedLinear:
    """Separate projections (Q, K, V) as one linear: weights and biases stacked along the output rows."""
    return PackedLinear(fused([p.weight for p in parts], dtype, what), fused([p.bias for p in parts], dtype, what))


def pack_norm(module: torch.nn.Module, dtype: torch.dtype) -> PackedNorm:
    if isinstance(module, torch.nn.LayerNorm):
        return PackedNorm(packed(module.weight, dtype), packed(module.bias, dtype), float(module.eps), rms=False)
    # LlamaRMSNorm and its copies: a ``weight`` and a ``variance_epsilon``
    return PackedNorm(packed(module.weight, dtype), None, float(module.variance_epsilon), rms=True)


def pack_linear(module: torch.nn.Module, dtype: torch.dtype, with_bias: bool = True) -> PackedLinear:
    bias = packed(module.bias, dtype) if with_bias else None
    return PackedLinear(packed(module.weight, dtype), bias, in_major=not isinstance(module, torch.nn.Linear))


def fused_activation_name(name, family: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"the {family} layers' activation {name!r} has no fused kernel; supported: "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
