"""Operators under inputs a hostile user finds: non-finite values at the blend's end points, a diverging LiGO
fit, partly frozen models, optimizers without state, configs asking for sizes an operator keeps, and HF model
variants (no pooler, a base model taken out of a task model, non-square ViT images)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import growlib
from tests.factories import example_inputs, relative_error, tiny_config, tiny_model


@pytest.mark.slow
def test_interpolate_end_points_are_exact_whatever_the_other_side_holds(backend):
    fine, coarse = tiny_model("gpt2", layers=2, seed=1), growlib.coalesce(tiny_model("gpt2", layers=2, seed=2))
    before = {n: p.detach().clone() for n, p in fine.named_parameters()}
    with torch.no_grad():
        next(coarse.parameters()).fill_(float("nan"))
    growlib.interpolate_(fine, coarse, alpha=0.0)
    assert all(torch.equal(p, before[n]) for n, p in fine.named_parameters())  # bit-identical, no NaN

    coarse = growlib.coalesce(tiny_model("gpt2", layers=2, seed=2))
    with torch.no_grad():
        next(fine.parameters()).fill_(float("inf"))
    growlib.interpolate_(fine, coarse, alpha=1.0)
    expected = growlib.decoalesce(coarse, like=fine)
    assert all(torch.equal(p, q) for p, q in zip(fine.parameters(), expected.parameters()))


def test_ligo_fit_stops_on_a_non_finite_loss_and_restores_the_operator():
    small = tiny_model("gpt2", layers=1, hidden=16, heads=2, ffn=24)
    ligo = growlib.LiGO(small, tiny_config("gpt2", layers=2, hidden=32, heads=4, ffn=48))
    before = {n: t.clone() for n, t in ligo.state_dict().items()}
    inputs = example_inputs(small, batch=2, seq=8)
    with pytest.raises(FloatingPointError, match=r"LiGO.fit: the loss is nan at step \d+ of 6 \(lr=1e\+06\): the "
                                                 r"operator diverged and was restored"):
        ligo.fit({**inputs, "labels": inputs["input_ids"]}, steps=6, lr=1e6, max_grad_norm=None)
    assert all(torch.equal(t, before[n]) for n, t in ligo.state_dict().items())
    assert all(torch.isfinite(p).all() for p in ligo.materialize().parameters())


@pytest.mark.parametrize("operator", ["coalesce", "grow_depth", "widen"])
def test_operators_keep_each_parameters_requires_grad(operator):
    model = tiny_model("llama", layers=2)
    frozen = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.mlp.up_proj.weight"}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    grown = {"coalesce": lambda: growlib.coalesce(model, depth=1),
             "grow_depth": lambda: growlib.grow_depth(model, 4),  # stacking: layers 2, 3 copy layers 0, 1
             "widen": lambda: growlib.widen(model, hidden=96, intermediate=140)}[operator]()
    still_frozen = {name for name, p in grown.named_parameters() if not p.requires_grad}
    expected = {"coalesce": frozen, "widen": frozen,
                "grow_depth": frozen | {"model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"}}
    assert still_frozen == expected[operator]


def test_coalescing_a_frozen_layer_with_a_trainable_one_is_trainable():
    model = tiny_model("gpt2", layers=2)
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    coarse = growlib.coalesce(model, depth=2)  # layer 0 averages fine layers 0 (frozen) and 1 (trainable)
    assert all(p.requires_grad for p in coarse.parameters())


def test_optimizer_state_maps_without_momentum_and_past_parameters_without_gradients():
    source = tiny_model("gpt2", layers=2)
    target = growlib.grow_depth(source, 4)
    growth = growlib.grow_depth_map(growlib.schema_of(source).dims, 4)
    inputs = example_inputs(source, batch=2, seq=6)

    sgd = torch.optim.SGD(source.parameters(), lr=0.1)
    source(**inputs, labels=inputs["input_ids"]).loss.backward()
    sgd.step()
    target_sgd = torch.optim.SGD(target.parameters(), lr=0.1)
    growlib.map_optimizer_state(sgd, source, target_sgd, target, growth)
    assert len(target_sgd.state) == 0  # SGD without momentum keeps no state: nothing to map

    adam = torch.optim.AdamW(source.parameters(), lr=1e-3)
    source.zero_grad()
    source(**inputs, labels=inputs["input_ids"]).loss.backward()
    source.transformer.h[1].mlp.c_fc.bias.grad = None  # a parameter that got no gradient
    adam.step()
    assert not adam.state.get(source.transformer.h[1].mlp.c_fc.bias)
    target_adam = torch.optim.AdamW(target.parameters(), lr=1e-3)
    growlib.map_optimizer_state(adam, source, target_adam, target, growth)
    no_gradient = target_adam.state[target.transformer.h[3].mlp.c_fc.bias]  # stacked from layer 1
    assert torch.count_nonzero(no_gradient["exp_avg"]) == 0 and torch.count_nonzero(no_gradient["exp_avg_sq"]) == 0
    assert torch.count_nonzero(target_adam.state[target.transformer.h[2].mlp.c_fc.bias]["exp_avg"]) > 0


@pytest.mark.parametrize("field,value,size", [("vocab_size", 103, "vocab 103"), ("n_positions", 44, "pos 44")])
def test_decoalesce_refuses_a_config_asking_for_sizes_it_keeps(field, value, size):
    coarse = growlib.coalesce(tiny_model("gpt2", layers=2))
    like = tiny_config("gpt2", layers=2)
    setattr(like, field, value)
    with pytest.raises(ValueError, match=f"like asks for sizes de-coalescing does not change .*{size} \\(the coarse "
                                         "model has"):
        growlib.decoalesce(coarse, like=like)


def base_models():
    torch.manual_seed(0)
    return {
        "BertModel(add_pooling_layer=False)": T.BertModel(tiny_config("bert"), add_pooling_layer=False),
        "BertForMaskedLM.bert": T.BertForMaskedLM(tiny_config("bert")).bert,
        "ViTModel": T.ViTModel(tiny_config("vit")),
        "ViTModel(add_pooling_layer=False)": T.ViTModel(tiny_config("vit"), add_pooling_layer=False),
        "ViTForImageClassification.vit": T.ViTForImageClassification(tiny_config("vit")).vit,
        "RobertaModel": T.RobertaModel(tiny_config("roberta")),
        "RobertaForMaskedLM.roberta": T.RobertaForMaskedLM(tiny_config("roberta")).roberta,
        "Qwen2Model": T.Qwen2Model(tiny_config("qwen2")),
        "MistralModel": T.MistralModel(tiny_config("mistral")),
        "GPTNeoXModel": T.GPTNeoXModel(tiny_config("gpt_neox")),
        "OPTModel": T.OPTModel(tiny_config("opt")),
        "DeiTModel(add_pooling_layer=False)": T.DeiTModel(tiny_config("deit"), add_pooling_layer=False),
        "DeiTForImageClassificationWithTeacher": T.DeiTForImageClassificationWithTeacher(tiny_config("deit")),
        "ViT 8x12 images": T.ViTForImageClassification(T.ViTConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=70, image_size=(8, 12),
            patch_size=4, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    }


@pytest.mark.parametrize("name", list(base_models()))
def test_hf_variants_grow_and_keep_their_function(name):
    model = base_models()[name].eval()
    growlib.schema_of(model)
    wide = growlib.widen(model, hidden=96, intermediate=140, method="hypercloning").eval()
    assert type(wide) is type(model)
    if hasattr(model.config, "image_size"):
        height, width = (model.config.image_size if isinstance(model.config.image_size, tuple)
                         else (model.config.image_size,) * 2)
        inputs = {"pixel_values": torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))}
    else:
        inputs = {"input_ids": torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        small_out, wide_out = model(**inputs), wide(**inputs)
    key = "logits" if hasattr(small_out, "logits") else "last_hidden_state"
    small_t, wide_t = getattr(small_out, key).double(), getattr(wide_out, key).double()
    if key == "last_hidden_state":  # hypercloning holds each hidden unit twice, wherever it puts the copies
        wide_t, small_t = wide_t.sort(dim=-1).values, small_t.repeat_interleave(2, dim=-1).sort(dim=-1).values
    assert relative_error(wide_t, small_t) < 1e-5
    deeper = growlib.grow_depth(model, 4)
    assert deeper.config.num_hidden_layers == 4
    assert ({n for n, _ in deeper.named_parameters() if "pooler" in n}
            == {n for n, _ in model.named_parameters() if "pooler" in n})
