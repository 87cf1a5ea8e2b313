"""Llama (pre-RMSNorm decoder, SwiGLU, RoPE, grouped-query attention): LlamaForCausalLM and LlamaModel."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from .base import Adapter, SlotSpec, causal_lm_head, norm, out_, weight_and_bias


class LlamaAdapter(Adapter):
    family = "llama"
    model_classes = (LlamaForCausalLM, LlamaModel)

    def dims(self, config: LlamaConfig) -> dict[str, int]:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return {"model": config.hidden_size, "ffn": config.intermediate_size, "attn": heads * head_dim,
                "kv": kv_heads * head_dim, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                "layers": config.num_hidden_layers, "vocab": config.vocab_size}

    def specs(self, model_class, config, tied):
        p = "model." if model_class is LlamaForCausalLM else ""
        attn_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        specs = [SlotSpec("embed.tokens", None, f"{p}embed_tokens.weight", (out_("vocab"), out_("model")),
                          lambda t: t)]
        for i in range(config.num_hidden_layers):
            l = f"{p}layers.{i}."
            specs += [
                *norm("ln1", i, l + "input_layernorm", False),
                *weight_and_bias("attn.q", i, l + "self_attn.q_proj", "attn", "model", attn_bias),
                *weight_and_bias("attn.k", i, l + "self_attn.k_proj", "kv", "model", attn_bias),
                *weight_and_bias("attn.v", i, l + "self_attn.v_proj", "kv", "model", attn_bias),
                *weight_and_bias("attn.o", i, l + "self_attn.o_proj", "model", "attn", attn_bias,
                                 residual_out=True),
                *norm("ln2", i, l + "post_attention_layernorm", False),
                *weight_and_bias("mlp.gate", i, l + "mlp.gate_proj", "ffn", "model", mlp_bias),
                *weight_and_bias("mlp.up", i, l + "mlp.up_proj", "ffn", "model", mlp_bias),
                *weight_and_bias("mlp.down", i, l + "mlp.down_proj", "model", "ffn", mlp_bias, residual_out=True),
            ]
        return specs + causal_lm_head(f"{p}norm", False, model_class is LlamaForCausalLM, tied)

    def config_at(self, config, dims):
        return self.copied(config, hidden_size=dims["model"], intermediate_size=dims["ffn"],
                           num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                           head_dim=dims["head_dim"], num_hidden_layers=dims["layers"])
