"""GPT-2 (pre-LN decoder): GPT2LMHeadModel and GPT2Model.

GPT-2 stores its linear layers as Conv1D, in-by-out, and fuses Q, K and V in ``c_attn``: the canonical
views are transposes and column slices of that storage, so nothing is copied."""

from __future__ import annotations

import torch

from . import packing
from .base import (Adapter, SlotSpec, causal_lm_head, norm, out_, require_multi_head_attention, transposed,
                   weight_and_bias)


def _qkv_part(part: int, width: int):
    def weight_view(t):
        return t[:, part * width:(part + 1) * width].t()

    def bias_view(t):
        return t[part * width:(part + 1) * width]

    return weight_view, bias_view


class GPT2Adapter(Adapter):
    family = "gpt2"
    modeling_module = "transformers.models.gpt2.modeling_gpt2"
    model_class_names = ("GPT2LMHeadModel", "GPT2Model")
    layer_class_name = "GPT2Block"
    task = "causal_lm"
    config_field_overrides = {"model": "n_embd", "ffn": "n_inner", "heads": "n_head", "kv_heads": "n_head",
                              "layers": "n_layer", "pos": "n_positions"}

    def dims(self, config) -> dict[str, int]:
        heads = config.n_head
        head_dim = config.n_embd // heads
        return {"model": config.n_embd, "ffn": config.n_inner or 4 * config.n_embd, "attn": heads * head_dim,
                "kv": heads * head_dim, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
                "layers": config.n_layer, "vocab": config.vocab_size, "pos": config.n_positions}

    def specs(self, model_class, config, tied):
        with_head = model_class.__name__ == "GPT2LMHeadModel"
        p = "transformer." if with_head else ""
        width = config.n_embd
        specs = [
            SlotSpec("embed.tokens", None, f"{p}wte.weight", (out_("vocab"), out_("model")), lambda t: t),
            SlotSpec("embed.positions", None, f"{p}wpe.weight", (out_("pos"), out_("model")), lambda t: t),
        ]
        for i in range(config.n_layer):
            l = f"{p}h.{i}."
            specs += norm("ln1", i, l + "ln_1", True)
            for part, (name, role) in enumerate((("attn.q", "attn"), ("attn.k", "kv"), ("attn.v", "kv"))):
                w_view, b_view = _qkv_part(part, width)
                specs += weight_and_bias(name, i, l + "attn.c_attn", role, "model", True, w_view, b_view)
            specs += [
                *weight_and_bias("attn.o", i, l + "attn.c_proj", "model", "attn", True, transposed,
                                 residual_out=True),
                *norm("ln2", i, l + "ln_2", True),
                *weight_and_bias("mlp.up", i, l + "mlp.c_fc", "ffn", "model", True, transposed),
                *weight_and_bias("mlp.down", i, l + "mlp.c_proj", "model", "ffn", True, transposed,
                                 residual_out=True),
            ]
        return specs + causal_lm_head(f"{p}ln_f", True, with_head, tied)

    def config_at(self, config, dims):
        require_multi_head_attention("GPT-2", dims)
        return self.copied(config, n_embd=dims["model"], n_inner=dims["ffn"], n_head=dims["heads"],
                           n_layer=dims["layers"])

    def training_model(self, size, vocab_size, seq_len):
        from transformers import GPT2Config

        model = self.model_class()(GPT2Config(
            vocab_size=vocab_size, n_positions=seq_len, n_embd=size["hidden"], n_layer=size["layers"],
            n_head=size["heads"], n_inner=size["intermediate"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0))
        return self.finish(model)

    def finish(self, model):
        model.loss_type = "ForCausalLM"  # transformers cannot infer it from the class name (it would warn)
        return model

    def demo_model(self):
        from transformers import GPT2Config

        return self.model_class()(GPT2Config(n_embd=768, n_layer=12, n_head=12))  # GPT-2 small, 124M parameters

    def layer_attention(self, layer):
        return layer.attn

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        attn = layer.attn
        return packing.PackedLayer(
            norm1=packing.pack_norm(layer.ln_1, dtype), norm2=packing.pack_norm(layer.ln_2, dtype),
            qkv=packing.pack_linear(attn.c_attn, dtype), out=packing.pack_linear(attn.c_proj, dtype),
            up=packing.pack_linear(layer.mlp.c_fc, dtype, with_bias=False),
            up_bias=packing.packed(layer.mlp.c_fc.bias, dtype), down=packing.pack_linear(layer.mlp.c_proj, dtype),
            activation=packing.fused_activation_name(attn.config.activation_function, "GPT-2"), gated=False,
            heads=attn.num_heads, kv_heads=attn.num_heads, head_dim=attn.head_dim,
            scale=float(attn.scaling), causal=True, rotary=False)
