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
        canonical = tuple(schema.dims[a.role] for a in spec.axes)
        if spec.head_split:  # (heads, head_dim[, in]): GPT-NeoX's per-head fused QKV
            assert view.shape[0] * view.shape[1] == canonical[0] and tuple(view.shape[2:]) == canonical[1:]
        else:
            assert tuple(view.shape) == canonical


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


def test_qwen2_has_query_key_value_biases_and_no_output_bias():
    schema = growlib.schema_of(tiny_model("qwen2", heads=4, kv_heads=2))
    names = {spec.name for spec in schema.specs if spec.layer == 0}
    assert {"attn.q.bias", "attn.k.bias", "attn.v.bias"} <= names and "attn.o.bias" not in names
    assert not any(name.startswith("mlp.") and name.endswith(".bias") for name in names)
    assert schema.tensor("attn.k.bias", 0).shape == (24,)


@pytest.mark.parametrize("tied", [True, False])
def test_roberta_maps_its_lm_head(tied):
    """RoBERTa's head is ``lm_head`` (dense, layer_norm, decoder); untied, its unused ``lm_head.bias`` rides
    along as BERT's ``cls.predictions.bias`` does."""
    model = tiny_model("roberta", tied=tied)
    schema = growlib.schema_of(model)
    assert schema.tensor("head.transform.weight").data_ptr() == model.lm_head.dense.weight.data_ptr()
    assert schema.tensor("head.norm.bias").data_ptr() == model.lm_head.layer_norm.bias.data_ptr()
    assert schema.tensor("head.out.bias").data_ptr() == model.lm_head.decoder.bias.data_ptr()
    untied = {"head.out.weight", "head.untied_bias"} & {spec.name for spec in schema.specs}
    assert untied == (set() if tied else {"head.out.weight", "head.untied_bias"})


@pytest.mark.parametrize("family,tied,side", [("gpt2", True, "in"), ("gpt2", False, "out"), ("llama", True, "in"),
                                              ("llama", False, "out"), ("bert", True, "in"), ("bert", False, "out"),
                                              ("roberta", True, "in"), ("roberta", False, "out"),
                                              ("qwen2", True, "in"), ("mistral", False, "out")])
def test_norm_before_a_tied_head_takes_the_in_side_map(family, tied, side):
    schema = growlib.schema_of(tiny_model(family, tied=tied))
    assert schema.tied_embeddings == tied
    spec = next(s for s in schema.specs if s.name == "head.norm.weight")
    assert spec.axes[0].side == side
    assert any(s.name == "head.out.weight" for s in schema.specs) != tied


def test_base_models_without_heads_are_supported():
    for cls, family in ((T.BertModel, "bert"), (T.GPT2Model, "gpt2"), (T.LlamaModel, "llama"), (T.ViTModel, "vit"),
                        (T.RobertaModel, "roberta"), (T.Qwen2Model, "qwen2"), (T.MistralModel, "mistral"),
                        (T.GPTNeoXModel, "gpt_neox"), (T.OPTModel, "opt"), (T.DeiTModel, "deit")):
        schema = growlib.schema_of(cls(tiny_config(family)))
        assert schema.family == family


def test_gpt_neox_per_head_fused_qkv_is_split_into_head_split_views():
    """query_key_value holds [q_h, k_h, v_h] per head: Q, K and V are (heads, head_dim, hidden) views of it,
    head h of K at rows h * 3 * head_dim + head_dim ..., so writing a view writes the fused parameter."""
    model = tiny_model("gpt_neox")
    schema = growlib.schema_of(model)
    fused = model.gpt_neox.layers[0].attention.query_key_value
    heads, head_dim = 4, 12
    for part, name in enumerate(("attn.q", "attn.k", "attn.v")):
        view, bias = schema.tensor(f"{name}.weight", 0), schema.tensor(f"{name}.bias", 0)
        assert view.shape == (heads, head_dim, 48) and bias.shape == (heads, head_dim)
        assert view.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
        for h in range(heads):
            rows = slice((3 * h + part) * head_dim, (3 * h + part + 1) * head_dim)
            assert torch.equal(view[h], fused.weight[rows]) and torch.equal(bias[h], fused.bias[rows])
    spec = next(s for s in schema.specs if s.key == ("attn.k.weight", 0))
    assert spec.head_split and [a.role for a in spec.axes] == ["kv", "model"]
    with torch.no_grad():
        schema.tensor("attn.v.weight", 0)[2].fill_(7.0)
    assert bool((fused.weight[(3 * 2 + 2) * head_dim:(3 * 2 + 3) * head_dim] == 7.0).all())
    assert int((fused.weight == 7.0).sum()) == head_dim * 48


def test_opt_position_table_keeps_its_two_offset_rows_and_refuses_what_it_cannot_map():
    model = tiny_model("opt")
    schema = growlib.schema_of(model)
    assert schema.dims["pos"] == 42 and schema.tensor("embed.positions").shape == (42, 48)
    assert adapter_for(model).max_seq_len(model.config) == 40
    post_ln = tiny_config("opt")
    post_ln.do_layer_norm_before = False
    with pytest.raises(ValueError, match="do_layer_norm_before=False .*opt-350m.* not supported"):
        growlib.schema_of(T.OPTForCausalLM(post_ln))
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        growlib.freeze_forward(T.OPTForCausalLM(post_ln).model.decoder.layers)
    projected = tiny_config("opt")
    projected.word_embed_proj_dim = 32
    with pytest.raises(ValueError, match="word_embed_proj_dim=32 != hidden_size=48 .*project_in"):
        growlib.schema_of(T.OPTForCausalLM(projected))


def test_deit_distillation_token_and_teacher_heads():
    """DeiT: the distillation token after the class token (positions: 9 patches + 2), and the teacher variant's
    second classifier as ``head.distillation``."""
    torch.manual_seed(0)
    teacher = T.DeiTForImageClassificationWithTeacher(tiny_config("deit"))
    schema = growlib.schema_of(teacher)
    assert schema.dims["pos"] == 9 + 2
    assert schema.tensor("embed.distillation").data_ptr() == teacher.deit.embeddings.distillation_token.data_ptr()
    assert schema.tensor("head.out.weight").data_ptr() == teacher.cls_classifier.weight.data_ptr()
    assert schema.tensor("head.distillation.bias").data_ptr() == teacher.distillation_classifier.bias.data_ptr()
    names = [s.name for s in growlib.schema_of(tiny_model("deit")).specs if s.layer is None]
    assert names[:2] == ["embed.cls", "embed.distillation"] and "head.distillation.weight" not in names


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
