"""Llama (pre-RMSNorm decoder, SwiGLU, RoPE, grouped-query attention): LlamaForCausalLM and LlamaModel."""

from __future__ import annotations

import torch

from . import packing
from .base import Adapter, SlotSpec, causal_lm_head, norm, out_, weight_and_bias


class LlamaAdapter(Adapter):
    family = "llama"
    modeling_module = "transformers.models.llama.modeling_llama"
    model_class_names = ("LlamaForCausalLM", "LlamaModel")
    layer_class_name = "LlamaDecoderLayer"
    rotary = True
    task = "causal_lm"
    #: the family in messages, and the class of the rotary embedding its base model builds
    display_name = "Llama"
    rotary_class_name = "LlamaRotaryEmbedding"

    def dims(self, config) -> dict[str, int]:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return {"model": config.hidden_size, "ffn": config.intermediate_size, "attn": heads * head_dim,
                "kv": kv_heads * head_dim, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                "layers": config.num_hidden_layers, "vocab": config.vocab_size}

    def specs(self, model_class, config, tied):
        with_head = model_class.__name__ == self.model_class_names[0]
        p = "model." if with_head else ""
        qkv_bias, o_bias = self.attention_biases(config)
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        specs = [SlotSpec("embed.tokens", None, f"{p}embed_tokens.weight", (out_("vocab"), out_("model")),
                          lambda t: t)]
        for i in range(config.num_hidden_layers):
            l = f"{p}layers.{i}."
            specs += [
                *norm("ln1", i, l + "input_layernorm", False),
                *weight_and_bias("attn.q", i, l + "self_attn.q_proj", "attn", "model", qkv_bias),
                *weight_and_bias("attn.k", i, l + "self_attn.k_proj", "kv", "model", qkv_bias),
                *weight_and_bias("attn.v", i, l + "self_attn.v_proj", "kv", "model", qkv_bias),
                *weight_and_bias("attn.o", i, l + "self_attn.o_proj", "model", "attn", o_bias, residual_out=True),
                *norm("ln2", i, l + "post_attention_layernorm", False),
                *weight_and_bias("mlp.gate", i, l + "mlp.gate_proj", "ffn", "model", mlp_bias),
                *weight_and_bias("mlp.up", i, l + "mlp.up_proj", "ffn", "model", mlp_bias),
                *weight_and_bias("mlp.down", i, l + "mlp.down_proj", "model", "ffn", mlp_bias, residual_out=True),
            ]
        return specs + causal_lm_head(f"{p}norm", False, with_head, tied)

    def attention_biases(self, config) -> tuple[bool, bool]:
        """Whether the q/k/v projections and the output projection have biases (Llama: ``attention_bias``
        for all four)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def config_at(self, config, dims):
        return self.copied(config, hidden_size=dims["model"], intermediate_size=dims["ffn"],
                           num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                           head_dim=dims["head_dim"], num_hidden_layers=dims["layers"])

    def training_model(self, size, vocab_size, seq_len):
        from transformers import LlamaConfig

        return self.model_class()(LlamaConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            num_key_value_heads=size.get("kv_heads", size["heads"]), intermediate_size=size["intermediate"],
            tie_word_embeddings=True))

    def demo_model(self):
        from transformers import LlamaConfig

        return self.model_class()(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4))

    def layer_attention(self, layer):
        return layer.self_attn

    def rotary_embedding(self, layer):
        # The class a LlamaModel builds from the same config: the same frequencies and RoPE scaling.
        return self.model_class(self.rotary_class_name)(layer.self_attn.config)

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        attn, mlp, config = layer.self_attn, layer.mlp, layer.self_attn.config
        return packing.PackedLayer(
            norm1=packing.pack_norm(layer.input_layernorm, dtype),
            norm2=packing.pack_norm(layer.post_attention_layernorm, dtype),
            qkv=packing.fused_linear((attn.q_proj, attn.k_proj, attn.v_proj), dtype, "q/k/v"),
            out=packing.pack_linear(attn.o_proj, dtype),
            up=packing.PackedLinear(packing.fused([mlp.gate_proj.weight, mlp.up_proj.weight], dtype, "gate/up"), None),
            up_bias=packing.fused([mlp.gate_proj.bias, mlp.up_proj.bias], dtype, "gate/up"),
            down=packing.pack_linear(mlp.down_proj, dtype),
            activation=packing.fused_activation_name(config.hidden_act, self.display_name), gated=True,
            heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=attn.head_dim,
            scale=float(attn.scaling), causal=True, rotary=True)
