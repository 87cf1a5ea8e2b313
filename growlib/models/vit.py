"""ViT / DeiT-style vision transformer (pre-LN encoder): ViTForImageClassification and ViTModel."""

from __future__ import annotations

import torch

from growlib.sharded import unsharded_class

from . import packing
from .base import Adapter, SlotSpec, in_, norm, out_, require_multi_head_attention, weight_and_bias

#: ViT on the embedded 8x8 digits: 2x2 patches (16 patches + the class token), 3 channels, 10 classes.
DIGITS_VIT = {"image_size": 8, "patch_size": 2, "num_channels": 3, "num_labels": 10}


def _patch_kernel(t):
    """(hidden, channels, p, p) convolution kernel as a (hidden, channels * p * p) matrix view."""
    return t.view(t.shape[0], -1)


def _position_table(t):
    """(1, patches + 1, hidden) -> (patches + 1, hidden)."""
    return t.view(t.shape[-2], t.shape[-1])


def _pair(size) -> tuple[int, int]:
    """An image or patch size as (height, width): HF takes an int (square) or a pair."""
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _class_token(t):
    """(1, 1, hidden) -> (hidden,)."""
    return t.view(-1)


class ViTAdapter(Adapter):
    family = "vit"
    modeling_module = "transformers.models.vit.modeling_vit"
    model_class_names = ("ViTForImageClassification", "ViTModel")
    layer_class_name = "ViTLayer"
    task = "image_classification"
    prefix_tokens = 1

    def dims(self, config) -> dict[str, int]:
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        (height, width), (patch_height, patch_width) = _pair(config.image_size), _pair(config.patch_size)
        patches = (height // patch_height) * (width // patch_width)
        return {"model": config.hidden_size, "ffn": config.intermediate_size, "attn": heads * head_dim,
                "kv": heads * head_dim, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
                "layers": config.num_hidden_layers, "pos": patches + self.prefix_tokens,
                "patch": config.num_channels * patch_height * patch_width, "labels": config.num_labels}

    def build_options(self, model):
        base = unsharded_class(model).__name__ == self.model_class_names[-1]  # ViTModel (DeiTModel)
        return {"add_pooling_layer": model.pooler is not None} if base else {}

    def specs(self, model_class, config, tied, add_pooling_layer: bool = True):
        classifier = model_class.__name__ != self.model_class_names[-1]
        p = f"{self.family}." if classifier else ""
        qkv_bias = bool(getattr(config, "qkv_bias", True))
        specs = [
            SlotSpec("embed.cls", None, f"{p}embeddings.cls_token", (out_("model"),), _class_token),
            SlotSpec("embed.positions", None, f"{p}embeddings.position_embeddings", (out_("pos"), out_("model")),
                     _position_table),
            *weight_and_bias("embed.patch", None, f"{p}embeddings.patch_embeddings.projection", "model", "patch",
                             True, _patch_kernel),
        ]
        for i in range(config.num_hidden_layers):
            l = f"{p}layers.{i}."
            specs += [
                *norm("ln1", i, l + "layernorm_before", True),
                *weight_and_bias("attn.q", i, l + "attention.q_proj", "attn", "model", qkv_bias),
                *weight_and_bias("attn.k", i, l + "attention.k_proj", "kv", "model", qkv_bias),
                *weight_and_bias("attn.v", i, l + "attention.v_proj", "kv", "model", qkv_bias),
                *weight_and_bias("attn.o", i, l + "attention.o_proj", "model", "attn", True, residual_out=True),
                *norm("ln2", i, l + "layernorm_after", True),
                *weight_and_bias("mlp.up", i, l + "mlp.fc1", "ffn", "model", True),
                *weight_and_bias("mlp.down", i, l + "mlp.fc2", "model", "ffn", True, residual_out=True),
            ]
        specs += norm("head.norm", None, f"{p}layernorm", True)
        if classifier:
            specs += [SlotSpec("head.out.weight", None, "classifier.weight", (out_("labels"), in_("model")),
                               lambda t: t),
                      SlotSpec("head.out.bias", None, "classifier.bias", (out_("labels"),), lambda t: t)]
        elif add_pooling_layer:
            specs += weight_and_bias("head.pooler", None, "pooler.dense", "model", "model", True)
        return specs

    def config_at(self, config, dims):
        require_multi_head_attention("ViT", dims)
        changes = {}
        if getattr(config, "pooler_output_size", None) == config.hidden_size:  # ViTModel's pooler: hidden -> hidden
            changes["pooler_output_size"] = dims["model"]
        return self.copied(config, hidden_size=dims["model"], intermediate_size=dims["ffn"],
                           num_attention_heads=dims["heads"], num_hidden_layers=dims["layers"], **changes)

    def training_model(self, size, vocab_size, seq_len):
        """Shaped for the embedded digits images: ``vocab_size`` and ``seq_len`` do not apply."""
        from transformers import ViTConfig

        return self.model_class()(ViTConfig(
            hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            intermediate_size=size["intermediate"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            **DIGITS_VIT))

    def layer_attention(self, layer):
        return layer.attention

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        attn = layer.attention
        return packing.PackedLayer(
            norm1=packing.pack_norm(layer.layernorm_before, dtype),
            norm2=packing.pack_norm(layer.layernorm_after, dtype),
            qkv=packing.fused_linear((attn.q_proj, attn.k_proj, attn.v_proj), dtype, "q/k/v"),
            out=packing.pack_linear(attn.o_proj, dtype),
            up=packing.pack_linear(layer.mlp.fc1, dtype, with_bias=False),
            up_bias=packing.packed(layer.mlp.fc1.bias, dtype), down=packing.pack_linear(layer.mlp.fc2, dtype),
            activation=packing.fused_activation_name(attn.config.hidden_act, "ViT"), gated=False,
            heads=attn.num_attention_heads, kv_heads=attn.num_attention_heads, head_dim=attn.head_dim,
            scale=float(attn.scaling), causal=bool(attn.is_causal), rotary=False)
