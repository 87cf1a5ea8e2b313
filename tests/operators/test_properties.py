"""Property-based checks over random model shapes of every family: round trips, function preservation, and
Triton (interpreter) vs reference for the maps, blends and second-moment maps apply_map runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import growlib
from growlib.models import adapter_for
from tests.factories import FAMILIES, GQA_FAMILIES, example_inputs, logits, relative_error, tiny_config, tiny_model

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRITON_SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def model_shapes(draw, families=FAMILIES):
    """A tiny model's config keywords: even head counts, widths and depths (so width and depth 2 divide them),
    odd head sizes and FFN widths allowed; grouped-query attention and tied embeddings where the family has
    them."""
    family = draw(st.sampled_from(families))
    heads = 2 * draw(st.integers(1, 2))
    kv_heads = heads // draw(st.sampled_from([1, 2])) if family in GQA_FAMILIES else heads
    if kv_heads % 2:
        kv_heads = heads
    head_dim = draw(st.sampled_from([2, 5, 6] if family not in GQA_FAMILIES else [2, 6, 10]))  # RoPE needs even
    shape = {"hidden": heads * head_dim, "heads": heads, "kv_heads": kv_heads, "ffn": 2 * draw(st.integers(1, 40)),
             "layers": 2 * draw(st.integers(1, 2))}
    if family != "vit":
        shape["tied"] = draw(st.booleans())
    return family, shape, draw(st.integers(0, 1000))


def build(family, shape, seed, **changes):
    return tiny_model(family, seed=seed, **{**shape, **changes})


@pytest.mark.slow
@SETTINGS
@given(case=model_shapes(), pairing=st.sampled_from(["adjacent", "stack"]))
def test_coalesce_inverts_decoalesce_on_random_shapes(case, pairing):
    family, shape, seed = case
    fine = build(family, shape, seed)
    coarse = growlib.coalesce(fine, depth_pairing=pairing)
    again = growlib.coalesce(growlib.decoalesce(coarse, like=fine, depth_pairing=pairing), depth_pairing=pairing)
    for (name, a), b in zip(coarse.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name


@SETTINGS
@given(case=model_shapes())
def test_width_only_decoalesce_preserves_the_function_on_random_shapes(case):
    family, shape, seed = case
    coarse = build(family, shape, seed)
    like = tiny_config(family, **{**shape, "hidden": 2 * shape["hidden"], "heads": 2 * shape["heads"],
                                  "kv_heads": 2 * shape["kv_heads"], "ffn": 2 * shape["ffn"]})
    fine = growlib.decoalesce(coarse, like=like)
    inputs = example_inputs(coarse, batch=2, seq=5)
    assert relative_error(logits(fine, inputs), logits(coarse, inputs)) < 1e-5


@SETTINGS
@given(case=model_shapes(), factor=st.sampled_from([2, 3]))
def test_hypercloning_preserves_function_on_random_shapes(case, factor):
    family, shape, seed = case
    small = build(family, shape, seed)
    grown = growlib.widen(small, hidden=factor * shape["hidden"], intermediate=factor * shape["ffn"],
                          method="hypercloning")
    inputs = example_inputs(small, batch=2, seq=5)
    assert relative_error(logits(grown, inputs), logits(small, inputs)) < 1e-5


@pytest.mark.slow
@TRITON_SETTINGS
@given(case=model_shapes(families=("llama",)), extra=st.integers(1, 7), map_seed=st.integers(0, 100))
def test_triton_equals_reference_for_random_net2net_maps(case, extra, map_seed):
    family, shape, seed = case
    small = build(family, shape, seed)
    kwargs = dict(hidden=shape["hidden"] + extra, intermediate=shape["ffn"] + extra,
                  heads=shape["heads"] + shape["heads"] // shape["kv_heads"], seed=map_seed)
    with growlib.use_backend("triton"):
        by_kernel = growlib.widen(small, **kwargs)
    with growlib.use_backend("torch"):
        by_reference = growlib.widen(small, **kwargs)
    for a, b in zip(by_kernel.parameters(), by_reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@TRITON_SETTINGS
@given(case=model_shapes(), alpha=st.floats(0.0, 1.0), rms=st.booleans())
def test_triton_equals_reference_for_blends_and_second_moments(case, alpha, rms):
    """apply_map's two epilogues: the interpolate_ blend into the target, and the RMS map of non-negative
    second moments (optimizer state), on random models and tensors."""
    family, shape, seed = case
    fine = build(family, shape, seed)
    coarse = growlib.coalesce(fine)
    gmap = growlib.decoalesce_map(growlib.schema_of(coarse).dims, growlib.schema_of(fine).dims)
    generator = torch.Generator().manual_seed(seed)
    source = {n: torch.rand(p.shape, generator=generator) for n, p in coarse.named_parameters(remove_duplicate=False)}
    results = []
    for backend in ("triton", "torch"):
        target = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(seed + 1))
                  for n, p in fine.named_parameters(remove_duplicate=False)}
        with growlib.use_backend(backend):
            growlib.apply_map(gmap, adapter_for(coarse).schema(coarse, source),
                              adapter_for(fine).schema(fine, target), alpha=None if rms else alpha, rms=rms)
        results.append(target)
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-6, atol=1e-7, msg=name)
    if rms:
        assert all((t >= 0).all() for t in results[0].values())
