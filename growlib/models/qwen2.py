"""Qwen2 (Llama's layers with q/k/v biases, no output bias; sliding-window attention in the layers its config
marks so): Qwen2ForCausalLM and Qwen2Model."""

from __future__ import annotations

import dataclasses

import torch

from . import packing
from .base import Adapter
from .llama import LlamaAdapter

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _default_layer_types(config, layers: int) -> list[str]:
    """Qwen2Config's own rule: with a sliding window, the layers from ``max_window_layers`` up slide."""
    return [_SLIDING if config.sliding_window is not None and i >= config.max_window_layers else _FULL
            for i in range(layers)]


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    modeling_module = "transformers.models.qwen2.modeling_qwen2"
    model_class_names = ("Qwen2ForCausalLM", "Qwen2Model")
    layer_class_name = "Qwen2DecoderLayer"
    display_name = "Qwen2"
    rotary_class_name = "Qwen2RotaryEmbedding"

    demo_model = Adapter.demo_model  # not offered by growlib demo

    def attention_biases(self, config):
        return True, False

    def config_at(self, config, dims):
        """Llama's, and one layer type per layer: the same list at the same depth; at another, every layer of
        the one type a uniform list has, else Qwen2Config's rule (sliding from ``max_window_layers`` up)."""
        new = super().config_at(config, dims)
        types = list(getattr(config, "layer_types", None) or _default_layer_types(config, config.num_hidden_layers))
        layers = dims["layers"]
        if layers != len(types):
            if len(set(types)) == 1:
                types = types[:1] * layers
            elif types == _default_layer_types(config, len(types)):
                types = _default_layer_types(config, layers)
            else:
                raise ValueError(f"cannot tell which attention the layers of a {layers}-layer Qwen2 take: the "
                                 f"config's layer_types {types} follow neither one type nor max_window_layers")
        new.layer_types = types
        return new

    def training_model(self, size, vocab_size, seq_len):
        from transformers import Qwen2Config

        return self.model_class()(Qwen2Config(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            num_key_value_heads=size.get("kv_heads", size["heads"]), intermediate_size=size["intermediate"],
            tie_word_embeddings=True))

    def pack_layer(self, layer, dtype: torch.dtype) -> packing.PackedLayer:
        # Qwen2Attention holds its window only if its layer type slides (None otherwise).
        return dataclasses.replace(super().pack_layer(layer, dtype), sliding_window=layer.self_attn.sliding_window)
