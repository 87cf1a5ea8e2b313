"""Analytic FLOPs of one training step of a Hugging Face model that growlib supports.

The schedules are compared with training from scratch by the compute they spend, so every term here is a
matrix product the model really computes, counted as ``torch.utils.flop_counter.FlopCounterMode`` counts it
(a multiply-add is 2 FLOPs); the tests check that the two agree exactly on every family.

Counted, per step of ``batch_size`` sequences of ``seq_len`` tokens (B sequences, S positions, T = B * S):

- every linear map ``W`` (out x in) of the schema: ``2 * out * in`` per row it is applied to -- every token
  for the layers, the LM head (tied or not) and BERT's MLM transform; one row per sequence for a pooler and
  for ViT's classifier (they read the class token only; so do DeiT's two, on its class and distillation
  tokens); one row per patch (S - 1 per sequence, S - 2 for DeiT: the adapter's ``prefix_tokens`` are not
  projected) for the patch embedding, a convolution with stride = kernel, i.e. a linear map.  GPT-NeoX's fused
  per-head QKV is one matrix product, counted as its Q, K and V parts;
- attention, per layer: ``2 * S * attn`` per token for the scores Q K^T and as much for scores @ V.  HF's
  eager attention computes the full S x S score matrices, masked, causal or sliding-window alike (grouped-query
  keys and values are repeated to every query head first), and flop_counter counts its SDPA kernels the same
  way.
  Fused kernels may do otherwise (skip fully masked blocks, recompute the scores in the backward pass); the
  count is the model's, not a kernel's;
- Llama's rotary angle table (S positions x head_dim / 2 inverse frequencies), built once per forward pass
  without gradient, counted as whatever the installed transformers computes: a matrix product in 5.17
  (``head_dim * S`` FLOPs), an elementwise product in 5.24 (none).  Rather than keyed on a version, the
  model's own rotary embedding is run once on the step's positions under flop_counter to find out.

Not counted (zero): embedding lookups and their gradients (token / position / type tables, ViT's class token
and position table), norms, activations, softmax, RoPE's rotation of Q and K, residual adds, biases, the loss
-- elementwise or indexing work, which flop_counter does not count either -- and recomputation by gradient
checkpointing.

Backward, as autograd runs it: a matrix product computes the gradient of one of its operands only if that
operand requires grad.  Hence

- ``backward_weight``: a linear map's weight gradient (= its forward FLOPs) iff its weight requires grad;
- ``backward_input``: a linear map's input gradient (= its forward FLOPs) iff its input requires grad, and
  each attention product's gradient per operand (= its forward FLOPs each: Q and K for the scores, the
  softmaxed scores and V for the context) iff that operand requires grad;
- an activation requires grad iff some parameter with ``requires_grad`` lies upstream of it.  That is traced
  through each family's forward pass: embeddings, layers 0 .. L-1 (pre- or post-LN, as the family's adapter
  declares: post-LN for BERT and RoBERTa; or a parallel residual, GPT-NeoX's, whose MLP reads the layer's
  input), head; a norm's output requires grad if its input or its gain / bias
  does, a linear map's output if its input, weight or bias does, an attention product's output if either
  operand does.

So with the embeddings and lower layers frozen (MSLT) the frozen layers cost their forward pass only --
unless a norm or bias below them is trainable.  The first trainable layer computes weight gradients, and
input gradients only where a trainable tensor sits in between: none for the Q / K / V projections of
post-LN BERT, which read the frozen residual stream directly; all of them in a pre-LN model, whose
trainable input norm comes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from growlib.frozen import find_rotary_embedding
from growlib.models import Adapter, adapter_for
from growlib.schema import IN, Schema
from growlib.validate import require_int


@dataclass(frozen=True)
class OpFlops:
    """One matrix product of the step: a linear map (``attn.q``, ``head.out``, ...), an attention product
    (``attn.scores``, ``attn.context``) or Llama's rotary angle table (``embed.rotary``) of ``layer``
    (None: embeddings or head)."""

    name: str
    layer: int | None
    forward: int
    backward_input: int
    backward_weight: int

    @property
    def total(self) -> int:
        return self.forward + self.backward_input + self.backward_weight


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs of one step, split into the forward pass, activation gradients and weight gradients; ``ops``
    lists every matrix product counted, in forward order, so each total can be traced to its terms."""

    batch_size: int
    seq_len: int
    ops: tuple[OpFlops, ...]

    @property
    def forward(self) -> int:
        return sum(op.forward for op in self.ops)

    @property
    def backward_input(self) -> int:
        return sum(op.backward_input for op in self.ops)

    @property
    def backward_weight(self) -> int:
        return sum(op.backward_weight for op in self.ops)

    @property
    def total(self) -> int:
        return self.forward + self.backward_input + self.backward_weight


