"""Forward-only execution of a stack of frozen Hugging Face transformer layers (MSLT's frozen bottom).

Frozen layers need no autograd graph and no saved activations, so ``freeze_forward`` runs them as a plain
function of their weights.  The weights are packed once (fused QKV, fused gate+up, in the compute dtype) and
everything around the matmuls runs as fused kernels (growlib/kernels/frozen/):

* residual add + LayerNorm / RMSNorm in one pass (``add_norm``), and in a pre-LN stack the add that closes a
  layer is fused with the norm that opens the next one;
* bias + GELU and SwiGLU as one elementwise pass over the MLP's first matmul (``bias_activation``,
  ``gated_activation``);
* the QKV split with RoPE, writing q, k, v in attention's layout (``rope_split_qkv``); partial RoPE (GPT-NeoX /
  Pythia rotate the first part of each head, which the kernel cannot pair up) splits q, k, v as views and
  rotates on the torch side (``_partial_rope``).

Layers run pre-LN, post-LN (``Adapter.post_ln``) or with a parallel residual (``PackedLayer.parallel_residual``,
GPT-NeoX: h + attn(norm1(h)) + mlp(norm2(h))).

Matmuls stay with torch (cuBLAS) and attention is ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from growlib.kernels.frozen.activation import bias_activation, gated_activation
from growlib.kernels.frozen.rope_split_qkv import rope_split_qkv
from growlib.models import ADAPTERS, Adapter, layer_adapter
from growlib.models.packing import PackedLayer
from growlib.sharded import is_sharded_tensor
from growlib.validate import require_int

_SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


# ----------------------------------------------------------------------------------------------------------
# Checking a stack
# ----------------------------------------------------------------------------------------------------------

def _adapter(layers: Sequence[torch.nn.Module]) -> Adapter:
    """The one family adapter all ``layers`` belong to."""
    adapters = []
    for i, layer in enumerate(layers):
        adapter = layer_adapter(layer)
        if adapter is None:
            supported = ", ".join(a.layer_class_name for a in ADAPTERS)
            raise TypeError(f"layers[{i}] is a {type(layer).__name__}; freeze_forward supports {supported}")
        adapters.append(adapter)
    if len({a.family for a in adapters}) > 1:
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ValueError(f"layers must all be of one family, got a mix of {', '.join(kinds)}")
    return adapters[0]


def _check_contiguous(layers: Sequence[torch.nn.Module], adapter: Adapter, model: torch.nn.Module | None) -> None:
    """The stack must be a run of consecutive layers of one model: a gap means a layer would be skipped.

    With ``model`` the positions come from the model's layer list; without it, from the layers' own
    ``layer_idx`` (ViT layers have none, so only a model can vouch for them)."""
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("layers holds the same layer more than once: it must be a run of consecutive layers")
    if model is not None:
        stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and any(x is layers[0] for x in m)]
        if not stacks:
            raise ValueError(f"layers[0] is not in any layer list of model ({type(model).__name__})")
        positions = [next((j for j, x in enumerate(stacks[0]) if x is layer), None) for layer in layers]
        where = "model's layer list"
    else:
        positions = [getattr(adapter.layer_attention(layer), "layer_idx", None) for layer in layers]
        if any(p is None for p in positions):
            return
        where = "their layer_idx"
    if any(p is None for p in positions) or positions != list(range(positions[0], positions[0] + len(layers))):
        raise ValueError(f"layers must be a contiguous run of consecutive layers, got positions {positions} in "
                         f"{where}")


def find_rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    if len(found) != 1:
        raise ValueError(f"model ({type(model).__name__}) must hold exactly one 'rotary_emb' module for its rotary "
                         f"layers, found {len(found)}")
    return found[0]


def _sliding_window(mask: torch.Tensor | None, layer: PackedLayer, seq: int, device) -> torch.Tensor | None:
    """``mask`` narrowed to a causal layer's sliding window: query q sees key k only if k > q - window (HF's
    ``sliding_window_overlay``).  Unchanged while the window covers the sequence.  A query row left with no key
    (a right-padding position whose window holds only padding) sees its whole window instead, as
    ``FrozenStack._attention_mask`` lets rows that see nothing see everything: it stays finite."""
    window = layer.sliding_window
    if window is None or seq <= window:
        return mask
    positions = torch.arange(seq, device=device)
    offset = positions[:, None] - positions[None, :]  # query - key
    band = (offset >= 0) & (offset < window)
    if mask is None:
        return band
    seen = mask & band
    return seen | (band & ~seen.any(dim=-1, keepdim=True))


def _version(t: torch.Tensor) -> int:
    """The in-place update counter; tensors made under inference_mode keep none (and -1 stands for it)."""
    try:
        return t._version
    except RuntimeError:
        return -1


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------

class FrozenStack(torch.nn.Module):
    """A stack of frozen HF layers run forward-only with fused kernels; see ``freeze_forward``.

    It owns no parameters: it reads the layers' weights, packs them, and packs again when they change (new
    storage, an in-place update, another device or dtype) or when a mutable ``layers`` list changes."""

    def __init__(self, layers, model: torch.nn.Module | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(layers, (list, tuple, torch.nn.ModuleList)):
            raise TypeError(f"layers must be a list, tuple or nn.ModuleList of HF layers, got {type(layers).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module (the model holding the layers), got {type(model).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        sharded = [i for i, layer in enumerate(layers) if any(map(is_sharded_tensor, layer.parameters()))]
        if sharded:
            raise ValueError(f"layers {sharded} hold parameters FSDP2 shards across processes, but the forward-only "
                             "stack packs whole weights: build it before sharding, keeping these layers whole")
        # Plain attributes, not submodules: the layers (and a model's rotary embedding) belong to the model, and
        # registering them here would list their parameters twice in any module holding both.
        object.__setattr__(self, "_source", layers)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_rotary", None)
        self._requested_dtype = dtype
        self._signature = None
        self.repack()

    # -- packing ---------------------------------------------------------------------------------------------
    def _current_signature(self) -> tuple:
        """What the packed weights depend on: which layers, and each parameter's storage, in-place update
        count, dtype, device, shape and norm.  The norms catch what the update counter cannot see: writes
        through ``.data`` (``layer.weight.data.mul_(0.5)``) or ``torch.inference_mode``.  They cost one more
        read of the weights per forward, in a few multi-tensor launches, and one comparison."""
        layers = tuple(self._source)
        params = [p.detach() for layer in layers for p in layer.parameters()]
        groups: dict[tuple, list[int]] = {}
        for index, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(index)
        norms = [0.0] * len(params)
        for indices in groups.values():
            for index, norm in zip(indices, torch.stack(torch._foreach_norm([params[i] for i in indices])).tolist()):
                norms[index] = norm
        return (tuple(id(layer) for layer in layers),
                tuple((p.data_ptr(), _version(p), p.dtype, p.device, tuple(p.shape)) for p in params),
                tuple(norms))

    def repack(self) -> None:
        """Check the stack and pack its weights now (forward does this by itself when they have changed)."""
        layers = list(self._source)
        if not layers:
            raise ValueError("layers must hold at least one layer")
        adapter = _adapter(layers)
        _check_contiguous(layers, adapter, self._model)
        params = [p for layer in layers for p in layer.parameters()]
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"the layers' parameters must all be on one device, got {sorted(map(str, devices))}")
        dtype = self._requested_dtype
        if dtype is None:
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
                raise ValueError(f"the layers' parameters have dtypes {sorted(map(str, dtypes))}: pass dtype= to "
                                 "choose the compute dtype")
            dtype = dtypes.pop()
        with torch.no_grad():
            packed: list[PackedLayer] = [adapter.pack_layer(layer, dtype) for layer in layers]
        hidden = {layer.out.weight.shape[1 if layer.out.in_major else 0] for layer in packed}  # out: -> hidden
        if len(hidden) != 1:
            raise ValueError(f"the layers have different hidden sizes {sorted(hidden)}: they cannot form one stack")
        if adapter.rotary and len({(layer.head_dim, layer.rotary_dims) for layer in packed}) != 1:
            raise ValueError(f"the {adapter.family} layers have different head sizes or rotary dimensions: one "
                             "rotary embedding cannot serve them")
        parallel = {layer.parallel_residual for layer in packed}
        if len(parallel) != 1:
            raise ValueError(f"the {adapter.family} layers mix parallel and sequential residual branches: they "
                             "cannot form one stack")
        self.family, self.dtype, self.device = adapter.family, dtype, devices.pop()
        self._post_ln_layers = adapter.post_ln
        self._parallel_layers = parallel.pop()
        if self._post_ln_layers and self._parallel_layers:
            raise ValueError(f"the {adapter.family} layers are post-LN with parallel residual branches, which "
                             "freeze_forward does not run")
        self.hidden_size, self.num_layers = hidden.pop(), len(layers)
        self._layers = packed
        if adapter.rotary:
            self._set_rotary(adapter, layers[0])
        else:
            object.__setattr__(self, "_rotary", None)
        self._signature = self._current_signature()

    def _set_rotary(self, adapter: Adapter, first_layer: torch.nn.Module) -> None:
        if self._model is not None:
            rotary = find_rotary_embedding(self._model)
        else:
            rotary = adapter.rotary_embedding(first_layer).to(self.device)
        object.__setattr__(self, "_rotary", rotary)

    # -- forward ---------------------------------------------------------------------------------------------
    def _check_inputs(self, hidden_states, attention_mask, position_ids) -> None:
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got "
                            f"{getattr(hidden_states, 'dtype', type(hidden_states).__name__)}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be (batch, seq, {self.hidden_size}) (the layers' hidden size), "
                             f"got shape {tuple(hidden_states.shape)}")
        if hidden_states.device != self.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but the layers are on {self.device}")
        if hidden_states.requires_grad and torch.is_grad_enabled():
            raise ValueError("hidden_states requires grad, but the frozen stack records no autograd graph, so "
                             "nothing below it would get gradients: detach() it if that is intended")
        batch, seq = hidden_states.shape[:2]
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
                raise ValueError(f"attention_mask must be a ({batch}, {seq}) tensor (batch, seq) with 1 = keep, "
                                 f"0 = padding, got {tuple(getattr(attention_mask, 'shape', ()))}")
            if attention_mask.device != self.device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but the layers are on {self.device}")
            if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold 1 = keep, 0 = padding (bool or 0/1 numbers), but it holds "
                                 "other values: an additive mask (0 keep, large negative for padding)? Pass "
                                 "(additive_mask == 0) instead")
        if position_ids is not None:
            if (not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point()
                    or position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch)
                    or position_ids.shape[1] != seq):
                raise ValueError(f"position_ids must be an integer tensor of shape ({batch} or 1, {seq}), got "
                                 f"{getattr(position_ids, 'dtype', '')} {tuple(getattr(position_ids, 'shape', ()))}")
            if position_ids.device != self.device:
                raise ValueError(f"position_ids is on {position_ids.device} but the layers are on {self.device}")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, seq, hidden) in hidden_states' dtype, as a tensor with no autograd
        history.  ``attention_mask`` (batch, seq): 1 = keep, 0 = padding.  ``position_ids`` (batch or 1, seq)
        feed the rotary embedding (Llama) and default to 0 .. seq-1; the other families take positions in
        their embeddings and ignore them."""
        if self._current_signature() != self._signature:
            self.repack()
        self._check_inputs(hidden_states, attention_mask, position_ids)
        batch, seq, hidden = hidden_states.shape
        with torch.no_grad(), torch.autocast(hidden_states.device.type, enabled=False):
            x = hidden_states.to(self.dtype).reshape(batch * seq, hidden)
            mask = self._attention_mask(attention_mask, batch, seq)
            rope = self._rope(position_ids, seq) if self._rotary is not None else None
            run = (self._post_ln if self._post_ln_layers else self._parallel if self._parallel_layers
                   else self._pre_ln)
            out = run(x, batch, seq, mask, rope)
        return out.view(batch, seq, hidden).to(hidden_states.dtype)

    def _attention_mask(self, attention_mask, batch: int, seq: int) -> torch.Tensor | None:
        """A boolean (batch, 1, seq or 1, seq) mask for SDPA, or None (then causal layers pass is_causal)."""
        if attention_mask is None:
            return None
        keep = attention_mask.bool()[:, None, None, :]
        if self._layers[0].causal:
            keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=keep.device).tril()
        # A query row that may see nothing (a padding position before any token, or an all-padding sequence)
        # sees everything instead: its output is padding either way, and it stays finite on every backend.
        return keep | ~keep.any(dim=-1, keepdim=True)

    def _rope(self, position_ids, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids is None:
            position_ids = torch.arange(seq, device=self.device).unsqueeze(0)
        # The rotary module reads only the device and dtype of its first argument: fp32 tables, whatever the
        # compute dtype.
        return self._rotary(torch.empty(0, device=self.device), position_ids)

    def _attention(self, layer: PackedLayer, x: torch.Tensor, batch: int, seq: int, mask, rope) -> torch.Tensor:
        qkv = layer.qkv(x).view(batch, seq, -1)
        h, kv = layer.heads, layer.kv_heads
        if layer.rotary and layer.rotary_dims in (None, layer.head_dim):
            q, k, v = rope_split_qkv(qkv, *rope, num_heads=h, num_kv_heads=kv)
        else:
            heads = qkv.view(batch, seq, h + 2 * kv, layer.head_dim).transpose(1, 2)
            q, k, v = heads[:, :h], heads[:, h:h + kv], heads[:, h + kv:]
            if layer.rotary:
                q, k = _partial_rope(q, *rope), _partial_rope(k, *rope)
        mask = _sliding_window(mask, layer, seq, x.device)
        extra = {}
        if kv != h:
            # As HF does: SDPA's own GQA where its fused kernels take it (no mask), repeated kv heads otherwise.
            if _SDPA_HAS_GQA and mask is None:
                extra["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=layer.causal and mask is None,
                                              scale=layer.scale, **extra)
        return attn.transpose(1, 2).reshape(batch * seq, h * layer.head_dim)

    def _mlp(self, layer: PackedLayer, x: torch.Tensor) -> torch.Tensor:
        pre = layer.up(x)
        if layer.gated:
            return gated_activation(pre, layer.up_bias, activation=layer.activation)
        return bias_activation(pre, layer.up_bias, activation=layer.activation)

    def _parallel(self, h, batch, seq, mask, rope) -> torch.Tensor:
        """GPT-NeoX's parallel residual: h = h + attn(norm1(h)) + mlp(norm2(h)), both branches reading h."""
        for layer in self._layers:
            attn_out = layer.out(self._attention(layer, layer.norm1(h), batch, seq, mask, rope))
            h = layer.down(self._mlp(layer, layer.norm2(h))).add_(attn_out).add_(h)
        return h

    def _post_ln(self, h, batch, seq, mask, rope) -> torch.Tensor:
        """BERT, RoBERTa: h = LN1(h + attn(h)); h = LN2(h + mlp(h))."""
        for layer in self._layers:
            h = layer.norm1(layer.out(self._attention(layer, h, batch, seq, mask, rope)), h)
            h = layer.norm2(layer.down(self._mlp(layer, h)), h)
        return h

    def _pre_ln(self, h, batch, seq, mask, rope) -> torch.Tensor:
        """GPT-2, ViT, Llama, Qwen2, Mistral: h += attn(norm1(h)); h += mlp(norm2(h)).  Each residual add comes
        out of the norm that follows it: norm2 of the same layer, or norm1 of the next."""
        normed = self._layers[0].norm1(h)
        for i, layer in enumerate(self._layers):
            normed, h = layer.norm2(layer.out(self._attention(layer, normed, batch, seq, mask, rope)), h,
                                    return_sum=True)
            mlp_out = layer.down(self._mlp(layer, normed))
            if i + 1 < len(self._layers):
                normed, h = self._layers[i + 1].norm1(mlp_out, h, return_sum=True)
            else:
                h = mlp_out.add_(h)
        return h

    def extra_repr(self) -> str:
        return (f"family={self.family}, layers={self.num_layers}, hidden={self.hidden_size}, dtype={self.dtype}, "
                f"device={self.device}")


def _partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial RoPE (GPT-NeoX / Pythia) on the torch side: the first ``cos.shape[-1]`` dimensions of each head of
    ``x`` (batch, heads, seq, head_dim) rotated as HF's ``apply_rotary_pos_emb`` does, the rest passed through.
    The fused ``rope_split_qkv`` kernel rotates whole heads (it pairs j with j + head_dim / 2, where partial
    RoPE pairs j with j + rotary_dims / 2), so these layers split q, k, v as views and rotate here.  In fp32
    (fp64 for fp64), like the kernel."""
    n = cos.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rot = x[..., :n].to(compute)
    turned = torch.cat((-rot[..., n // 2:], rot[..., :n // 2]), dim=-1)
    rot = rot * cos.to(compute).unsqueeze(1) + turned * sin.to(compute).unsqueeze(1)
    return torch.cat((rot.to(x.dtype), x[..., n:]), dim=-1)


def freeze_forward(layers, model: torch.nn.Module | None = None, *, dtype: torch.dtype | None = None) -> FrozenStack:
    """A forward-only module running a contiguous stack of frozen HF layers (any adapter's layer class:
    BertLayer, GPT2Block, LlamaDecoderLayer, ViTLayer, RobertaLayer, Qwen2DecoderLayer, MistralDecoderLayer,
    GPTNeoXLayer, OPTDecoderLayer, DeiTLayer) with fused
    kernels: ``(hidden_states, attention_mask=None, position_ids=None) -> hidden_states``.

    ``layers``: a list, tuple or nn.ModuleList (e.g. ``model.model.layers[:6]``) of consecutive layers of one
    family.  ``model``: optional, the model holding them; it vouches for the stack's contiguity and lends its
    rotary embedding to rotary layers (Llama's, ...; otherwise one is built from the layers' config, which is the same
    unless the model's was changed at run time).  ``dtype``: the compute dtype (default: the layers').

    The stack runs without autograd and as in eval mode (no dropout): its output has no graph, so it can feed
    trainable layers, and nothing is saved for backward.  Whether the layers' parameters require grad is left
    to the caller; gradients never reach them through this module.  It computes in its packed dtype whatever
    autocast says: with fp32 weights under bf16 autocast, pass ``dtype=torch.bfloat16``."""
    return FrozenStack(layers, model=model, dtype=dtype)


def route_frozen_bottom(model: torch.nn.Module, count: int, dtype: torch.dtype | None = None) -> FrozenStack:
    """Run ``model``'s bottom ``count`` layers through one FrozenStack whenever the model runs (MSLT's frozen
    stages): layer 0 runs the whole stack, layers 1 .. count-1 pass their input on.

    The layers' parameters and the state dict are untouched (only their ``forward`` is rerouted), so
    checkpoints, growth maps and FLOPs counting see the ordinary model; ``restore_layers`` undoes it.  The
    attention mask and position ids the model is called with reach the stack.  The embeddings below must be
    frozen too: nothing under a frozen stack can get gradients."""
    from growlib.operators.common import layer_stack

    require_int("count", count)
    layers = layer_stack(model)
    if count > len(layers):
        raise ValueError(f"count={count} exceeds the model's {len(layers)} layers")
    restore_layers(model)
    stack = freeze_forward(list(layers[:count]), model, dtype=dtype)
    call_inputs = {}

    def remember_inputs(module, args, kwargs):
        call_inputs["attention_mask"] = kwargs.get("attention_mask")
        call_inputs["position_ids"] = kwargs.get("position_ids")

    def run_stack(*args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        return stack(hidden_states, attention_mask=call_inputs.get("attention_mask"),
                     position_ids=call_inputs.get("position_ids"))

    def pass_on(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    hook = model.register_forward_pre_hook(remember_inputs, with_kwargs=True)
    layers[0].forward = run_stack
    for layer in layers[1:count]:
        layer.forward = pass_on
    model.growlib_frozen_bottom = (stack, hook, list(layers[:count]))
    return stack


def restore_layers(model: torch.nn.Module) -> None:
    """Undo ``route_frozen_bottom``: every layer runs its own forward again (a no-op if none was routed)."""
    routed = getattr(model, "growlib_frozen_bottom", None)
    if routed is None:
        return
    _, hook, layers = routed
    hook.remove()
    for layer in layers:
        del layer.forward
    del model.growlib_frozen_bottom
