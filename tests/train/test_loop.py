"""The training loop: stages and transitions, learning-rate schedule, metrics, exact resume from checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import growlib
from growlib.schedules import build_schedule
from growlib.schedules.protocol import RunState, Stage, Transition
from growlib.train.config import TrainConfig, learning_rate
from growlib.train.loop import run_schedule
from growlib.train.metrics import MetricsLog
import transformers as T

from tests.factories import tiny_config, tiny_model

CONFIG = TrainConfig(batch_size=4, seq_len=16, eval_every=5, eval_batches=2, warmup_steps=2)


def random_batch(step: int) -> dict:
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


EVAL = [random_batch(10 ** 6 + i) for i in range(2)]


def trainable_count(model):
    return float(sum(p.numel() for p in model.parameters() if p.requires_grad))


def run(stages, model, **kwargs):
    kwargs.setdefault("step_flops", trainable_count)
    return run_schedule(stages, RunState(model), CONFIG, train_batch=random_batch, eval_batches=EVAL, **kwargs)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    stage = Stage("s", 100, lambda s: Transition(s.model), lr_scale=2.0)
    lrs = [learning_rate(CONFIG, stage, i) for i in range(100)]
    assert lrs[0] == pytest.approx(CONFIG.lr)  # warmup 2 steps, peak 2 * lr
    assert max(lrs) == pytest.approx(2 * CONFIG.lr)
    assert lrs[-1] == pytest.approx(2 * CONFIG.lr * CONFIG.min_lr_ratio, rel=1e-2)


def test_continued_learning_rate_runs_one_cosine_over_the_whole_run():
    config = TrainConfig(warmup_steps=2, lr_schedule="continue")
    first, second = Stage("a", 50, lambda s: Transition(s.model)), Stage("b", 50, lambda s: Transition(s.model))
    lrs = [learning_rate(config, first, i, i, 100) for i in range(50)]
    lrs += [learning_rate(config, second, i, 50 + i, 100) for i in range(50)]
    assert lrs[0] < lrs[1] == pytest.approx(config.lr)  # warmup only at the start
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # no restart at the stage boundary
    assert lrs[-1] == pytest.approx(config.lr * config.min_lr_ratio, rel=1e-2)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_the_config_lr_schedule_overrides_the_stages_own():
    """ode_multilevel's stages continue one curve by default; TrainConfig(lr_schedule="restart") restarts it."""
    stages = build_schedule("ode_multilevel", 100, 4)
    assert {s.lr_schedule for s in stages} == {"continue"}
    assert {s.lr_schedule for s in build_schedule("vcycle", 100, 4)} == {"restart"}

    def curve(config):
        lrs, step = [], 0
        for stage in stages:
            for i in range(stage.steps):
                lrs.append(learning_rate(config, stage, i, step, 100))
                step += 1
        return lrs

    first_of_coarse = stages[0].steps
    own, restarted = curve(TrainConfig(warmup_steps=2)), curve(TrainConfig(warmup_steps=2, lr_schedule="restart"))
    assert own[first_of_coarse] < own[first_of_coarse - 1]  # still decaying across the boundary
    assert restarted[first_of_coarse] < restarted[first_of_coarse + 1]  # warming up again
    with pytest.raises(ValueError, match="stage 'x': lr_schedule must be one of"):
        Stage("x", 1, lambda s: Transition(s.model), lr_schedule="linear")


def test_metrics_and_flops_are_recorded_per_step_and_eval(tmp_path):
    log = tmp_path / "m.jsonl"
    result = run(build_schedule("vcycle", 20, 2), tiny_model("gpt2", layers=2), metrics=MetricsLog(str(log)),
                 schedule_name="vcycle")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert {r["stage"] for r in train} == {"level0-down", "level1-coarsest", "level0-up"}
    assert all(r["flops"] > 0 and r["loss"] > 0 for r in train)
    increments = {r["stage"]: r["flops"] - p["flops"] for p, r in zip(train, train[1:])}
    assert increments["level1-coarsest"] < increments["level0-up"] / 3  # the coarse level is far cheaper
    assert result.flops == train[-1]["flops"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 10, 15, 20]


def test_loss_is_unchanged_by_a_function_preserving_transition():
    model = tiny_model("gpt2", layers=2)
    seen = {}

    def grow(state):
        seen["before"] = _eval_loss(state.model)
        wider = growlib.widen(state.model, hidden=96, intermediate=140, method="hypercloning")
        seen["after"] = _eval_loss(wider)
        return Transition(wider)

    run([Stage("small", 3, lambda s: Transition(s.model)), Stage("wide", 2, grow)], model)
    assert seen["after"] == pytest.approx(seen["before"], rel=1e-5)


def _eval_loss(model):
    from growlib.train.metrics import evaluate
    return evaluate(model, EVAL)