def step_flops(model: torch.nn.Module, batch_size: int, seq_len: int | None = None, *,
               training: bool = True) -> FlopsBreakdown:
    """FLOPs of one forward (and, if ``training``, backward) pass of ``model`` on ``batch_size`` sequences of
    ``seq_len`` tokens, given which parameters currently require grad (see the module docstring).

    For ViT the sequence is fixed by the config (patches + 1 class token): ``seq_len`` may be omitted."""
    adapter = adapter_for(model)
    schema = adapter.schema(model)
    require_int("batch_size", batch_size)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    seq_len = _checked_seq_len(schema, adapter, seq_len, adapter.max_seq_len(model.config))
    params = dict(model.named_parameters(remove_duplicate=False))
    trainable = {spec.key for spec in schema.specs if params[spec.source].requires_grad}
    step = _Step(schema, adapter, trainable, batch_size, seq_len, training)

    x = _embeddings(step)
    if adapter.rotary:
        _rotary_angles(step, model, seq_len)
    traced_layer = (_post_ln_layer if adapter.post_ln else
                    _parallel_layer if adapter.parallel_residual(model.config) else _pre_ln_layer)
    for layer in range(schema.num_layers):
        x = traced_layer(step, layer, x)
    _head(step, x)

    linear_weights = {spec.key for spec in schema.specs
                      if len(spec.axes) == 2 and spec.axes[1].side == IN}
    missed = sorted(f"{name} (layer {layer})" for name, layer in linear_weights - step.used)
    if missed:
        raise ValueError(f"step_flops does not know where the {schema.family} linear maps {missed} of "
                         f"{type(model).__name__} act; their FLOPs would be missing")
    return FlopsBreakdown(batch_size, seq_len, tuple(step.ops))


def _checked_seq_len(schema: Schema, adapter: Adapter, seq_len: int | None, longest: int | None) -> int:
    """``longest``: the most tokens the model's positions serve (the adapter's ``max_seq_len``)."""
    positions = schema.dims.get("pos")
    if adapter.task == "image_classification":
        if seq_len is not None and seq_len != positions:
            raise ValueError(f"seq_len of a {schema.family} model is its patches + {adapter.prefix_tokens} "
                             f"learned token(s): expected {positions} from the config, got {seq_len}")
        return positions
    if seq_len is None:
        raise TypeError(f"seq_len is required for a {schema.family} model")
    require_int("seq_len", seq_len)
    if longest is not None and seq_len > longest:
        raise ValueError(f"seq_len must be at most the {schema.family} model's {longest} positions, "
                         f"got {seq_len}")
    return seq_len


class _Step:
    """Records the matrix products of one step while the family's forward pass is traced below.

    Activations are represented by one bool: whether they require grad."""

    def __init__(self, schema: Schema, adapter: Adapter, trainable: set, batch_size: int, seq_len: int,
                 training: bool):
        self.schema, self.adapter, self.trainable, self.training = schema, adapter, trainable, training
        self.specs = {spec.key: spec for spec in schema.specs}
        self.rows = {"tokens": batch_size * seq_len, "sequences": batch_size,
                     "patches": batch_size * (seq_len - adapter.prefix_tokens)}
        self.attention = 2 * batch_size * seq_len * seq_len * schema.dims["attn"]
        self.ops: list[OpFlops] = []
        self.used: set = set()

    def has(self, name: str, layer: int | None = None) -> bool:
        return (name, layer) in self.specs

    def any_trainable(self, prefix: str, layer: int | None = None) -> bool:
        """Whether a tensor of ``layer`` named ``prefix.*`` requires grad (e.g. a norm's gain or bias)."""
        return any(l == layer and n.startswith(prefix + ".") for n, l in self.trainable)

    def linear(self, name: str, layer: int | None, x: bool, rows: str = "tokens", weight: str = "") -> bool:
        """``name`` applied to ``rows`` rows of an input that requires grad iff ``x``; its weight is the schema
        tensor ``weight`` (default ``name.weight``; the token embedding for a tied LM head)."""
        key = (weight or f"{name}.weight", layer)
        self.used.add(key)
        w = key in self.trainable
        flops = 2 * math.prod(self.schema.dims[a.role] for a in self.specs[key].axes) * self.rows[rows]
        self.ops.append(OpFlops(name, layer, flops, flops * (self.training and x), flops * (self.training and w)))
        return x or w or self.any_trainable(name, layer)

    def product(self, name: str, layer: int, left: bool, right: bool) -> bool:
        """An attention product of two activations (each a head-batched S x S by S x head_dim product)."""
        flops = self.attention
        self.ops.append(OpFlops(name, layer, flops, flops * self.training * (left + right), 0))
        return left or right


