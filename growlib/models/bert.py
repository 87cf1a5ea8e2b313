"""BERT (post-LN encoder): BertForMaskedLM and BertModel."""

from __future__ import annotations

from transformers import BertConfig, BertForMaskedLM, BertModel

from .base import Adapter, SlotSpec, head_norm_side, in_, norm, out_, require_multi_head_attention, weight_and_bias


class BertAdapter(Adapter):
    family = "bert"
    model_classes = (BertForMaskedLM, BertModel)

    def dims(self, config: BertConfig) -> dict[str, int]:
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        return {"model": config.hidden_size, "ffn": config.intermediate_size, "attn": heads * head_dim,
                "kv": heads * head_dim, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
                "layers": config.num_hidden_layers, "vocab": config.vocab_size,
                "pos": config.max_position_embeddings, "type": config.type_vocab_size}

    def build_options(self, model):
        return {"add_pooling_layer": model.pooler is not None} if isinstance(model, BertModel) else {}

    def specs(self, model_class, config, tied, add_pooling_layer: bool = True):
        p = "bert." if model_class is BertForMaskedLM else ""
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
        if model_class is BertForMaskedLM:
            specs += [
                *weight_and_bias("head.transform", None, "cls.predictions.transform.dense", "model", "model", True),
                *norm("head.norm", None, "cls.predictions.transform.LayerNorm", True, head_norm_side(tied)),
                SlotSpec("head.out.bias", None, "cls.predictions.decoder.bias", (out_("vocab"),), lambda t: t),
            ]
            if not tied:
                # Untied, HF keeps ``cls.predictions.bias`` as a separate (unused) parameter: carry it along.
                specs += [SlotSpec("head.out.weight", None, "cls.predictions.decoder.weight",
                                   (out_("vocab"), in_("model")), lambda t: t),
                          SlotSpec("head.untied_bias", None, "cls.predictions.bias", (out_("vocab"),), lambda t: t)]
        elif add_pooling_layer:
            specs += weight_and_bias("head.pooler", None, "pooler.dense", "model", "model", True)
        return specs

    def config_at(self, config, dims):
        require_multi_head_attention("BERT", dims)
        return self.copied(config, hidden_size=dims["model"], intermediate_size=dims["ffn"],
                           num_attention_heads=dims["heads"], num_hidden_layers=dims["layers"])
