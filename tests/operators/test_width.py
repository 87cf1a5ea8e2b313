"""Function-preserving width growth: HyperCloning exactly, Net2Net up to LayerNorm statistics."""

from __future__ import annotations

import pytest
import torch

import growlib
from tests.factories import FAMILIES, example_inputs, logits, relative_error, tiny_model

TIED_CASES = [(f, t) for f in FAMILIES for t in (True, False) if not (f == "vit" and t)]


@pytest.mark.parametrize("family,tied", TIED_CASES)
def test_hypercloning_preserves_the_function(family, tied, backend):
    small = tiny_model(family, hidden=48, heads=4, tied=tied)
    grown = growlib.widen(small, hidden=96, intermediate=140, method="hypercloning")
    assert growlib.schema_of(grown).dims["heads"] == 8
    inputs = example_inputs(small)
    assert relative_error(logits(grown, inputs), logits(small, inputs)) < 1e-5


def test_hypercloning_with_grouped_query_attention_and_three_times_wider(backend):
    small = tiny_model("llama", hidden=48, heads=4, kv_heads=2)
    grown = growlib.widen(small, hidden=144, intermediate=210, method="hypercloning")
    dims = growlib.schema_of(grown).dims
    assert (dims["heads"], dims["kv_heads"], dims["head_dim"]) == (12, 6, 12)
    inputs = example_inputs(small)
    assert relative_error(logits(grown, inputs), logits(small, inputs)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_net2net_keeps_the_old_units_and_reports_its_layernorm_error(family, backend):
    small = tiny_model(family, hidden=48, heads=3, kv_heads=3)
    grown = growlib.widen(small, hidden=80, intermediate=101, heads=5, method="net2net", seed=3)
    small_schema, grown_schema = growlib.schema_of(small), growlib.schema_of(grown)
    embedding = "embed.patch.bias" if family == "vit" else "embed.tokens"
    assert torch.equal(grown_schema.tensor(embedding)[..., :48], small_schema.tensor(embedding))
    assert torch.equal(grown_schema.tensor("ln1.weight", 1)[:48], small_schema.tensor("ln1.weight", 1))
    inputs = example_inputs(small)
    error = relative_error(logits(grown, inputs), logits(small, inputs))
    print(f"net2net {family}: relative logit error {error:.3g} (uneven copies change LayerNorm statistics)")
    assert 0 < error < 1.0


def test_net2net_is_seeded():
    small = tiny_model("bert")
    a = growlib.widen(small, hidden=60, heads=5, seed=1)
    b = growlib.widen(small, hidden=60, heads=5, seed=1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden": 40}, "hidden must be >= the current 48"),
    ({"hidden": 72, "method": "hypercloning"}, "multiple of 48"),
    ({"hidden": 50}, "pass heads"),
    ({"hidden": 60, "heads": 5, "method": "copy"}, "method"),
    ({"intermediate": 0}, "intermediate must be >= 1"),
])
def test_widen_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        growlib.widen(tiny_model("bert"), **kwargs)


def test_widen_with_grouped_query_attention_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of the 2 query heads"):
        growlib.widen(tiny_model("llama", heads=4, kv_heads=2), hidden=60, heads=5)
