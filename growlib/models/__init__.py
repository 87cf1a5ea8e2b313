"""Adapters between Hugging Face model families and growlib's parameter schema."""

from __future__ import annotations

import torch

from .base import Adapter
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .vit import ViTAdapter

ADAPTERS: tuple[Adapter, ...] = (BertAdapter(), GPT2Adapter(), LlamaAdapter(), ViTAdapter())


def adapter_for(model: torch.nn.Module, name: str = "model") -> Adapter:
    """The adapter of ``model``'s class; TypeError naming the parameter (``name``) and the supported classes
    otherwise."""
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter
    supported = ", ".join(c.__name__ for a in ADAPTERS for c in a.model_classes)
    raise TypeError(f"{name} must be one of the supported Hugging Face classes ({supported}), "
                    f"got {type(model).__name__}")
