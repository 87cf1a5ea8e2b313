"""NaN / inf in the loss, in a gradient, or in the parameters a transition produces: detected with the step,
stage and tensor; by default the run stops and the last good checkpoint stays on disk, with
``on_nonfinite='skip'`` the step is dropped and the run goes on."""

from __future__ import annotations

import json
import os

import pytest
import torch

from growlib.schedules.protocol import RunState, Stage, Transition
from growlib.train.checkpoint import load_checkpoint
from growlib.train.config import TrainConfig
from growlib.train.loop import run_schedule
from growlib.train.metrics import MetricsLog
from tests.factories import tiny_model
from tests.train.test_loop import CONFIG, EVAL, random_batch, trainable_count

POISONED_PARAMETER = "transformer.h.1.mlp.c_fc.weight"


class Poison:
    """Makes chosen training steps (1-based global steps) produce NaN: in the logits (so the loss) or only in
    one parameter's gradient (the loss stays finite).  Evaluation batches are never poisoned.  It attaches to
    the model the stage trains (``attach`` is the stage's before_step), which after a resume is the model
    rebuilt from the checkpoint."""

    def __init__(self, steps, where: str):
        self.steps, self.where, self.current, self.attached = set(steps), where, None, set()

    def attach(self, model, step_in_stage: int) -> None:
        if id(model) in self.attached:
            return
        self.attached.add(id(model))
        if self.where == "loss":
            model.lm_head.register_forward_hook(self._logits)
        else:
            model.get_parameter(POISONED_PARAMETER).register_hook(self._gradient)

    def stages(self, steps: int, before_step=None) -> list[Stage]:
        def both(model, step_in_stage):
            self.attach(model, step_in_stage)
            if before_step:
                before_step(model, step_in_stage)
        return [Stage("train", steps, lambda s: Transition(s.model), before_step=both)]

    def train_batch(self, index: int) -> dict:
        self.current = index + 1  # grad_accum is 1: micro-batch index = global step - 1
        return random_batch(index)

    def _active(self, training: bool = True) -> bool:
        return training and self.current in self.steps

    def _logits(self, module, args, output):
        return output * float("nan") if self._active(module.training) else output

    def _gradient(self, grad):
        return grad * float("inf") if self._active() else grad


def train(model, stages, poison, tmp_path, config=CONFIG, **kwargs):
    return run_schedule(stages, RunState(model), config, train_batch=poison.train_batch, eval_batches=EVAL,
                        step_flops=trainable_count, metrics=MetricsLog(str(tmp_path / "m.jsonl")),
                        checkpoint_path=str(tmp_path / "ckpt.pt"), checkpoint_every=4, **kwargs)


def records(tmp_path, kind):
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assert_last_good_checkpoint(tmp_path, step):
    checkpoint = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert checkpoint["global_step"] == step
    assert all(torch.isfinite(v).all() for v in checkpoint["model"]["state"].values())


@pytest.mark.parametrize("where,match", [
    ("loss", r"the loss is nan at step 7 \(stage 'train'\)"),
    ("gradient", rf"the gradient of parameter '{POISONED_PARAMETER}' holds NaN or inf at step 7 \(stage 'train'"),
])
def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, where, match):
    model = tiny_model("gpt2", layers=2)
    poison = Poison({7}, where)
    with pytest.raises(FloatingPointError, match=match):
        train(model, poison.stages(12), poison, tmp_path)
    assert_last_good_checkpoint(tmp_path, 4)
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update was never applied


def test_nan_written_by_a_transition_names_the_tensor_and_stage(tmp_path):
    def break_one_weight(state):
        with torch.no_grad():
            state.model.get_parameter("transformer.h.0.attn.c_proj.weight")[3, 5] = float("nan")
        return Transition(state.model)

    stages = [Stage("small", 4, lambda s: Transition(s.model)), Stage("broken", 4, break_one_weight)]
    poison = Poison(set(), "loss")
    with pytest.raises(FloatingPointError, match=r"parameter 'transformer.h.0.attn.c_proj.weight' holds NaN or inf "
                                                 r"right after the transition into stage 'broken' \(before step 5\)"):
        train(tiny_model("gpt2", layers=2), stages, poison, tmp_path)
    assert_last_good_checkpoint(tmp_path, 4)


