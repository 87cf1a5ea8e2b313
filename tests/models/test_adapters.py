"""Every family fact lives in its adapter: each adapter declares them completely and consistently, and the name
lists the command line keeps for a fast --help agree with the adapters.  A new family is one adapter file plus
its row in tests/factories.py (tiny_config, MODEL_CLASSES): these tests then cover it."""

from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch

import growlib
from growlib import cli, names
from growlib.models import ADAPTERS, adapter_for, adapter_named, layer_adapter
from growlib.models.base import TASKS, Adapter
from growlib.operators.common import layer_stack
from tests.factories import FAMILIES, MODEL_CLASSES, tiny_config, tiny_model

SIZE = {"layers": 2, "hidden": 16, "heads": 2, "intermediate": 24}


def test_the_family_lists_agree_with_the_adapters():
    families = {adapter.family for adapter in ADAPTERS}
    assert families == set(names.FAMILIES) == set(FAMILIES)
    with_demo = {a.family for a in ADAPTERS if type(a).demo_model is not Adapter.demo_model}
    assert set(cli.DEMO_FAMILIES) == with_demo


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.family)
def test_an_adapter_declares_every_fact(adapter):
    assert adapter.task in TASKS
    module = importlib.import_module(adapter.modeling_module)
    for name in (*adapter.model_class_names, adapter.layer_class_name):
        assert isinstance(getattr(module, name), type), name
    assert adapter.model_class() is getattr(module, adapter.model_class_names[0])
    assert MODEL_CLASSES[adapter.family].__name__ in adapter.model_class_names
    assert adapter_named(adapter.family) is adapter
    assert tiny_config(adapter.family).model_type == adapter.family  # a config.json names its family


@pytest.mark.parametrize("family", FAMILIES)
def test_models_and_layers_are_recognised_by_their_own_adapter_only(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.family == family
    assert [a.family for a in ADAPTERS if a.supports(model)] == [family]
    for layer in layer_stack(model):
        assert layer_adapter(layer) is adapter
        assert adapter.layer_attention(layer) is not None
    assert layer_adapter(model) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_config_fields_name_the_attributes_that_hold_each_size(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    for role, size in adapter.dims(model.config).items():
        field = adapter.config_field(role)
        if field.isidentifier() and hasattr(model.config, field):
            assert getattr(model.config, field) in (size, None), (role, field)
    for role in ("model", "layers", "heads"):
        assert hasattr(model.config, adapter.config_field(role)), role


@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_model_is_the_adapters_first_class_at_the_asked_size(family):
    adapter = adapter_named(family)
    model = adapter.training_model(SIZE, vocab_size=64, seq_len=8)
    assert type(model) is adapter.model_class()
    dims = adapter.dims(model.config)
    assert (dims["layers"], dims["model"], dims["heads"], dims["ffn"]) == (2, 16, 2, 24)
    assert adapter.finish(model) is model


def test_rotary_and_norm_placement_are_declared_where_the_family_has_them():
    declared = {a.family: (a.rotary, a.post_ln) for a in ADAPTERS}
    assert declared == {"bert": (False, True), "gpt2": (False, False), "llama": (True, False), "vit": (False, False),
                        "roberta": (False, True), "qwen2": (True, False), "mistral": (True, False),
                        "gpt_neox": (True, False), "opt": (False, False), "deit": (False, False)}
    # facts a config decides: GPT-NeoX's parallel residual and partial rotary (Pythia: a quarter of each head)
    layout = {a.family: (a.parallel_residual(tiny_config(a.family)), a.rotary_fraction(tiny_config(a.family)),
                         a.prefix_tokens) for a in ADAPTERS}
    assert layout == {**{f: (False, 1.0, 0) for f in layout}, "gpt_neox": (True, 0.25, 0), "vit": (False, 1.0, 1),
                      "deit": (False, 1.0, 2)}
    with pytest.raises(NotImplementedError, match="no rotary embedding"):
        adapter_named("gpt2").rotary_embedding(None)


def test_naming_a_family_that_does_not_exist_lists_the_known_ones():
    known = re.escape(repr(tuple(a.family for a in ADAPTERS)))
    assert known.startswith(re.escape("('bert', 'gpt2', 'llama', 'vit', 'roberta', 'qwen2', 'mistral'"))
    with pytest.raises(ValueError, match=rf"family must be one of {known}, got 'no_such_family'"):
        adapter_named("no_such_family")


@pytest.mark.parametrize("family", [f for f in FAMILIES if adapter_named(f).task != "image_classification"])
def test_a_text_training_model_embeds_seq_len_tokens(family):
    """RoBERTa's positions start after its padding id: its table must still leave room for seq_len tokens."""
    adapter = adapter_named(family)
    model = adapter.training_model(SIZE, vocab_size=64, seq_len=8)
    assert adapter.max_seq_len(model.config) in (8, None)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(4, 20).view(2, 8)).logits
    assert logits.shape == (2, 8, 64) and torch.isfinite(logits).all()


def test_roberta_trains_with_the_special_ids_of_growlibs_tokenizer(tmp_path):
    """Padding must be growlib's <pad>: with RoBERTa's own id 1 the mask token would be taken for padding (no
    position, no gradient to its embedding)."""
    from growlib.train.data import train_bpe

    tokenizer = train_bpe(["def f(x):\n    return x + 1\n" * 20], 300, tmp_path / "cache")
    config = adapter_named("roberta").training_model(SIZE, vocab_size=tokenizer.vocab_size, seq_len=8).config
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    assert tokenizer.mask_id != config.pad_token_id


def test_qwen2_layer_types_follow_the_depth():
    """Qwen2 takes one attention type per layer from its config: kept at the same depth, extended at another as
    Qwen2Config's rule (sliding from max_window_layers up) or a uniform list says; a custom list cannot be."""
    adapter = adapter_named("qwen2")
    config = tiny_config("qwen2", layers=2)  # window 6 from layer 1 up
    dims = adapter.dims(config)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    assert adapter.config_at(config, dims).layer_types == config.layer_types
    deeper = adapter.config_at(config, {**dims, "layers": 4})
    assert deeper.layer_types == ["full_attention"] + ["sliding_attention"] * 3
    assert config.layer_types == ["full_attention", "sliding_attention"]  # the source config is untouched
    grown = growlib.grow_depth(tiny_model("qwen2", layers=2), layers=3)
    assert [layer.self_attn.sliding_window for layer in grown.model.layers] == [None, 6, 6]
    config.layer_types = ["sliding_attention"] * 2
    assert adapter.config_at(config, {**dims, "layers": 3}).layer_types == ["sliding_attention"] * 3
    config.layer_types = ["sliding_attention", "full_attention"]
    assert adapter.config_at(config, dims).layer_types == config.layer_types
    with pytest.raises(ValueError, match="cannot tell which attention the layers of a 4-layer Qwen2 take"):
        adapter.config_at(config, {**dims, "layers": 4})


@pytest.mark.subprocess
def test_importing_the_adapters_loads_no_modeling_module():
    """The classes are named, not imported: the HF modeling modules load when a model is built."""
    import subprocess

    code = ("import sys, growlib.models, growlib.frozen, growlib.operators.ligo;"
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
