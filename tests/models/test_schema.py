"""The HF adapters: every parameter covered, canonical shapes and roles, views that write through."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import growlib
from growlib.models import adapter_for
from tests.factories import FAMILIES, tiny_config, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_schema_covers_every_parameter_once(family):
    model = tiny_model(family)
    schema = growlib.schema_of(model)
    unique = {p.data_ptr(): p for p in model.parameters()}
    assert schema.numel() == sum(p.numel() for p in unique.values())
    for spec in schema.specs:
        view = schema.tensors[spec.key]
        assert tuple(view.shape) == tuple(schema.dims[a.role] for a in spec.axes)


@pytest.mark.parametrize("family", FAMILIES)
def test_views_write_through_to_the_model(family):
    model = tiny_model(family)
    schema = growlib.schema_of(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    schema.tensor("attn.q.weight", 1).fill_(3.0)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == 1
    assert (changed[0].endswith("c_attn.weight") if family == "gpt2" else "q" in changed[0] or "query" in changed[0])


def test_gpt2_fused_qkv_is_split_into_transposed_views():
    model = tiny_model("gpt2")
    schema = growlib.schema_of(model)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(schema.tensor("attn.k.weight", 0), c_attn[:, 48:96].t())
    assert schema.tensor("attn.o.weight", 0).shape == (48, 48)


def test_llama_grouped_query_dims():
    schema = growlib.schema_of(tiny_model("llama", heads=4, kv_heads=2))
    assert schema.dims["heads"] == 4 and schema.dims["kv_heads"] == 2 and schema.dims["head_dim"] == 12
    assert schema.tensor("attn.k.weight", 0).shape == (24, 48)
    assert [a.role for a in next(s for s in schema.specs if s.name == "attn.o.weight").axes] == ["model", "attn"]


@pytest.mark.parametrize("family,tied,side", [("gpt2", True, "in"), ("gpt2", False, "out"), ("llama", True, "in"),
                                              ("llama", False, "out"), ("bert", True, "in"), ("bert", False, "out")])
def test_norm_before_a_tied_head_takes_the_in_side_map(family, tied, side):
    schema = growlib.schema_of(tiny_model(family, tied=tied))
    assert schema.tied_embeddings == tied
    spec = next(s for s in schema.specs if s.name == "head.norm.weight")
    assert spec.axes[0].side == side
    assert any(s.name == "head.out.weight" for s in schema.specs) != tied


def test_base_models_without_heads_are_supported():
    for cls, family in ((T.BertModel, "bert"), (T.GPT2Model, "gpt2"), (T.LlamaModel, "llama"), (T.ViTModel, "vit")):
        schema = growlib.schema_of(cls(tiny_config(family)))
        assert schema.family == family


def test_unsupported_model_class_is_a_type_error():
    model = T.DistilBertModel(T.DistilBertConfig(vocab_size=101, dim=32, n_layers=1, n_heads=2, hidden_dim=40))
    with pytest.raises(TypeError, match="model must be one of"):
        growlib.schema_of(model)


def test_uncovered_parameter_is_refused():
    model = tiny_model("gpt2")
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra.weight"):
        growlib.schema_of(model)


def test_config_at_rejects_inconsistent_head_layout():
    adapter = adapter_for(tiny_model("bert"))
    dims = adapter.dims(tiny_config("bert"))
    with pytest.raises(ValueError, match="heads \\* head_dim"):
        adapter.config_at(tiny_config("bert"), {**dims, "attn": 24})
