"""Property-based checks over random model shapes: round trips and Triton (interpreter) vs reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import growlib
from tests.factories import example_inputs, logits, relative_error, tiny_model

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def llama_shapes(draw):
    kv_heads = draw(st.sampled_from([2, 4]))
    group = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 6, 10]))
    return {"heads": kv_heads * group, "kv_heads": kv_heads, "hidden": kv_heads * group * head_dim,
            "ffn": 2 * draw(st.integers(1, 40)), "layers": 2 * draw(st.integers(1, 2)),
            "tied": draw(st.booleans()), "seed": draw(st.integers(0, 1000))}


@SETTINGS
@given(shape=llama_shapes(), pairing=st.sampled_from(["adjacent", "stack"]))
def test_coalesce_inverts_decoalesce_on_random_shapes(shape, pairing):
    seed = shape.pop("seed")
    fine = tiny_model("llama", seed=seed, **shape)
    coarse = growlib.coalesce(fine, depth_pairing=pairing)
    again = growlib.coalesce(growlib.decoalesce(coarse, like=fine, depth_pairing=pairing), depth_pairing=pairing)
    for a, b in zip(coarse.parameters(), again.parameters()):
        assert torch.equal(a, b)


@SETTINGS
@given(shape=llama_shapes(), factor=st.sampled_from([2, 3]))
def test_hypercloning_preserves_function_on_random_shapes(shape, factor):
    seed = shape.pop("seed")
    small = tiny_model("llama", seed=seed, **shape)
    grown = growlib.widen(small, hidden=factor * shape["hidden"], intermediate=factor * shape["ffn"],
                          method="hypercloning")
    inputs = example_inputs(small, batch=2, seq=5)
    assert relative_error(logits(grown, inputs), logits(small, inputs)) < 1e-5


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=llama_shapes(), extra=st.integers(1, 7), map_seed=st.integers(0, 100))
def test_triton_equals_reference_for_random_net2net_maps(shape, extra, map_seed):
    seed = shape.pop("seed")
    small = tiny_model("llama", seed=seed, **shape)
    kwargs = dict(hidden=shape["hidden"] + extra, intermediate=shape["ffn"] + extra,
                  heads=shape["heads"] + shape["heads"] // shape["kv_heads"], seed=map_seed)
    with growlib.use_backend("triton"):
        by_kernel = growlib.widen(small, **kwargs)
    with growlib.use_backend("torch"):
        by_reference = growlib.widen(small, **kwargs)
    for a, b in zip(by_kernel.parameters(), by_reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
