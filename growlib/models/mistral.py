"""Mistral (Llama's layers, no biases, sliding-window attention in every layer): MistralForCausalLM and
MistralModel."""

from __future__ import annotations

import dataclasses

import torch

from . import packing
from .base import Adapter
from .llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    modeling_module = "transformers.models.mistral.modeling_mistral"
    model_class_names = ("MistralForCausalLM", "MistralModel")
    layer_class_name = "MistralDecoderLayer"
    display_name = "Mistral"
    rotary_class_name = "MistralRotaryEmbedding"

    demo_model = Adapter.demo_model  # not offered by growlib demo

    def attention_biases(self, config):
        return False, False

    def training_model(self, size, vocab_size, seq_len):
        """Mistral's default window (4096 positions) is kept: it changes nothing below that many tokens."""
        from transformers import MistralConfig

        return self.model_class()(MistralConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            num_key_value_heads=size.get("kv_heads", size["heads"]), intermediate_size=size["intermediate"],
            tie_word_embeddings=True))

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        # MistralModel builds one mask for all layers: sliding whenever config.sliding_window is set.
        window = getattr(layer.self_attn.config, "sliding_window", None)
        return dataclasses.replace(super().pack_layer(layer, dtype), sliding_window=window)
