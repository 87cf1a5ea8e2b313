"""Adapters between Hugging Face model families and growlib's parameter schema: every fact about a family lives in
its adapter (one file here), and the rest of growlib asks it."""

from __future__ import annotations

import torch

from .base import Adapter
from .bert import BertAdapter
from .deit import DeiTAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .opt import OPTAdapter
from .qwen2 import Qwen2Adapter
from .roberta import RobertaAdapter
from .vit import ViTAdapter

ADAPTERS: tuple[Adapter, ...] = (BertAdapter(), GPT2Adapter(), LlamaAdapter(), ViTAdapter(), RobertaAdapter(),
                                 Qwen2Adapter(), MistralAdapter(), GPTNeoXAdapter(), OPTAdapter(), DeiTAdapter())


def adapter_for(model: torch.nn.Module, name: str = "model") -> Adapter:
    """The adapter of ``model``'s class; TypeError naming the parameter (``name``) and the supported classes
    otherwise."""
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter
    supported = ", ".join(c for a in ADAPTERS for c in a.model_class_names)
    raise TypeError(f"{name} must be one of the supported Hugging Face classes ({supported}), "
                    f"got {type(model).__name__}")


def adapter_named(family: str) -> Adapter:
    """The adapter of a family name (``gpt2``, ``bert``, ...); ValueError naming the known ones otherwise."""
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise ValueError(f"family must be one of {tuple(a.family for a in ADAPTERS)}, got {family!r}")


def adapter_of_class(name: str) -> Adapter | None:
    """The adapter mapping the HF model class called ``name`` (as a checkpoint or config.json names it); None
    when no family's.  A name, not a class: what is read from disk can name no other callable."""
    return next((adapter for adapter in ADAPTERS if name in adapter.model_class_names), None)


def supported_class_names() -> list[str]:
    """Every HF model class some adapter maps, sorted: for messages that list them."""
    return sorted(name for adapter in ADAPTERS for name in adapter.model_class_names)


def layer_adapter(layer: torch.nn.Module) -> Adapter | None:
    """The adapter whose layer class ``layer`` is (None when no family's)."""
    return next((adapter for adapter in ADAPTERS if adapter.is_layer(layer)), None)
