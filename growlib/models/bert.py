"""BERT (post-LN encoder): BertForMaskedLM and BertModel."""

from __future__ import annotations

import torch

from growlib.sharded import unsharded_class

from . import packing
from .base import Adapter, SlotSpec, head_norm_side, in_, norm, out_, require_multi_head_attention, weight_and_bias


class BertAdapter(Adapter):
    family = "bert"
    modeling_module = "transformers.models.bert.modeling_bert"
    model_class_names = ("BertForMaskedLM", "BertModel")
    layer_class_name = "BertLayer"
    post_ln = True
    task = "masked_lm"
    #: the family in messages, and the attribute holding the encoder in the masked-LM class
    display_name = "BERT"
    encoder_prefix = "bert"

    def dims(self, config) -> dict[str, int]:
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        return {"model": config.hidden_size, "ffn": config.intermediate_size, "attn": heads * head_dim,
                "kv": heads * head_dim, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
                "layers": config.num_hidden_layers, "vocab": config.vocab_size,
                "pos": config.max_position_embeddings, "type": config.type_vocab_size}

    def build_options(self, model):
        base_model = unsharded_class(model).__name__ == self.model_class_names[1]
        return {"add_pooling_layer": model.pooler is not None} if base_model else {}

    def specs(self, model_class, config, tied, add_pooling_layer: bool = True):
        masked_lm = model_class.__name__ == self.model_class_names[0]
        p = f"{self.encoder_prefix}." if masked_lm else ""
        specs = [
            SlotSpec("embed.tokens", None, f"{p}embeddings.word_embeddings.weight", (out_("vocab"), out_("model")),
                     lambda t: t),
            SlotSpec("embed.positions", None, f"{p}embeddings.position_embeddings.weight",
                     (out_("pos"), out_("model")), lambda t: t),
            SlotSpec("embed.types", None, f"{p}embeddings.token_type_embeddings.weight",
                     (out_("type"), out_("model")), lambda t: t),
            *norm("embed.norm", None, f"{p}embeddings.LayerNorm", True),
        ]
        for i in range(config.num_hidden_layers):
            l = f"{p}encoder.layer.{i}."
            specs += [
                *weight_and_bias("attn.q", i, l + "attention.self.query", "attn", "model", True),
                *weight_and_bias("attn.k", i, l + "attention.self.key", "kv", "model", True),
                *weight_and_bias("attn.v", i, l + "attention.self.value", "kv", "model", True),
                *weight_and_bias("attn.o", i, l + "attention.output.dense", "model", "attn", True, residual_out=True),
                *norm("ln1", i, l + "attention.output.LayerNorm", True),
                *weight_and_bias("mlp.up", i, l + "intermediate.dense", "ffn", "model", True),
                *weight_and_bias("mlp.down", i, l + "output.dense", "model", "ffn", True, residual_out=True),
                *norm("ln2", i, l + "output.LayerNorm", True),
            ]
        if masked_lm:
            specs += self.mlm_head_specs(tied)
        elif add_pooling_layer:
            specs += weight_and_bias("head.pooler", None, "pooler.dense", "model", "model", True)
        return specs

    def mlm_head_specs(self, tied: bool, head: str = "cls.predictions.", transform: str = "transform.dense",
                       norm_name: str = "transform.LayerNorm") -> list[SlotSpec]:
        """The masked-LM head: transform (dense, GELU, norm), then the decoder (the token embedding when tied)."""
        specs = [
            *weight_and_bias("head.transform", None, head + transform, "model", "model", True),
            *norm("head.norm", None, head + norm_name, True, head_norm_side(tied)),
            SlotSpec("head.out.bias", None, head + "decoder.bias", (out_("vocab"),), lambda t: t),
        ]
        if not tied:
            # Untied, HF keeps the head's ``bias`` as a separate (unused) parameter: carry it along.
            specs += [SlotSpec("head.out.weight", None, head + "decoder.weight", (out_("vocab"), in_("model")),
                               lambda t: t),
                      SlotSpec("head.untied_bias", None, head + "bias", (out_("vocab"),), lambda t: t)]
        return specs

    def config_at(self, config, dims):
        require_multi_head_attention(self.display_name, dims)
        return self.copied(config, hidden_size=dims["model"], intermediate_size=dims["ffn"],
                           num_attention_heads=dims["heads"], num_hidden_layers=dims["layers"])

    def training_model(self, size, vocab_size, seq_len):
        from transformers import BertConfig

        return self.model_class()(BertConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"], intermediate_size=size["intermediate"],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    def demo_model(self):
        from transformers import BertConfig

        return self.model_class()(BertConfig(num_hidden_layers=12))  # BERT-Base's shape

    def layer_attention(self, layer):
        return layer.attention.self

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        attn = layer.attention.self
        return packing.PackedLayer(
            norm1=packing.pack_norm(layer.attention.output.LayerNorm, dtype),
            norm2=packing.pack_norm(layer.output.LayerNorm, dtype),
            qkv=packing.fused_linear((attn.query, attn.key, attn.value), dtype, "query/key/value"),
            out=packing.pack_linear(layer.attention.output.dense, dtype),
            up=packing.pack_linear(layer.intermediate.dense, dtype, with_bias=False),
            up_bias=packing.packed(layer.intermediate.dense.bias, dtype),
            down=packing.pack_linear(layer.output.dense, dtype),
            activation=packing.fused_activation_name(attn.config.hidden_act, self.display_name), gated=False,
            heads=attn.num_attention_heads, kv_heads=attn.num_attention_heads, head_dim=attn.attention_head_size,
            scale=float(attn.scaling), causal=bool(attn.is_causal), rotary=False)
