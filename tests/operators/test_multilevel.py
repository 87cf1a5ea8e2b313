"""Coalesce / de-coalesce / interpolate on every family, with both backends (Triton via the interpreter)."""

from __future__ import annotations

import pytest
import torch

import growlib
from tests.factories import FAMILIES, example_inputs, logits, relative_error, tiny_model


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pairing", ["adjacent", "stack"])
def test_coalesce_of_decoalesce_is_exact(family, pairing, backend):
    fine = tiny_model(family, layers=4)
    coarse = growlib.coalesce(fine, width=2, depth=2, depth_pairing=pairing)
    assert coarse.config.num_hidden_layers == 2 and type(coarse) is type(fine)
    again = growlib.coalesce(growlib.decoalesce(coarse, like=fine, depth_pairing=pairing), depth_pairing=pairing)
    assert_same_parameters(coarse, again)


@pytest.mark.parametrize("family", FAMILIES)
def test_coalesce_halves_sizes_and_averages(family, backend):
    fine = tiny_model(family, layers=4)
    coarse = growlib.coalesce(fine)
    fs, cs = growlib.schema_of(fine), growlib.schema_of(coarse)
    for role in ("model", "ffn", "heads", "kv_heads", "layers"):
        assert cs.dims[role] * 2 == fs.dims[role]
    assert cs.dims["head_dim"] == fs.dims["head_dim"]
    # coarse ln1 of layer 0 = mean over fine layers 0, 1 and neurons j, j + d/2
    d = cs.dims["model"]
    expected = sum(fs.tensor("ln1.weight", l)[j * d:(j + 1) * d] for l in (0, 1) for j in (0, 1)) / 4
    torch.testing.assert_close(cs.tensor("ln1.weight", 0), expected)


@pytest.mark.parametrize("family,tied", [(f, t) for f in FAMILIES for t in (True, False) if not (f in ("vit", "deit") and t)])
def test_width_only_decoalesce_preserves_the_function(family, tied, backend):
    coarse = tiny_model(family, tied=tied)
    fine = growlib.decoalesce(coarse, like=tiny_model(family, hidden=96, heads=8, ffn=140, tied=tied))
    inputs = example_inputs(coarse)
    assert relative_error(logits(fine, inputs), logits(coarse, inputs)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_interpolate_endpoints(family, backend):
    fine = tiny_model(family, layers=4, seed=3)
    coarse = tiny_model(family, layers=2, hidden=24, heads=2, ffn=35, seed=4)
    untouched = tiny_model(family, layers=4, seed=3)
    growlib.interpolate_(fine, coarse, alpha=0.0)
    assert_same_parameters(fine, untouched)
    growlib.interpolate_(fine, coarse, alpha=1.0)
    assert_same_parameters(fine, growlib.decoalesce(coarse, like=fine))


def test_interpolate_blends_linearly(backend):
    fine = tiny_model("gpt2", layers=2, seed=3)
    coarse = tiny_model("gpt2", layers=1, hidden=24, heads=2, ffn=35, seed=4)
    target = growlib.decoalesce(coarse, like=fine)
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    growlib.interpolate_(fine, coarse, alpha=0.25)
    for key, value in fine.state_dict().items():
        torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * target.state_dict()[key])


OPERATORS = {
    "coalesce": lambda m: growlib.coalesce(m),
    "decoalesce": lambda m: growlib.decoalesce(growlib.coalesce(m, depth=1), like=m),
    "grow_depth": lambda m: growlib.grow_depth(m, layers=3, method="interleave"),
    "restrict": lambda m: growlib.restrict(m, parity="odd"),
    "widen": lambda m: growlib.widen(m, hidden=96, intermediate=140, method="hypercloning"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("operator", sorted(OPERATORS))
def test_outputs_survive_save_and_load(family, operator, tmp_path):
    grown = OPERATORS[operator](tiny_model(family, layers=2))
    grown.save_pretrained(tmp_path)
    loaded, info = type(grown).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = example_inputs(grown)
    assert torch.equal(logits(loaded.eval(), inputs), logits(grown.eval(), inputs))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_is_exact_in_half_precision(family, dtype, backend):
    fine = tiny_model(family, layers=2, dtype=dtype)
    coarse = growlib.coalesce(fine)
    assert next(coarse.parameters()).dtype == dtype
    assert_same_parameters(coarse, growlib.coalesce(growlib.decoalesce(coarse, like=fine)))


@pytest.mark.parametrize("kwargs,match", [
    ({"width": 5}, "width=5 must divide"),
    ({"width": 0}, "width must be an int >= 1"),
    ({"width": 2.0}, "width must be an int"),
    ({"depth": 3}, "depth=3 must divide the number of layers"),
    ({"depth_pairing": "zip"}, "depth_pairing"),
])
def test_coalesce_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        growlib.coalesce(tiny_model("bert", layers=2), **kwargs)


def test_coalesce_needs_even_heads():
    with pytest.raises(ValueError, match="attention heads"):
        growlib.coalesce(tiny_model("bert", hidden=48, heads=3), depth=1)


def test_coalesce_needs_even_kv_heads():
    with pytest.raises(ValueError, match="key/value heads"):
        growlib.coalesce(tiny_model("llama", hidden=48, heads=4, kv_heads=1), depth=1)


def test_odd_layer_count_is_rejected_by_depth_halving():
    with pytest.raises(ValueError, match="number of layers \\(3\\)"):
        growlib.coalesce(tiny_model("gpt2", layers=3))
    assert growlib.coalesce(tiny_model("gpt2", layers=1), depth=1).config.n_layer == 1


def test_decoalesce_rejects_a_mismatched_like():
    coarse = tiny_model("gpt2", hidden=24, heads=2, ffn=35)
    with pytest.raises(ValueError, match="integer multiple"):
        growlib.decoalesce(coarse, like=tiny_model("gpt2", hidden=48, heads=4, ffn=100))
    with pytest.raises(ValueError, match="not a model of the coarse model's family"):
        growlib.decoalesce(coarse, like=tiny_model("bert"))
    with pytest.raises(ValueError, match="head size"):
        growlib.decoalesce(coarse, like=tiny_model("gpt2", hidden=48, heads=2, ffn=70))


@pytest.mark.parametrize("alpha,error", [(-0.5, ValueError), (1.01, ValueError), ("0.5", TypeError)])
def test_interpolate_rejects_alpha_outside_unit_interval(alpha, error):
    fine, coarse = tiny_model("gpt2", layers=2), tiny_model("gpt2", layers=1, hidden=24, heads=2, ffn=35)
    with pytest.raises(error, match="alpha"):
        growlib.interpolate_(fine, coarse, alpha=alpha)


def test_unsupported_model_class_is_rejected():
    import transformers as T
    model = T.DistilBertModel(T.DistilBertConfig(vocab_size=101, dim=32, n_layers=2, n_heads=2, hidden_dim=40))
    with pytest.raises(TypeError, match="model must be one of"):
        growlib.coalesce(model)


def test_interpolate_refuses_models_whose_heads_differ():
    fine = tiny_model("gpt2", layers=2, tied=True)
    coarse = tiny_model("gpt2", layers=1, hidden=24, heads=2, ffn=35, tied=False)
    with pytest.raises(ValueError, match="tied_embeddings"):
        growlib.interpolate_(fine, coarse, alpha=0.5)
    with pytest.raises(ValueError, match="tied_embeddings"):
        growlib.interpolate_(tiny_model("gpt2", layers=2, tied=False),
                             tiny_model("gpt2", layers=1, hidden=24, heads=2, ffn=35, tied=True), alpha=0.5)
