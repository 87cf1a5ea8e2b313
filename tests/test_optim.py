"""Optimizer state through growth maps: moments travel with their parameters, second moments stay >= 0."""

from __future__ import annotations

import pytest
import torch

import growlib
from tests.factories import example_inputs, tiny_model


def trained_optimizer(model, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = example_inputs(model)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_coalesce_of_decoalesced_state_round_trips(family, backend):
    coarse = tiny_model(family, layers=1, hidden=24, heads=2, ffn=35)
    coarse_opt = trained_optimizer(coarse)
    fine = growlib.decoalesce(coarse, like=tiny_model(family, layers=2))
    fine_opt = torch.optim.AdamW(fine.parameters(), lr=1e-3)
    up = growlib.decoalesce_map(growlib.schema_of(coarse).dims, growlib.schema_of(fine).dims)
    growlib.map_optimizer_state(coarse_opt, coarse, fine_opt, fine, up)
    again = growlib.coalesce(fine)
    again_opt = torch.optim.AdamW(again.parameters(), lr=1e-3)
    down = growlib.coalesce_map(growlib.schema_of(fine).dims)
    growlib.map_optimizer_state(fine_opt, fine, again_opt, again, down)
    for (name, p), q in zip(coarse.named_parameters(), again.parameters()):
        assert torch.equal(coarse_opt.state[p]["exp_avg"], again_opt.state[q]["exp_avg"]), name
        # second moments pass through sqrt and square: equal up to rounding
        torch.testing.assert_close(coarse_opt.state[p]["exp_avg_sq"], again_opt.state[q]["exp_avg_sq"],
                                   rtol=1e-6, atol=0)
        assert again_opt.state[q]["step"] == coarse_opt.state[p]["step"]


@pytest.mark.slow
def test_mapped_second_moments_stay_non_negative_and_training_continues(backend):
    small = tiny_model("gpt2", layers=2)
    opt = trained_optimizer(small)
    grown = growlib.widen(small, hidden=72, heads=6, intermediate=100, seed=2)
    grown_opt = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    gmap = growlib.widen_map(growlib.schema_of(small).dims, hidden=72, heads=6, intermediate=100, seed=2)
    growlib.map_optimizer_state(opt, small, grown_opt, grown, gmap)
    assert all((s["exp_avg_sq"] >= 0).all() for s in grown_opt.state.values())
    # tied embedding and head share one state entry
    assert grown_opt.state[grown.lm_head.weight] is grown_opt.state[grown.transformer.wte.weight]
    inputs = example_inputs(grown)
    grown(**inputs, labels=inputs["input_ids"]).loss.backward()
    grown_opt.step()
    assert all(torch.isfinite(p).all() for p in grown.parameters())


def test_reset_policy_clears_the_state():
    small = tiny_model("gpt2", layers=1)
    opt = trained_optimizer(small, steps=1)
    grown = growlib.grow_depth(small, layers=2)
    grown_opt = torch.optim.AdamW(grown.parameters())
    grown_opt.state[next(grown.parameters())]["junk"] = 1
    gmap = growlib.grow_depth_map(growlib.schema_of(small).dims, 2)
    growlib.map_optimizer_state(opt, small, grown_opt, grown, gmap, policy="reset")
    assert len(grown_opt.state) == 0


def test_map_optimizer_state_rejects_bad_input():
    small = tiny_model("gpt2", layers=1)
    grown = growlib.grow_depth(small, layers=2)
    gmap = growlib.grow_depth_map(growlib.schema_of(small).dims, 2)
    fresh = torch.optim.AdamW(small.parameters())
    grown_opt = torch.optim.AdamW(grown.parameters())
    with pytest.raises(ValueError, match="no state for any parameter of source_model: take a step first"):
        growlib.map_optimizer_state(fresh, small, grown_opt, grown, gmap)
    with pytest.raises(ValueError, match="policy"):
        growlib.map_optimizer_state(fresh, small, grown_opt, grown, gmap, policy="copy")
    with pytest.raises(TypeError, match="source_optimizer"):
        growlib.map_optimizer_state(object(), small, grown_opt, grown, gmap)
    with pytest.raises(ValueError, match="does not optimize every parameter"):
        growlib.map_optimizer_state(fresh, small, torch.optim.AdamW([next(grown.parameters())]), grown, gmap)
    opt = trained_optimizer(small, steps=1)
    for state in opt.state.values():
        state["mystery"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        growlib.map_optimizer_state(opt, small, grown_opt, grown, gmap)


@pytest.mark.slow
@pytest.mark.parametrize("family,tied", [("gpt2", True), ("llama", False), ("bert", True)])
def test_mapped_moments_are_the_grown_models_gradients(family, tied, backend):
    """Under a function-preserving map the dual map sends g to exactly the grown model's gradient g'."""
    small = tiny_model(family, layers=2, tied=tied)
    grown = growlib.widen(small, hidden=96, intermediate=210, method="hypercloning")
    inputs = example_inputs(small)
    labels = {"labels": inputs["input_ids"]}
    small_opt = torch.optim.AdamW(small.parameters())
    grown_opt = torch.optim.AdamW(grown.parameters())
    for model, opt in ((small, small_opt), (grown, grown_opt)):
        model(**inputs, **labels).loss.backward()
    for p in small.parameters():
        small_opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": p.grad.clone(), "exp_avg_sq": p.grad ** 2}
    gmap = growlib.widen_map(growlib.schema_of(small).dims, hidden=96, intermediate=210, method="hypercloning")
    growlib.map_optimizer_state(small_opt, small, grown_opt, grown, gmap)
    scale = max(float(p.grad.abs().max()) for p in grown.parameters())  # key biases get only rounding noise
    for name, p in grown.named_parameters():
        torch.testing.assert_close(grown_opt.state[p]["exp_avg"], p.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
        torch.testing.assert_close(grown_opt.state[p]["exp_avg_sq"], p.grad ** 2, atol=1e-5 * scale ** 2,
                                   rtol=1e-3, msg=name)
