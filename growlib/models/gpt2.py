"""GPT-2 (pre-LN decoder): GPT2LMHeadModel and GPT2Model.

GPT-2 stores its linear layers as Conv1D, in-by-out, and fuses Q, K and V in ``c_attn``: the canonical
views are transposes and column slices of that storage, so nothing is copied."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

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
    model_classes = (GPT2LMHeadModel, GPT2Model)

    def dims(self, config: GPT2Config) -> dict[str, int]:
        heads = config.n_head
        head_dim = config.n_embd // heads
        return {"model": config.n_embd, "ffn": config.n_inner or 4 * config.n_embd, "attn": heads * head_dim,
                "kv": heads * head_dim, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
                "layers": config.n_layer, "vocab": config.vocab_size, "pos": config.n_positions}

    def specs(self, model_class, config, tied):
        p = "transformer." if model_class is GPT2LMHeadModel else ""
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
        return specs + causal_lm_head(f"{p}ln_f", True, model_class is GPT2LMHeadModel, tied)

    def config_at(self, config, dims):
        require_multi_head_attention("GPT-2", dims)
        return self.copied(config, n_embd=dims["model"], n_inner=dims["ffn"], n_head=dims["heads"],
                           n_layer=dims["layers"])
