"""Each schedule's stages and transitions on tiny models: shapes, trainable tensors, optimizer policy."""

from __future__ import annotations

import pytest

import growlib
import torch
from growlib.operators.common import layer_stack
from growlib.schedules import build_schedule
from growlib.schedules.protocol import RunState
from tests.factories import tiny_model


def walk(stages, model):
    """Enter every stage in turn (no training) and record (name, steps, dims, trainable layer set)."""
    state = RunState(model)
    seen = []
    for stage in stages:
        transition = stage.enter(state)
        if stage.freeze:
            stage.freeze(transition.model)
        state.model = transition.model
        schema = growlib.schema_of(state.model)
        trainable_layers = sorted({s.layer for s in schema.specs if s.layer is not None
                                   and state.model.get_parameter(s.source).requires_grad})
        seen.append((stage.name, stage.steps, schema.dims["layers"], schema.dims["model"], trainable_layers,
                     transition.optimizer_policy))
    return seen


def enter_stages(stages, model):
    """Enter ``stages`` in turn (no training), freezing as each says; returns the model the last one leaves."""
    state = RunState(model)
    for stage in stages:
        state.model = stage.enter(state).model
        if stage.freeze:
            stage.freeze(state.model)
    return state.model


def test_vcycle_two_levels():
    seen = walk(build_schedule("vcycle", 100, 4), tiny_model("gpt2", layers=4))
    assert [(n, s, l, d) for n, s, l, d, _, _ in seen] == [
        ("level0-down", 5, 4, 48), ("level1-coarsest", 70, 2, 24), ("level0-up", 25, 4, 48)]
    assert all(policy == "reset" for *_, policy in seen)


def test_vcycle_three_levels_returns_to_the_kept_models():
    model = tiny_model("llama", layers=4, hidden=48, heads=4, kv_heads=4, ffn=72)
    seen = walk(build_schedule("vcycle", 100, 4, levels=3), model)
    assert [(n, l, d) for n, _, l, d, _, _ in seen] == [
        ("level0-down", 4, 48), ("level1-down", 2, 24), ("level2-coarsest", 1, 12), ("level1-up", 2, 24),
        ("level0-up", 4, 48)]


def test_vcycle_interpolates_into_the_model_kept_before_coalescing():
    model = tiny_model("gpt2", layers=2)
    stages = build_schedule("vcycle", 40, 2, alpha=0.0)
    assert enter_stages(stages, model) is model  # alpha = 0: the kept fine model, unchanged


def test_ode_multilevel_alternates_parity_and_prolongs_into_the_fine_model():
    model = tiny_model("gpt2", layers=4)
    seen = walk(build_schedule("ode_multilevel", 100, 4, cycles=2), model)
    assert [n for n, *_ in seen] == ["cycle0-pre", "cycle0-coarse-even", "cycle0-post", "cycle1-pre",
                                     "cycle1-coarse-odd", "cycle1-post"]
    assert [l for _, _, l, *_ in seen] == [4, 2, 4, 4, 2, 4]


def test_mslt_freezes_embeddings_and_old_layers_then_trains_jointly():
    seen = walk(build_schedule("mslt", 100, 4, layer_counts=[1, 2, 3, 4], freeze_embeddings=True),
                tiny_model("bert", layers=4))
    assert [(n, l, t) for n, _, l, _, t, _ in seen] == [
        ("layers1", 1, [0]), ("layers2", 2, [1]), ("layers3", 3, [2]), ("layers4", 4, [3]),
        ("joint", 4, [0, 1, 2, 3])]


def test_mslt_keeps_the_head_trainable_and_embeddings_frozen():
    stages = build_schedule("mslt", 100, 4, layer_counts=[2, 4], freeze_embeddings=True)
    model = enter_stages(stages[:2], tiny_model("bert", layers=4))
    assert model.cls.predictions.transform.dense.weight.requires_grad
    assert not model.bert.embeddings.position_embeddings.weight.requires_grad
    assert model.bert.encoder.layer[3].output.dense.weight.requires_grad
    assert not model.bert.encoder.layer[1].output.dense.weight.requires_grad


def test_stack_doubles_depth_with_everything_trainable():
    seen = walk(build_schedule("stack", 90, 4), tiny_model("llama", layers=4))
    assert [(n, s, l, t) for n, s, l, _, t, _ in seen] == [
        ("layers1", 30, 1, [0]), ("layers2", 30, 2, [0, 1]), ("layers4", 30, 4, [0, 1, 2, 3])]


