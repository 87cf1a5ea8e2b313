"""Function-preserving width growth: HyperCloning exactly, Net2Net up to LayerNorm statistics."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import growlib
from tests.factories import FAMILIES, _randomize, example_inputs, logits, relative_error, tiny_config, tiny_model

TIED_CASES = [(f, t) for f in FAMILIES for t in (True, False) if not (f in ("vit", "deit") and t)]


@pytest.mark.slow
@pytest.mark.parametrize("family,tied", TIED_CASES)
def test_hypercloning_preserves_the_function(family, tied, backend):
    small = tiny_model(family, hidden=48, heads=4, tied=tied)
    grown = growlib.widen(small, hidden=96, intermediate=140, method="hypercloning")
    assert growlib.schema_of(grown).dims["heads"] == 8
    inputs = example_inputs(small)
    assert relative_error(logits(grown, inputs), logits(small, inputs)) < 1e-5


@pytest.mark.slow
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
    embedding = "embed.patch.bias" if family in ("vit", "deit") else "embed.tokens"
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
    ({"intermediate": 0}, "intermediate must be an int >= 1"),
])
def test_widen_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        growlib.widen(tiny_model("bert"), **kwargs)


def test_widen_with_grouped_query_attention_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of the 2 query heads"):
        growlib.widen(tiny_model("llama", heads=4, kv_heads=2), hidden=60, heads=5)


def test_bert2bert_fpi_is_net2net():
    small = tiny_model("llama", hidden=48, heads=4, kv_heads=2)
    fpi = growlib.widen(small, hidden=72, intermediate=101, heads=6, method="bert2bert_fpi", seed=4)
    net2net = growlib.widen(small, hidden=72, intermediate=101, heads=6, method="net2net", seed=4)
    for (key, a), b in zip(fpi.state_dict().items(), net2net.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama", "gpt_neox"])
def test_bert2bert_aki_takes_the_new_units_of_a_layer_from_the_layer_above(family, backend):
    small = tiny_model(family, hidden=48, heads=4, kv_heads=2, layers=3)
    kwargs = dict(hidden=72, intermediate=101, heads=6, seed=2)
    aki = growlib.schema_of(growlib.widen(small, method="bert2bert_aki", **kwargs))
    fpi = growlib.schema_of(growlib.widen(small, method="bert2bert_fpi", **kwargs))
    small_dims = growlib.schema_of(small).dims
    for spec in aki.specs:
        got, fpi_rows = aki.tensors[spec.key], fpi.tensors[spec.key]
        if spec.layer is None or spec.layer == 2:  # embeddings, head and the top layer stay FPI
            assert torch.equal(got, fpi_rows), spec.key
            continue
        old = small_dims[spec.axes[0].role]
        if spec.head_split:  # GPT-NeoX's (heads, head_dim, in) views: the new units are whole heads
            old //= small_dims["head_dim"]
        assert torch.equal(got[:old], fpi_rows[:old]), spec.key
        assert torch.equal(got[old:], fpi.tensor(spec.name, spec.layer + 1)[old:]), spec.key
        if got.shape[0] > old:
            assert not torch.equal(got, fpi_rows), spec.key


def test_bert2bert_aki_is_not_a_single_growth_map():
    dims = growlib.schema_of(tiny_model("bert")).dims
    with pytest.raises(ValueError, match="no single growth map"):
        growlib.widen_map(dims, hidden=96, method="bert2bert_aki")


@pytest.mark.parametrize("change", ["layer_norm_elementwise_affine", "_remove_final_layer_norm"])
@pytest.mark.parametrize("tied", [True, False])
def test_opt_without_a_final_norm_gain_keeps_its_function_only_untied(change, tied):
    """The known limit in docs/operators.md: with a tied head, width growth folds its 1/k into the gain of the
    norm feeding the head.  OPT without one (non-affine norms, or no final norm) and a tied head has nowhere to
    put it, so growing by k multiplies every logit by k (relative error k - 1 = 1.0 at x2); untied stays exact."""
    config = tiny_config("opt", tied=tied)
    setattr(config, change, change == "_remove_final_layer_norm")
    torch.manual_seed(0)
    small = T.OPTForCausalLM(config).eval()
    _randomize(small, 0)
    inputs = example_inputs(small)
    grown = growlib.widen(small, hidden=96, intermediate=140, method="hypercloning")
    expected = logits(small, inputs) * (2.0 if tied else 1.0)
    assert relative_error(logits(grown, inputs), expected) < 1e-5
    assert relative_error(logits(grown, inputs), logits(small, inputs)) == pytest.approx(1.0 if tied else 0.0,
                                                                                         abs=1e-5)
