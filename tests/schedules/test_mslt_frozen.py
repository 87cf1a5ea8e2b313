"""MSLT's frozen layers run through growlib.freeze_forward: same loss and same gradients for the trainable
top as HF's own layers, with no autograd graph through the frozen bottom."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib.frozen import restore_layers, route_frozen_bottom
from growlib.schedules import build_schedule
from growlib.schedules.progressive import freeze_below
from growlib.schedules.protocol import RunState
from tests.factories import example_inputs, tiny_model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def training_batch(model):
    inputs = example_inputs(model, batch=3, seq=17)
    if "pixel_values" in inputs:
        return {**inputs, "labels": torch.tensor([1, 0, 2])}
    if model.config.model_type in ("bert", "roberta"):
        return {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"]), "labels": inputs["input_ids"]}
    return {**inputs, "labels": inputs["input_ids"]}


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "vit", "roberta", "qwen2", "mistral", "gpt_neox", "opt",
                                    "deit"])
def test_frozen_bottom_gives_the_trainable_top_the_same_loss_and_gradients(family, backend):
    model = tiny_model(family, layers=4).eval()
    batch = training_batch(model)
    freeze_below(3, frozen_forward=False, freeze_embeddings=True)(model)
    expected_loss, expected_grads = loss_and_grads(model, batch)
    stack = route_frozen_bottom(model, 3)
    assert stack.num_layers == 3
    loss, grads = loss_and_grads(model, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    restore_layers(model)
    assert loss_and_grads(model, batch)[0] == pytest.approx(expected_loss, rel=1e-6)


def test_frozen_bottom_keeps_no_autograd_graph_below_the_trainable_layers():
    model = tiny_model("gpt2", layers=4)
    freeze_below(3, freeze_embeddings=True)(model)
    seen = []
    layer = growlib.operators.common.layer_stack(model)[3]
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(**training_batch(model)).loss.backward()
    assert seen[0].grad_fn is None and not seen[0].requires_grad


def test_mslt_routes_its_frozen_stages_and_restores_the_joint_stage():
    stages = build_schedule("mslt", 40, 4, layer_counts=[1, 2, 3, 4])
    state = RunState(tiny_model("llama", layers=4))
    routed = []
    for stage in stages:
        state.model = stage.enter(state).model
        if stage.freeze:
            stage.freeze(state.model)
        frozen = getattr(state.model, "growlib_frozen_bottom", None)
        routed.append(frozen[0].num_layers if frozen else 0)
    assert routed == [0, 1, 2, 3, 0]


def test_route_frozen_bottom_checks_its_count():
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(ValueError, match="count"):
        route_frozen_bottom(model, 3)
    with pytest.raises(ValueError, match="count"):
        route_frozen_bottom(model, 0)