def test_a_model_that_turned_nonfinite_is_not_checkpointed(tmp_path, monkeypatch):
    model = tiny_model("gpt2", layers=2)
    original_step, updates = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):  # as if update 8 overflowed a weight, loss and gradients finite
        original_step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 8:
            with torch.no_grad():
                model.get_parameter("transformer.ln_f.bias")[0] = float("inf")

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    poison = Poison(set(), "loss")
    with pytest.raises(FloatingPointError, match=r"'transformer.ln_f.bias' holds NaN or inf after step 8 \(stage "
                                                 r"'train'\); not writing a checkpoint"):
        train(model, poison.stages(12), poison, tmp_path)
    assert_last_good_checkpoint(tmp_path, 4)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_skip_drops_the_bad_steps_and_finishes_the_run(tmp_path, where):
    model = tiny_model("gpt2", layers=2)
    poison = Poison({5, 6}, where)
    weights_at_start = {}

    def snapshot(model, step_in_stage):
        weights_at_start[step_in_stage + 1] = [p.detach().clone() for p in model.parameters()]

    stages = poison.stages(10, before_step=snapshot)
    config = TrainConfig(**{**CONFIG.__dict__, "on_nonfinite": "skip"})
    result = train(model, stages, poison, tmp_path, config=config)
    assert result.steps == 10
    skipped = records(tmp_path, "skipped")
    assert [r["step"] for r in skipped] == [5, 6]
    assert all(r["tensor"] == (None if where == "loss" else POISONED_PARAMETER) for r in skipped)
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3, 4, 7, 8, 9, 10]
    for step in (5, 6):  # a skipped step changes no weight
        assert all(torch.equal(a, b) for a, b in zip(weights_at_start[step], weights_at_start[step + 1]))
    assert not all(torch.equal(a, b) for a, b in zip(weights_at_start[7], weights_at_start[8]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_last_good_checkpoint(tmp_path, 10)  # the run ends with a checkpoint of its final state
    assert {float(s["step"]) for s in load_checkpoint(str(tmp_path / "ckpt.pt"))["optimizer"]["state"].values()} \
        == {8.0}  # 10 steps, 2 of them dropped


def test_skip_stops_after_too_many_consecutive_bad_steps(tmp_path):
    poison = Poison(set(range(3, 13)), "gradient")
    config = TrainConfig(**{**CONFIG.__dict__, "on_nonfinite": "skip", "max_consecutive_skips": 2})
    with pytest.raises(FloatingPointError, match=r"at step 5 .*3 non-finite steps in a row"):
        train(tiny_model("gpt2", layers=2), poison.stages(12), poison, tmp_path, config=config)
    assert [r["step"] for r in records(tmp_path, "skipped")] == [3, 4]


def test_the_run_of_skipped_steps_survives_a_resume(tmp_path):
    """The checkpoint after step 4 holds two skips in a row (steps 3, 4): resumed, step 5 is the third and
    step 6 the fourth, one more than max_consecutive_skips=3 allows, as if the run had never stopped."""
    config = TrainConfig(**{**CONFIG.__dict__, "on_nonfinite": "skip", "max_consecutive_skips": 3})
    poison = Poison({3, 4, 5, 6, 7}, "gradient")
    with pytest.raises(FloatingPointError, match=r"at step 6 .*4 non-finite steps in a row"):
        train(tiny_model("gpt2", layers=2), poison.stages(8), poison, tmp_path, config=config)
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["consecutive_skips"] == 2
    poison = Poison({5, 6}, "gradient")
    with pytest.raises(FloatingPointError, match=r"at step 6 .*4 non-finite steps in a row"):
        train(tiny_model("gpt2", layers=2, seed=4), poison.stages(8), poison, tmp_path, config=config, resume=True)


def test_a_run_stopped_by_nan_resumes_with_skip(tmp_path):
    """The fault policy is not part of the run's identity: resume the stopped run, dropping the bad step."""
    poison = Poison({6}, "loss")
    with pytest.raises(FloatingPointError):
        train(tiny_model("gpt2", layers=2), poison.stages(8), poison, tmp_path)
    poison = Poison({6}, "loss")
    config = TrainConfig(**{**CONFIG.__dict__, "on_nonfinite": "skip"})
    train(tiny_model("gpt2", layers=2, seed=4), poison.stages(8), poison, tmp_path, config=config, resume=True)
    assert [r["step"] for r in records(tmp_path, "skipped")] == [6]
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["global_step"] == 8


def test_the_cli_exits_nonzero_with_the_fault_message(tmp_path, monkeypatch, capsys):
    from growlib import cli
    from growlib.train.distributed import TorchSteps

    original, calls = TorchSteps.micro_batch, []

    def nan_on_third_step(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(TorchSteps, "micro_batch", nan_on_third_step)
    monkeypatch.setenv("GROWLIB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read())
    size = json.dumps({"layers": 1, "hidden": 16, "heads": 1, "intermediate": 32})
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--size", size, "--data", str(corpus), "--vocab-size", "280", "--steps", "6",
                  "--batch-size", "2", "--seq-len", "16", "--eval-every", "100", "--eval-batches", "1",
                  "--checkpoint-every", "2", "--out", str(tmp_path / "out")])
    message = str(exit_.value.code)  # SystemExit(str): printed to stderr, exit status 1
    assert message.startswith("growlib train: FloatingPointError: the loss is nan at step 3 (stage 'full')")
    assert load_checkpoint(str(tmp_path / "out" / "baseline-seed0" / "checkpoint.pt"))["global_step"] == 2