class Crash(RuntimeError):
    pass


TWO_ODE_CYCLES = {"cycles": 2, "pre_share": 0.1, "coarse_share": 0.6}  # 24 steps: 1 pre, 7 coarse, 4 post per cycle


@pytest.mark.parametrize("schedule,options,crash_at", [
    ("vcycle", {}, 15), ("mslt", {}, 15),
    # inside a coarse stage: its linear term comes from the checkpoint
    ("ode_multilevel", {**TWO_ODE_CYCLES, "coherence": True}, 6),
    # the kept fine optimizer state comes from the checkpoint
    ("ode_multilevel", {**TWO_ODE_CYCLES, "optimizer_policy": "keep"}, 9),
    ("msg", {}, 13),  # inside a ramp: the masks are re-attached
])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(schedule, options, crash_at, tmp_path):
    stages = lambda: build_schedule(schedule, 24, 4, **options)  # noqa: E731
    straight_log = tmp_path / "straight.jsonl"
    run(stages(), tiny_model("gpt2", layers=4), metrics=MetricsLog(str(straight_log)))

    checkpoint = str(tmp_path / "ckpt.pt")
    crashed_log = tmp_path / "crashed.jsonl"

    def crashing_batch(step):
        if step == crash_at:
            raise Crash()
        return random_batch(step)

    with pytest.raises(Crash):
        run_schedule(stages(), RunState(tiny_model("gpt2", layers=4)), CONFIG, train_batch=crashing_batch,
                     eval_batches=EVAL, step_flops=trainable_count, metrics=MetricsLog(str(crashed_log)),
                     checkpoint_path=checkpoint, checkpoint_every=4)
    run(stages(), tiny_model("gpt2", layers=4, seed=9), metrics=MetricsLog(str(crashed_log)),
        checkpoint_path=checkpoint, checkpoint_every=4, resume=True)

    def losses(path):
        return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"}

    straight, resumed = losses(straight_log), losses(crashed_log)
    assert sorted(resumed) == list(range(1, 25))
    assert resumed == straight


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)


def test_resume_restores_the_random_state_that_dropout_uses(tmp_path):
    def with_dropout(seed):
        config = tiny_config("gpt2", layers=2)
        config.resid_pdrop = config.embd_pdrop = 0.3  # in the config, so the checkpointed model has it too
        torch.manual_seed(seed)
        return T.GPT2LMHeadModel(config).train()

    stages = lambda: build_schedule("baseline", 12, 2)  # noqa: E731
    straight = tmp_path / "straight.jsonl"
    torch.manual_seed(5)
    run(stages(), with_dropout(0), metrics=MetricsLog(str(straight)))
    checkpoint, crashed = str(tmp_path / "ckpt.pt"), tmp_path / "crashed.jsonl"

    def crashing_batch(step):
        if step == 9:
            raise Crash()
        return random_batch(step)

    torch.manual_seed(5)
    with pytest.raises(Crash):
        run_schedule(stages(), RunState(with_dropout(0)), CONFIG, train_batch=crashing_batch, eval_batches=EVAL,
                     step_flops=trainable_count, metrics=MetricsLog(str(crashed)), checkpoint_path=checkpoint,
                     checkpoint_every=4)
    torch.manual_seed(123)  # a different random state: only the checkpoint's may count
    run(stages(), with_dropout(0), metrics=MetricsLog(str(crashed)), checkpoint_path=checkpoint,
        checkpoint_every=4, resume=True)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines()) if r["kind"] == "train"}
              for p in (straight, crashed)]
    assert losses[0] == losses[1]


def test_resume_refuses_another_runs_checkpoint_and_restarts_cleanly_without_one(tmp_path):
    checkpoint, log = str(tmp_path / "ckpt.pt"), tmp_path / "m.jsonl"
    run(build_schedule("baseline", 8, 2), tiny_model("gpt2", layers=2), checkpoint_path=checkpoint,
        checkpoint_every=4, schedule_name="baseline")
    with pytest.raises(ValueError, match="belongs to another run"):
        run(build_schedule("baseline", 12, 2), tiny_model("gpt2", layers=2), checkpoint_path=checkpoint,
            checkpoint_every=4, resume=True, schedule_name="baseline")
    log.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tr')  # killed before any checkpoint
    run(build_schedule("baseline", 3, 2), tiny_model("gpt2", layers=2), metrics=MetricsLog(str(log)),
        checkpoint_path=str(tmp_path / "none.pt"), resume=True)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert [s for s in steps] == [1, 2, 3, 3]  # three train records and the final eval, each once


