"""Every family fact lives in its adapter: each adapter declares them completely and consistently, and the name
lists the command line keeps for a fast --help agree with the adapters.  A new family is one adapter file plus
its row in tests/factories.py (tiny_config, MODEL_CLASSES): these tests then cover it."""

from __future__ import annotations

import importlib
import sys

import pytest

from growlib import cli, names
from growlib.models import ADAPTERS, adapter_for, adapter_named, layer_adapter
from growlib.models.base import TASKS, Adapter
from growlib.operators.common import layer_stack
from tests.factories import FAMILIES, MODEL_CLASSES, tiny_model

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
    assert declared == {"bert": (False, True), "gpt2": (False, False), "llama": (True, False), "vit": (False, False)}
    with pytest.raises(NotImplementedError, match="no rotary embedding"):
        adapter_named("gpt2").rotary_embedding(None)


def test_naming_a_family_that_does_not_exist_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"family must be one of \('bert', 'gpt2', 'llama', 'vit'\), got 'opt'"):
        adapter_named("opt")


@pytest.mark.subprocess
def test_importing_the_adapters_loads_no_modeling_module():
    """The classes are named, not imported: the HF modeling modules load when a model is built."""
    import subprocess

    code = ("import sys, growlib.models, growlib.frozen, growlib.operators.ligo;"
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
