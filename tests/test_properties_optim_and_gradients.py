"""Property-based checks of the optimizer-state maps (random models and random moments) and of the
differentiable ops' gradients (torch.autograd.gradcheck in float64 on random shapes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import growlib
from tests.operators.test_properties import build, model_shapes

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def optimizer_with_random_state(model, seed: int) -> torch.optim.AdamW:
    """AdamW over ``model`` whose state holds random moments (second moments >= 0, some exactly 0) and a step
    count, as after some training."""
    opt = torch.optim.AdamW(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        second = torch.rand(p.shape, generator=generator) * (torch.rand(p.shape, generator=generator) > 0.1)
        opt.state[p] = {"step": torch.tensor(7.0), "exp_avg": torch.randn(p.shape, generator=generator),
                        "exp_avg_sq": second}
    return opt


def mapped(source, source_opt, target, gmap) -> torch.optim.AdamW:
    target_opt = torch.optim.AdamW(target.parameters())
    growlib.map_optimizer_state(source_opt, source, target_opt, target, gmap)
    return target_opt


@SETTINGS
@given(case=model_shapes(), extra=st.integers(0, 5), method=st.sampled_from(["net2net", "hypercloning"]),
       map_seed=st.integers(0, 100))
def test_mapped_second_moments_stay_non_negative_through_width_growth(case, extra, method, map_seed):
    family, shape, seed = case
    small = build(family, shape, seed)
    if method == "hypercloning":
        sizes = {"hidden": 2 * shape["hidden"], "intermediate": 2 * shape["ffn"]}
    else:
        sizes = {"hidden": shape["hidden"] + extra, "intermediate": shape["ffn"] + extra,
                 "heads": shape["heads"] + (shape["heads"] // shape["kv_heads"] if extra else 0)}
        if family != "llama":  # their attention width is the hidden size: heads of the old size only
            sizes["hidden"] = sizes["heads"] * shape["hidden"] // shape["heads"]
    gmap = growlib.widen_map(growlib.schema_of(small).dims, method=method, seed=map_seed, **sizes)
    grown = growlib.widen(small, method=method, seed=map_seed, **sizes)
    grown_opt = mapped(small, optimizer_with_random_state(small, seed), grown, gmap)
    for name, p in grown.named_parameters():
        state = grown_opt.state[p]
        assert (state["exp_avg_sq"] >= 0).all() and torch.isfinite(state["exp_avg_sq"]).all(), name
        assert torch.isfinite(state["exp_avg"]).all() and float(state["step"]) == 7.0, name


@pytest.mark.slow
@SETTINGS
@given(case=model_shapes(), pairing=st.sampled_from(["adjacent", "stack"]))
def test_mapping_moments_up_and_back_down_returns_them(case, pairing):
    """decoalesce then coalesce the optimizer state: first moments come back exactly, second moments up to
    the rounding of their square roots."""
    family, shape, seed = case
    fine = build(family, shape, seed)
    coarse = growlib.coalesce(fine, depth_pairing=pairing)
    coarse_opt = optimizer_with_random_state(coarse, seed)
    coarse_dims, fine_dims = growlib.schema_of(coarse).dims, growlib.schema_of(fine).dims
    fine_opt = mapped(coarse, coarse_opt, fine, growlib.decoalesce_map(coarse_dims, fine_dims, pairing))
    back = growlib.coalesce(fine, depth_pairing=pairing)
    back_opt = mapped(fine, fine_opt, back, growlib.coalesce_map(fine_dims, depth_pairing=pairing))
    for (name, p), q in zip(coarse.named_parameters(), back.parameters()):
        before, after = coarse_opt.state[p], back_opt.state[q]
        assert torch.equal(before["exp_avg"], after["exp_avg"]), name
        torch.testing.assert_close(after["exp_avg_sq"], before["exp_avg_sq"], rtol=1e-6, atol=0, msg=name)


@st.composite
def kron_shapes(draw):
    return [draw(st.integers(1, 4)) for _ in range(6)]  # L1, O1, I1, L2, O2, I2


@pytest.mark.slow
@SETTINGS
@given(sizes=kron_shapes(), seed=st.integers(0, 1000))
def test_kron_expand_gradients_pass_gradcheck(sizes, seed):
    l1, o1, i1, l2, o2, i2 = sizes
    generator = torch.Generator().manual_seed(seed)
    W, E, F, D = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
                  for shape in ((l1, o1, i1), (o2, o1), (i2, i1), (l2, l1)))
    with growlib.use_backend("torch"):
        assert torch.autograd.gradcheck(growlib.kron_expand, (W, E, F, D))
        assert torch.autograd.gradgradcheck(growlib.kron_expand, (W, E, F, D))


@SETTINGS
@given(sizes=kron_shapes(), seed=st.integers(0, 1000))
def test_kron_expand_vector_gradients_pass_gradcheck(sizes, seed):
    l1, o1, _, l2, o2, _ = sizes
    generator = torch.Generator().manual_seed(seed)
    w, E, D = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
               for shape in ((l1, o1), (o2, o1), (l2, l1)))
    with growlib.use_backend("torch"):
        assert torch.autograd.gradcheck(growlib.kron_expand_vector, (w, E, D))
