"""GPT-NeoX / Pythia (pre-LN decoder with a parallel residual and partial RoPE): GPTNeoXForCausalLM and
GPTNeoXModel.

GPT-NeoX fuses Q, K and V in ``query_key_value`` per head: its output rows are, for each head h, q_h, k_h and
v_h (head_dim rows each).  The heads of Q lie 3 * head_dim rows apart, which no 2-D view can express, so Q, K
and V are head-split views ((heads, head_dim, hidden), see ``SlotSpec.head_split``) of that storage: nothing
is copied.  A layer adds both branches to its input (``use_parallel_residual``, declared by
``parallel_residual``) and RoPE rotates the first ``rotary_pct`` of each head (``rotary_fraction``)."""

from __future__ import annotations

import torch

from . import packing
from .base import (Adapter, SlotSpec, causal_lm_head, identity, norm, out_, require_multi_head_attention,
                   weight_and_bias)

_PARTS = (("attn.q", "attn"), ("attn.k", "kv"), ("attn.v", "kv"))


def _qkv_part(part: int, heads: int, head_dim: int):
    """Views of Q (part 0), K (1) or V (2) in the per-head fused storage: (heads, head_dim[, hidden])."""

    def weight_view(t):
        return t.view(heads, 3, head_dim, t.shape[-1])[:, part]

    def bias_view(t):
        return t.view(heads, 3, head_dim)[:, part]

    return weight_view, bias_view


def _grouped_by_part(t: torch.Tensor | None, heads: int, head_dim: int, dtype: torch.dtype):
    """Fused rows [q_h, k_h, v_h for each head h] reordered to [all q | all k | all v] (what the frozen stack's
    QKV layout is), in the compute dtype: a copy, made once per packing."""
    if t is None:
        return None
    t = t.detach().view(heads, 3, head_dim, *t.shape[1:]).transpose(0, 1)
    return t.reshape(3 * heads * head_dim, *t.shape[3:]).to(dtype).contiguous()


class GPTNeoXAdapter(Adapter):
    family = "gpt_neox"
    modeling_module = "transformers.models.gpt_neox.modeling_gpt_neox"
    model_class_names = ("GPTNeoXForCausalLM", "GPTNeoXModel")
    layer_class_name = "GPTNeoXLayer"
    rotary = True
    task = "causal_lm"
    config_field_overrides = {"kv_heads": "num_attention_heads"}

    def dims(self, config) -> dict[str, int]:
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        return {"model": config.hidden_size, "ffn": config.intermediate_size, "attn": heads * head_dim,
                "kv": heads * head_dim, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
                "layers": config.num_hidden_layers, "vocab": config.vocab_size}

    def parallel_residual(self, config) -> bool:
        return bool(config.use_parallel_residual)

    def rotary_fraction(self, config) -> float:
        return float(config.rope_parameters.get("partial_rotary_factor", 1.0))

    def specs(self, model_class, config, tied):
        with_head = model_class.__name__ == "GPTNeoXForCausalLM"
        p = "gpt_neox." if with_head else ""
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        bias = bool(config.attention_bias)
        specs = [SlotSpec("embed.tokens", None, f"{p}embed_in.weight", (out_("vocab"), out_("model")), identity)]
        for i in range(config.num_hidden_layers):
            l = f"{p}layers.{i}."
            specs += norm("ln1", i, l + "input_layernorm", True)
            for part, (name, role) in enumerate(_PARTS):
                w_view, b_view = _qkv_part(part, heads, head_dim)
                specs += weight_and_bias(name, i, l + "attention.query_key_value", role, "model", bias, w_view,
                                         b_view, head_split=True)
            specs += [
                *weight_and_bias("attn.o", i, l + "attention.dense", "model", "attn", bias, residual_out=True),
                *norm("ln2", i, l + "post_attention_layernorm", True),
                *weight_and_bias("mlp.up", i, l + "mlp.dense_h_to_4h", "ffn", "model", True),
                *weight_and_bias("mlp.down", i, l + "mlp.dense_4h_to_h", "model", "ffn", True, residual_out=True),
            ]
        return specs + causal_lm_head(f"{p}final_layer_norm", True, with_head, tied)

    def config_at(self, config, dims):
        require_multi_head_attention("GPT-NeoX", dims)
        return self.copied(config, hidden_size=dims["model"], intermediate_size=dims["ffn"],
                           num_attention_heads=dims["heads"], num_hidden_layers=dims["layers"])

    def training_model(self, size, vocab_size, seq_len):
        from transformers import GPTNeoXConfig

        # Pythia's shape of layer: parallel residual, a quarter of each head rotated, untied head
        return self.model_class()(GPTNeoXConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            intermediate_size=size["intermediate"], hidden_dropout=0.0, attention_dropout=0.0,
            bos_token_id=0, eos_token_id=0))

    def layer_attention(self, layer):
        return layer.attention

    def rotary_embedding(self, layer):
        # The class a GPTNeoXModel builds from the same config: the same frequencies, partial rotary included.
        return self.model_class("GPTNeoXRotaryEmbedding")(layer.attention.config)

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        attn, mlp, config = layer.attention, layer.mlp, layer.attention.config
        heads, head_dim = config.num_attention_heads, attn.head_size
        fused = attn.query_key_value
        return packing.PackedLayer(
            norm1=packing.pack_norm(layer.input_layernorm, dtype),
            norm2=packing.pack_norm(layer.post_attention_layernorm, dtype),
            qkv=packing.PackedLinear(_grouped_by_part(fused.weight, heads, head_dim, dtype),
                                     _grouped_by_part(fused.bias, heads, head_dim, dtype)),
            out=packing.pack_linear(attn.dense, dtype),
            up=packing.pack_linear(mlp.dense_h_to_4h, dtype, with_bias=False),
            up_bias=packing.packed(mlp.dense_h_to_4h.bias, dtype), down=packing.pack_linear(mlp.dense_4h_to_h, dtype),
            activation=packing.fused_activation_name(config.hidden_act, "GPT-NeoX"), gated=False,
            heads=heads, kv_heads=heads, head_dim=head_dim, scale=float(attn.scaling), causal=True, rotary=True,
            rotary_dims=attn.rotary_ndims, parallel_residual=bool(layer.use_parallel_residual))