@pytest.mark.parametrize("name,options,match", [
    ("warp", {}, "schedule must be one of"),
    ("vcycle", {"speed": 2}, "unknown"),
    ("vcycle", {"alpha": 2.0}, "alpha"),
    ("vcycle", {"levels": 1}, "levels"),
    ("mslt", {"layer_counts": [2, 1, 4]}, "strictly increasing"),
    ("mslt", {"layer_counts": [1, 2]}, "end at the model's 4 layers"),
    ("mslt", {"layer_counts": [1, 4]}, "at most double"),
    ("vcycle", {"levels": 4}, "multiple of 8"),
    ("vcycle", {"down_fraction": 0.3, "up_fraction": 0.45}, "add up to 1"),
    ("vcycle", {"coarse_lr_scale": -1}, "coarse_lr_scale"),
    ("ode_multilevel", {"coarse_share": 0.95}, "post share"),
    ("ode_multilevel", {"cycles": 0}, "cycles"),
    ("stack", {"stage_fractions": [0.5, 0.5]}, "one entry per layer count"),
    ("vcycle", {"optimizer_policy": "average"}, "optimizer_policy"),
    ("ode_multilevel", {"optimizer_policy": None}, "optimizer_policy"),
    ("msg", {"ramp_fraction": 0.0}, "ramp_fraction"),
    ("ode_multilevel", {"lr_schedule": "linear"}, "lr_schedule must be one of"),
    ("mslt", {"freeze_embeddings": False, "frozen_forward": True}, "needs freeze_embeddings"),
    ("msg", {"layer_counts": [3, 2, 4]}, "strictly increasing"),
])
def test_bad_schedule_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(name, 100, 4, **options)


def test_alpha_must_be_a_number():
    with pytest.raises(TypeError, match="alpha"):
        build_schedule("vcycle", 100, 4, alpha=True)


@pytest.mark.parametrize("name,options", [("vcycle", {"levels": 3}), ("ode_multilevel", {"cycles": 3}),
                                          ("mslt", {}), ("stack", {}), ("msg", {}), ("baseline", {})])
def test_every_schedule_spends_exactly_its_budget(name, options):
    assert sum(stage.steps for stage in build_schedule(name, 120, 4, **options)) == 120


def test_too_small_a_budget_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        build_schedule("vcycle", 10, 4)


def test_ode_coherence_makes_the_coarse_gradient_the_restricted_fine_gradient():
    from growlib.schedules.multilevel import coherence_term
    from growlib.schedules.protocol import linear_term_value
    from tests.factories import example_inputs

    fine = tiny_model("gpt2", layers=4)
    coarse = growlib.restrict(fine, parity="odd")
    inputs = example_inputs(fine)
    batch = {**inputs, "labels": inputs["input_ids"]}
    v = coherence_term(fine, coarse, "odd", batch)
    loss = coarse(**batch).loss + linear_term_value(coarse, v)
    loss.backward()
    fine(**batch).loss.backward()
    coarse_schema = growlib.schema_of(coarse)
    grads = {n: p.grad for n, p in coarse.named_parameters(remove_duplicate=False)}
    fine_grads = {n: p.grad for n, p in fine.named_parameters(remove_duplicate=False)}
    coarse_grad_schema = growlib.models.adapter_for(coarse).schema(coarse, grads)
    fine_grad_schema = growlib.models.adapter_for(fine).schema(fine, fine_grads)
    for spec in coarse_schema.specs:
        if spec.layer is None:
            expected = fine_grad_schema.tensor(spec.name)
        else:
            expected = fine_grad_schema.tensor(spec.name, 2 * spec.layer + 1) * (0.5 if spec.residual_out else 1.0)
        torch.testing.assert_close(coarse_grad_schema.tensor(spec.name, spec.layer), expected, rtol=1e-4,
                                   atol=1e-6, msg=f"{spec.name} {spec.layer}")


def test_flag_options_must_be_bools():
    with pytest.raises(TypeError, match="coherence"):
        build_schedule("ode_multilevel", 100, 4, coherence="yes")
    with pytest.raises(TypeError, match="frozen_forward must be a bool or None"):
        build_schedule("mslt", 100, 4, frozen_forward="yes")


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "vit"])
def test_msg_growth_preserves_the_function_then_ramps_the_new_layers_in(family):
    from tests.factories import example_inputs

    stages = build_schedule("msg", 40, 4)
    assert [(st.name, st.steps) for st in stages] == [("layers1", 13), ("layers2", 13), ("layers4", 14)]
    state = RunState(tiny_model(family, layers=4))
    state.model = stages[0].enter(state).model.eval()
    inputs = example_inputs(state.model)
    with torch.no_grad():
        before = state.model(**inputs).logits
    grown = stages[1].enter(state).model.eval()
    assert growlib.schema_of(grown).dims["layers"] == 2
    assert all(p.requires_grad for p in grown.parameters())
    stages[1].before_step(grown, 0)
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs).logits, before, rtol=1e-6, atol=1e-6)
    ramp = max(1, round(13 * 0.2))
    stages[1].before_step(grown, 1)
    assert [m.value for m in grown.growlib_msg_masks] == [pytest.approx(1 / ramp)]
    with torch.no_grad():
        assert not torch.allclose(grown(**inputs).logits, before, atol=1e-6)  # the new layer is blending in
    stages[1].before_step(grown, ramp)
    assert [m.value for m in grown.growlib_msg_masks] == [1.0]