def _embeddings(step: _Step) -> bool:
    """Lookups and sums of embedding tables (and ViT's patch projection of the pixels, which need no
    gradient): the output requires grad iff an embedding parameter does."""
    if step.has("embed.patch.weight"):
        step.linear("embed.patch", None, False, rows="patches")
    return step.any_trainable("embed")


def _rotary_angles(step: _Step, model: torch.nn.Module, seq_len: int) -> None:
    """The angle table of Llama's rotary embedding, on the positions the model makes when given none (one row,
    0 .. S-1).  transformers 5.17 builds it as inv_freq (head_dim/2 x 1) @ positions (1 x S), 5.24 as an
    elementwise product; running the installed module under flop_counter counts whichever it does."""
    device = next(model.parameters()).device
    positions = torch.arange(seq_len, device=device).unsqueeze(0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        find_rotary_embedding(model)(torch.empty(0, device=device), positions)
    if counter.get_total_flops():
        step.ops.append(OpFlops("embed.rotary", None, counter.get_total_flops(), 0, 0))


def _attention(step: _Step, layer: int, a: bool) -> bool:
    q, k, v = (step.linear(name, layer, a) for name in ("attn.q", "attn.k", "attn.v"))
    scores = step.product("attn.scores", layer, q, k)
    context = step.product("attn.context", layer, scores, v)
    return step.linear("attn.o", layer, context)


def _mlp(step: _Step, layer: int, m: bool) -> bool:
    gate = step.linear("mlp.gate", layer, m) if step.has("mlp.gate.weight", layer) else False
    hidden = step.linear("mlp.up", layer, m) or gate
    return step.linear("mlp.down", layer, hidden)


def _pre_ln_layer(step: _Step, layer: int, x: bool) -> bool:
    """x + attn(ln1(x)), then r + mlp(ln2(r)): GPT-2, Llama, ViT."""
    r = _attention(step, layer, x or step.any_trainable("ln1", layer)) or x
    return _mlp(step, layer, r or step.any_trainable("ln2", layer)) or r


def _parallel_layer(step: _Step, layer: int, x: bool) -> bool:
    """x + attn(ln1(x)) + mlp(ln2(x)): GPT-NeoX's parallel residual, both branches reading the layer's input."""
    a = _attention(step, layer, x or step.any_trainable("ln1", layer))
    m = _mlp(step, layer, x or step.any_trainable("ln2", layer))
    return a or m or x


def _post_ln_layer(step: _Step, layer: int, x: bool) -> bool:
    """ln1(x + attn(x)), then ln2(r + mlp(r)): BERT."""
    r = _attention(step, layer, x) or x or step.any_trainable("ln1", layer)
    return _mlp(step, layer, r) or r or step.any_trainable("ln2", layer)


def _head(step: _Step, x: bool) -> None:
    """[MLM transform] -> [final norm] -> pooler (first token) and / or output map (LM head on every token,
    ViT's classifier on the class token)."""
    if step.has("head.transform.weight"):
        x = step.linear("head.transform", None, x)
    x = x or step.any_trainable("head.norm")
    if step.has("head.pooler.weight"):
        step.linear("head.pooler", None, x, rows="sequences")
    if step.has("head.out.weight") or step.schema.tied_embeddings:
        weight = "embed.tokens" if step.schema.tied_embeddings else "head.out.weight"
        rows = "sequences" if step.adapter.task == "image_classification" else "tokens"
        step.linear("head.out", None, x, rows=rows, weight=weight)
    if step.has("head.distillation.weight"):  # DeiT's second classifier, on the distillation token
        step.linear("head.distillation", None, x, rows="sequences")
