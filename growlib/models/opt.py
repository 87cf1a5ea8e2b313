"""OPT (pre-LN decoder, learned positions offset by 2, ReLU MLP): OPTForCausalLM and OPTModel.

OPT looks position p up at row p + 2 of its position table (rows 0 and 1 are HF's padding-era slots; padding
tokens read row 1), so the table has ``max_position_embeddings + 2`` rows, all mapped (role ``pos``), and
``max_seq_len`` says a sequence may hold two fewer tokens.  Two variants are refused: the post-LN one
(``do_layer_norm_before=False``: facebook/opt-350m), because norm placement is one fact per family and OPT's is
pre-LN, and a word embedding narrower than the hidden size (``word_embed_proj_dim``, with its ``project_in`` /
``project_out``), which only that same checkpoint uses."""

from __future__ import annotations

import torch

from . import packing
from .base import (Adapter, SlotSpec, head_norm_side, identity, in_, norm, out_, require_multi_head_attention,
                   weight_and_bias)


#: OPT looks position p up at row p + 2 of its table
POSITION_OFFSET = 2


def check_supported(config) -> None:
    """ValueError for the OPT variants growlib cannot map (see the module docstring)."""
    if not config.do_layer_norm_before:
        raise ValueError("OPT with do_layer_norm_before=False (post-LN, e.g. facebook/opt-350m) is not supported: "
                         "growlib maps OPT as a pre-LN decoder (do_layer_norm_before=True, every other OPT size)")
    if config.word_embed_proj_dim != config.hidden_size:
        raise ValueError(f"OPT with word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size="
                         f"{config.hidden_size} (project_in / project_out, e.g. facebook/opt-350m) is not supported: "
                         "growlib maps OPT models whose word embeddings have the hidden size")


class OPTAdapter(Adapter):
    family = "opt"
    modeling_module = "transformers.models.opt.modeling_opt"
    model_class_names = ("OPTForCausalLM", "OPTModel")
    layer_class_name = "OPTDecoderLayer"
    task = "causal_lm"
    config_field_overrides = {"ffn": "ffn_dim", "kv_heads": "num_attention_heads",
                              "pos": "max_position_embeddings (+ 2)"}

    def dims(self, config) -> dict[str, int]:
        check_supported(config)
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        return {"model": config.hidden_size, "ffn": config.ffn_dim, "attn": heads * head_dim,
                "kv": heads * head_dim, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
                "layers": config.num_hidden_layers, "vocab": config.vocab_size,
                "pos": config.max_position_embeddings + POSITION_OFFSET}

    def max_seq_len(self, config) -> int:
        return config.max_position_embeddings

    def specs(self, model_class, config, tied):
        check_supported(config)
        with_head = model_class.__name__ == "OPTForCausalLM"
        p = "model.decoder." if with_head else "decoder."
        bias = bool(config.enable_bias)
        affine = bool(config.layer_norm_elementwise_affine)  # False: the norms hold no parameters
        specs = [
            SlotSpec("embed.tokens", None, f"{p}embed_tokens.weight", (out_("vocab"), out_("model")), identity),
            SlotSpec("embed.positions", None, f"{p}embed_positions.weight", (out_("pos"), out_("model")), identity),
        ]
        for i in range(config.num_hidden_layers):
            l = f"{p}layers.{i}."
            specs += [
                *(norm("ln1", i, l + "self_attn_layer_norm", True) if affine else []),
                *weight_and_bias("attn.q", i, l + "self_attn.q_proj", "attn", "model", bias),
                *weight_and_bias("attn.k", i, l + "self_attn.k_proj", "kv", "model", bias),
                *weight_and_bias("attn.v", i, l + "self_attn.v_proj", "kv", "model", bias),
                *weight_and_bias("attn.o", i, l + "self_attn.out_proj", "model", "attn", bias, residual_out=True),
                *(norm("ln2", i, l + "final_layer_norm", True) if affine else []),
                *weight_and_bias("mlp.up", i, l + "fc1", "ffn", "model", bias),
                *weight_and_bias("mlp.down", i, l + "fc2", "model", "ffn", bias, residual_out=True),
            ]
        if affine and not config._remove_final_layer_norm:
            specs += norm("head.norm", None, f"{p}final_layer_norm", True, head_norm_side(tied and with_head))
        if with_head and not tied:
            specs.append(SlotSpec("head.out.weight", None, "lm_head.weight", (out_("vocab"), in_("model")), identity))
        return specs

    def config_at(self, config, dims):
        require_multi_head_attention("OPT", dims)
        return self.copied(config, hidden_size=dims["model"], ffn_dim=dims["ffn"], num_attention_heads=dims["heads"],
                           num_hidden_layers=dims["layers"], word_embed_proj_dim=dims["model"])

    def training_model(self, size, vocab_size, seq_len):
        from transformers import OPTConfig

        # No padding index: every token id of growlib's tokenizers is a real token whose embedding trains.
        return self.model_class()(OPTConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"], ffn_dim=size["intermediate"],
            dropout=0.0, attention_dropout=0.0, pad_token_id=None, bos_token_id=0, eos_token_id=0))

    def layer_attention(self, layer):
        return layer.self_attn

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        attn = layer.self_attn
        check_supported(attn.config)
        return packing.PackedLayer(
            norm1=packing.pack_norm(layer.self_attn_layer_norm, dtype),
            norm2=packing.pack_norm(layer.final_layer_norm, dtype),
            qkv=packing.fused_linear((attn.q_proj, attn.k_proj, attn.v_proj), dtype, "q/k/v"),
            out=packing.pack_linear(attn.out_proj, dtype),
            up=packing.pack_linear(layer.fc1, dtype, with_bias=False),
            up_bias=packing.packed(layer.fc1.bias, dtype), down=packing.pack_linear(layer.fc2, dtype),
            activation=packing.fused_activation_name(attn.config.activation_function, "OPT"), gated=False,
            heads=attn.num_heads, kv_heads=attn.num_heads, head_dim=attn.head_dim,
            scale=float(attn.scaling),  # HF scales q by it before the product, SDPA inside it: the same up to rounding
            causal=True, rotary=False)
