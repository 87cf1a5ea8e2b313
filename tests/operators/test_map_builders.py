"""Every growth-map builder takes a Schema or its dims dict, builds the same map from either, and refuses
anything else naming the parameter."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import growlib
from growlib.operators.depth import RESIDUAL_OUT
from tests.factories import FAMILIES, tiny_config, tiny_model

#: builder -> (the parameter its first argument is, a call taking the fine and coarse shapes and the fine sizes)
BUILDERS = {
    "grow_depth_map": ("source", lambda fine, coarse, d: growlib.grow_depth_map(fine, 6, "copy_top")),
    "coalesce_map": ("source", lambda fine, coarse, d: growlib.coalesce_map(fine, 2, 2, "stack")),
    "decoalesce_map": ("coarse", lambda fine, coarse, d: growlib.decoalesce_map(coarse, fine, "stack")),
    "widen_map": ("source", lambda fine, coarse, d: growlib.widen_map(
        fine, hidden=2 * d["model"], intermediate=d["ffn"] + 5, method="net2net", seed=3)),
    "restrict_map": ("source", lambda fine, coarse, d: growlib.restrict_map(fine, "odd")),
    "prolong_map": ("fine", lambda fine, coarse, d: growlib.prolong_map(fine, "odd")),
}


def assert_same_map(a: growlib.GrowthMap, b: growlib.GrowthMap) -> None:
    assert (a.source_dims, a.target_dims) == (b.source_dims, b.target_dims)
    assert a.depth == b.depth and a.depth_by_name == b.depth_by_name
    assert a.width.keys() == b.width.keys()
    for role, width in a.width.items():
        for side in ("out", "in"):
            x, y = width.side(side), b.width[role].side(side)
            assert x.n_in == y.n_in and torch.equal(x.index, y.index) and torch.equal(x.weight, y.weight), role


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_every_builder_takes_a_schema_or_its_dims(builder, family):
    fine = growlib.schema_of(tiny_model(family, layers=4))
    coarse = growlib.schema_of(growlib.coalesce(tiny_model(family, layers=4)))
    _, call = BUILDERS[builder]
    from_schemas = call(fine, coarse, fine.dims)
    assert_same_map(from_schemas, call(fine.dims, coarse.dims, fine.dims))
    assert_same_map(from_schemas, call(dict(fine.dims), coarse, fine.dims))  # mixed forms too


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_builders_refuse_anything_but_a_schema_or_dims(builder):
    model = tiny_model("gpt2", layers=4)
    fine, coarse = growlib.schema_of(model), growlib.schema_of(growlib.coalesce(model))
    parameter, call = BUILDERS[builder]

    def call_with(value):
        """The builder with its first argument (``parameter``) replaced by ``value``."""
        return call(fine, value, fine.dims) if parameter == "coarse" else call(value, coarse, fine.dims)

    with pytest.raises(TypeError, match=rf"{parameter} must be a growlib.Schema or its dims dict .*got GPT2LMHead"):
        call_with(model)
    dims = (coarse if parameter == "coarse" else fine).dims
    with pytest.raises(ValueError, match=rf"{parameter} must be a Schema's dims dict.*missing \['kv'\]"):
        call_with({k: v for k, v in dims.items() if k != "kv"})


def llama_with_biases() -> torch.nn.Module:
    config = tiny_config("llama")
    config.attention_bias = config.mlp_bias = True
    return T.LlamaForCausalLM(config)


@pytest.mark.parametrize("model", [*FAMILIES, "llama with biases"])
def test_adapters_mark_exactly_the_residual_names_the_depth_maps_scale(model):
    """restrict_map / prolong_map scale RESIDUAL_OUT by name, from sizes alone: every adapter must name its
    residual branches' last projections so, and mark no other tensor residual_out."""
    schema = growlib.schema_of(llama_with_biases() if model == "llama with biases" else tiny_model(model))
    marked = {spec.name for spec in schema.specs if spec.residual_out}
    assert marked == {spec.name for spec in schema.specs} & set(RESIDUAL_OUT)
    assert {"attn.o.weight", "mlp.down.weight"} <= marked