def test_a_stage_can_carry_the_optimizer_state_through_its_map(monkeypatch):
    seen = {}

    def grow(state):
        gmap = growlib.widen_map(growlib.schema_of(state.model).dims, hidden=96, intermediate=140,
                                 method="hypercloning")
        return Transition(growlib.widen(state.model, hidden=96, intermediate=140, method="hypercloning"), gmap,
                          optimizer_policy="map")

    def record_flops(model):
        seen.setdefault("widths", []).append(model.config.n_embd)
        return trainable_count(model)

    stages = [Stage("small", 3, lambda s: Transition(s.model)), Stage("wide", 1, grow)]
    original_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        if self.state:  # the step count each parameter's state holds before this update
            seen["steps"] = {float(s["step"]) for s in self.state.values()}
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    run_schedule(stages, RunState(tiny_model("gpt2", layers=2)), CONFIG, train_batch=random_batch,
                 eval_batches=EVAL, step_flops=record_flops)
    assert seen["widths"] == [48, 96]
    assert seen["steps"] == {3.0}  # the wide model's first step starts from the mapped state, step count carried


def test_progress_sees_every_step():
    records = []
    run(build_schedule("stack", 12, 2), tiny_model("gpt2", layers=2), progress=records.append)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {r["total_steps"] for r in records} == {12}
    assert records[-1]["flops"] > records[0]["flops"] > 0


def test_keep_policy_resumes_the_fine_optimizer_state_after_the_coarse_phase(monkeypatch):
    """ODE multilevel with optimizer_policy='keep': the post-smoothing optimizer starts from exactly the state
    the pre-smoothing optimizer had, step count included."""
    loaded = []
    original_load = torch.optim.AdamW.load_state_dict

    def spy_load(self, state_dict):
        loaded.append((state_dict, {float(s["step"]) for s in state_dict["state"].values()}))
        return original_load(self, state_dict)

    saved = []
    original_state_dict = torch.optim.AdamW.state_dict

    def spy_save(self):
        state = original_state_dict(self)
        saved.append(state)
        return state

    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", spy_load)
    monkeypatch.setattr(torch.optim.AdamW, "state_dict", spy_save)
    stages = build_schedule("ode_multilevel", 20, 4, pre_share=0.25, coarse_share=0.6, optimizer_policy="keep")
    run(stages, tiny_model("gpt2", layers=4))
    assert len(saved) == 1 and [state for state, _ in loaded] == saved  # saved restricting, loaded prolonging
    assert loaded[0][1] == {5.0}  # the 5 pre-smoothing steps


def test_map_policy_starts_the_coarse_level_from_the_restricted_fine_state(monkeypatch):
    mapped = []
    monkeypatch.setattr("growlib.train.loop.map_optimizer_state",
                        lambda *args: mapped.append(args[-1].target_dims["layers"]))
    run(build_schedule("vcycle", 20, 4, optimizer_policy="map"), tiny_model("gpt2", layers=4))
    assert mapped == [2]  # down to the coarse level only; the way up resumes the kept state
    mapped.clear()
    run(build_schedule("ode_multilevel", 20, 4, cycles=2, pre_share=0.1, coarse_share=0.6, optimizer_policy="map"),
        tiny_model("gpt2", layers=4))
    assert mapped == [2, 2]  # one restriction per cycle


def test_map_policy_refuses_frozen_parameters():
    def grow(state):
        model = growlib.widen(state.model, hidden=96, method="hypercloning")
        gmap = growlib.widen_map(growlib.schema_of(state.model).dims, hidden=96, method="hypercloning")
        return Transition(model, gmap, optimizer_policy="map")

    def freeze_embeddings(model):
        model.transformer.wte.weight.requires_grad_(False)

    stages = [Stage("small", 2, lambda s: Transition(s.model)), Stage("wide", 1, grow, freeze=freeze_embeddings)]
    with pytest.raises(ValueError, match="frozen"):
        run(stages, tiny_model("gpt2", layers=2))


def test_transition_policy_is_validated():
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(ValueError, match="optimizer_policy must be one of"):
        Transition(model, optimizer_policy="copy")
    with pytest.raises(ValueError, match="growth_map"):
        Transition(model, optimizer_policy="map")
    with pytest.raises(ValueError, match="optimizer_state"):
        Transition(model, optimizer_policy="keep")


def test_transitions_are_charged_their_map_flops():
    """A V-cycle's FLOPs are its steps' FLOPs plus the coalescing and de-coalescing maps."""
    from growlib.apply import counting_map_flops

    result = run(build_schedule("vcycle", 20, 2), tiny_model("gpt2", layers=2), step_flops=lambda m: 0.0)
    fine = tiny_model("gpt2", layers=2)
    with counting_map_flops() as maps:
        coarse = growlib.coalesce(fine)
        growlib.interpolate_(fine, coarse, 0.25)
    assert result.flops == maps.flops > 0
