"""Depth growth (stack / interleave / copy_top) and the ODE multilevel restriction / prolongation."""

from __future__ import annotations

import pytest
import torch

import growlib
from tests.factories import FAMILIES, example_inputs, logits, relative_error, tiny_model


def layer_tensor(model, name, layer):
    return growlib.schema_of(model).tensor(name, layer)


@pytest.mark.parametrize("method,expected", [
    ("stack", [0, 1, 2, 0, 1, 2, 0]),
    ("interleave", [0, 0, 0, 1, 1, 2, 2]),
    ("copy_top", [0, 1, 2, 0, 1, 2, 2][:3] + [2]),
])
def test_grow_depth_copies_the_documented_layers(method, expected, backend):
    small = tiny_model("llama", layers=3)
    grown = growlib.grow_depth(small, layers=len(expected), method=method)
    assert grown.config.num_hidden_layers == len(expected)
    for new, old in enumerate(expected):
        for name in growlib.schema_of(small).layer_names():
            assert torch.equal(layer_tensor(grown, name, new), layer_tensor(small, name, old)), (new, name)
    assert torch.equal(grown.model.embed_tokens.weight, small.model.embed_tokens.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_grow_depth_from_one_layer(family, backend):
    grown = growlib.grow_depth(tiny_model(family, layers=1), layers=2)
    inputs = example_inputs(grown)
    assert torch.isfinite(logits(grown, inputs)).all()


def test_grow_depth_rejects_bad_arguments():
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(ValueError, match="layers must be >= the model's 2"):
        growlib.grow_depth(model, layers=1)
    with pytest.raises(ValueError, match="method"):
        growlib.grow_depth(model, layers=4, method="zip")
    with pytest.raises(ValueError, match="at most 2 layers"):
        growlib.grow_depth(model, layers=5, method="copy_top")
    with pytest.raises(TypeError, match="layers must be an int"):
        growlib.grow_depth(model, layers=4.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("parity", ["even", "odd"])
def test_restrict_keeps_every_other_layer_with_doubled_residual_step(family, parity, backend):
    fine = tiny_model(family, layers=4)
    coarse = growlib.restrict(fine, parity=parity)
    offset = 0 if parity == "even" else 1
    fine_schema, coarse_schema = growlib.schema_of(fine), growlib.schema_of(coarse)
    residual = {s.name for s in fine_schema.specs if s.residual_out}
    assert residual >= {"attn.o.weight", "mlp.down.weight"}
    for i in range(2):
        for name in fine_schema.layer_names():
            step = 2.0 if name in residual else 1.0
            assert torch.equal(coarse_schema.tensor(name, i), step * fine_schema.tensor(name, 2 * i + offset))
    for spec in fine_schema.specs:
        if spec.layer is None:
            assert torch.equal(coarse_schema.tensor(spec.name), fine_schema.tensor(spec.name))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_restricted_pre_ln_model_is_the_coarse_euler_discretisation(family):
    """Pre-LN: x + 2 F(x) per coarse layer.  With the skipped fine layers' residual branches silenced and
    the kept ones halved, the fine model computes exactly what the coarse model computes.  GPT-NeoX's parallel
    residual (F(x) = attn(ln1(x)) + mlp(ln2(x))) is the same Euler step."""
    fine = tiny_model(family, layers=4)
    coarse = growlib.restrict(fine, parity="even")
    schema = growlib.schema_of(fine)
    with torch.no_grad():
        for layer in range(4):
            for name in ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias"):
                schema.tensor(name, layer).mul_(0.0 if layer % 2 else 1.0)
    coarse_from_silenced = growlib.restrict(fine, parity="even")
    with torch.no_grad():
        for layer in (0, 2):
            for name in ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias"):
                schema.tensor(name, layer).mul_(2.0)
    inputs = example_inputs(fine)
    assert relative_error(logits(fine, inputs), logits(coarse_from_silenced, inputs)) < 1e-5
    assert growlib.schema_of(coarse).num_layers == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_prolong_after_restrict_restores_the_fine_model(family, backend):
    fine = tiny_model(family, layers=4)
    reference = tiny_model(family, layers=4)
    coarse = growlib.restrict(fine, parity="odd")
    growlib.prolong_(fine, coarse, parity="odd")
    for key, value in reference.state_dict().items():
        assert torch.equal(fine.state_dict()[key], value), key


def test_prolong_writes_only_its_parity_and_the_shared_tensors(backend):
    fine = tiny_model("llama", layers=4, seed=1)
    coarse = tiny_model("llama", layers=2, seed=2)
    before = growlib.schema_of(tiny_model("llama", layers=4, seed=1))
    growlib.prolong_(fine, coarse, parity="even")
    fine_schema, coarse_schema = growlib.schema_of(fine), growlib.schema_of(coarse)
    assert torch.equal(fine_schema.tensor("attn.q.weight", 1), before.tensor("attn.q.weight", 1))
    assert torch.equal(fine_schema.tensor("attn.q.weight", 2), coarse_schema.tensor("attn.q.weight", 1))
    assert torch.equal(fine_schema.tensor("mlp.down.weight", 2), 0.5 * coarse_schema.tensor("mlp.down.weight", 1))
    assert torch.equal(fine_schema.tensor("embed.tokens"), coarse_schema.tensor("embed.tokens"))


def test_restrict_and_prolong_reject_bad_arguments():
    with pytest.raises(ValueError, match="even number of layers"):
        growlib.restrict(tiny_model("gpt2", layers=3))
    with pytest.raises(ValueError, match="parity"):
        growlib.restrict(tiny_model("gpt2", layers=2), parity="first")
    with pytest.raises(ValueError, match="half of fine's 4 layers"):
        growlib.prolong_(tiny_model("gpt2", layers=4), tiny_model("gpt2", layers=1))