def test_ligo_trains_a_small_model_then_fits_the_operator_into_the_full_one(monkeypatch):
    from growlib.operators.ligo import LiGO
    from tests.factories import example_inputs

    fits = []
    monkeypatch.setattr(LiGO, "fit", lambda self, batches, steps, lr: fits.append((len(batches), steps, lr)))
    assert growlib.schema_of(build_schedule("ligo", 100, 4)[0].enter(RunState(tiny_model("gpt2", layers=4))).model
                             ).dims["model"] == 48  # full width by default
    stages = build_schedule("ligo", 100, 4, fit_steps=7, small_width=0.5)
    assert [(s.name, s.steps) for s in stages] == [("small", 25), ("large", 75)]
    full = tiny_model("llama", layers=4, hidden=48, heads=4, kv_heads=2, ffn=72)
    batch = {**example_inputs(full), "labels": example_inputs(full)["input_ids"]}
    state = RunState(full, sample_batch=lambda ahead=0: batch, micro_batch_flops=lambda m: 1000.0)
    state.model = stages[0].enter(state).model
    small_dims = growlib.schema_of(state.model).dims
    assert (small_dims["layers"], small_dims["model"], small_dims["ffn"], small_dims["heads"],
            small_dims["kv_heads"]) == (2, 24, 36, 2, 1)
    transition = stages[1].enter(state)
    assert growlib.schema_of(transition.model).dims == growlib.schema_of(full).dims
    assert fits == [(7, 7, 1e-3)]
    assert transition.flops > 7 * 1000.0  # the large model's micro-batches plus the expansions
    assert transition.optimizer_policy == "reset"


def test_ligo_dry_run_reports_the_same_flops_without_fitting(monkeypatch):
    from growlib.operators.ligo import LiGO

    monkeypatch.setattr(LiGO, "fit", lambda *args, **kwargs: pytest.fail("a dry run must not fit"))
    stages = build_schedule("ligo", 100, 4, fit_steps=5)
    state = RunState(tiny_model("gpt2", layers=4), dry_run=True, micro_batch_flops=lambda m: 10.0)
    state.model = stages[0].enter(state).model
    assert stages[1].enter(state).flops > 50.0


@pytest.mark.parametrize("options,match", [
    ({"small_width": 0.3}, "whole sizes"), ({"small_layers": 5}, "small_layers"), ({"small_fraction": 1.0}, "leave"),
    ({"fit_steps": 0}, "fit_steps"), ({"fit_lr": -1}, "fit_lr")])
def test_ligo_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        stages = build_schedule("ligo", 100, 4, **options)
        stages[0].enter(RunState(tiny_model("gpt2", layers=4)))


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("bert", True), ("llama", False)])
def test_mslt_by_default_freezes_the_embeddings_unless_they_are_the_lm_head(family, tied):
    """Tied (GPT-2, BERT's MLM head): embeddings and head stay trainable, HF's layers run the frozen bottom
    (gradients must pass down); untied (Llama): embeddings frozen, the bottom runs forward-only."""
    stages = build_schedule("mslt", 40, 4)
    assert [s.name for s in stages] == ["layers2", "layers4", "joint"]
    model = enter_stages(stages[:2], tiny_model(family, layers=4))
    assert model.get_input_embeddings().weight.requires_grad == tied
    assert model.get_output_embeddings().weight.requires_grad
    assert (getattr(model, "growlib_frozen_bottom", None) is None) == tied
    assert not any(p.requires_grad for p in layer_stack(model)[1].parameters())


def test_mslt_can_keep_the_embeddings_trainable():
    stages = build_schedule("mslt", 40, 4, layer_counts=[1, 2, 3, 4], freeze_embeddings=False,
                            frozen_forward=False)
    model = enter_stages(stages[:3], tiny_model("gpt2", layers=4))
    assert model.transformer.wte.weight.requires_grad
    assert not any(p.requires_grad for p in model.transformer.h[0].parameters())
    assert all(p.requires_grad for p in model.transformer.h[2].parameters())
