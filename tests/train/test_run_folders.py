"""Run folders a user can trust (Python API): a run has an identity that --resume checks setting by setting, a
folder holding a run is never destroyed implicitly, one process per folder, a full disk loses nothing, and
``compare`` validates everything first, resumes, and summarises what finished when a schedule fails."""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import subprocess
import sys

import pytest

from growlib.train import experiment as E
from growlib.train.experiment import ScheduleFailures, compare, run
from growlib.train.checkpoint import CheckpointWriteError, load_checkpoint
from growlib.train.runs import RunFolderBusy, RunFolderError
from tests.factories import tiny_run_experiment

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}
QUIET = {"log": lambda message: None}


@pytest.fixture
def exp(tmp_path):
    return tiny_run_experiment(tmp_path)


def folder_files(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in ("run.json", "checkpoint.pt", "metrics.jsonl")
            if (folder / name).exists()}


def test_a_fresh_run_refuses_a_folder_holding_a_run_and_overwrite_starts_over(exp, tmp_path):
    out = tmp_path / "out"
    run(exp, "baseline", 0, out_dir=str(out), checkpoint_every=4)
    before = folder_files(out / "baseline-seed0")
    assert set(before) == {"run.json", "checkpoint.pt", "metrics.jsonl"}
    with pytest.raises(RunFolderError, match=r"already holds a run \(run.json, checkpoint.pt, metrics.jsonl, "
                                             r"model\): --resume continues it, --overwrite deletes it"):
        run(exp, "baseline", 0, out_dir=str(out))
    assert folder_files(out / "baseline-seed0") == before  # nothing touched
    again = run(exp, "baseline", 0, out_dir=str(out), overwrite=True)
    lines = (out / "baseline-seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"train"' in line] == list(range(1, 13))  # one run only
    assert again.steps == 12


def test_an_exported_model_alone_is_a_run_that_only_overwrite_deletes(exp, tmp_path):
    """A folder pruned down to its model/ still holds the model a user trained: a fresh run there is refused."""
    out = tmp_path / "out"
    run(exp, "baseline", 0, out_dir=str(out))
    folder = out / "baseline-seed0"
    for name in ("run.json", "checkpoint.pt", "metrics.jsonl"):
        (folder / name).unlink()
    with pytest.raises(RunFolderError, match=r"already holds a run \(model\)"):
        run(exp, "baseline", 0, out_dir=str(out))
    assert (folder / "model" / "config.json").exists()
    run(exp, "baseline", 0, out_dir=str(out), overwrite=True)
    assert (folder / "model" / "config.json").exists() and (folder / "run.json").exists()


def other_text(exp, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(inspect.getsource(json))
    return {"data": str(other)}


@pytest.mark.parametrize("change,match", [
    (lambda exp, tmp: {"size": {**SIZE, "hidden": 64}}, r"--size: the run has \{.*'hidden': 32.*\}, this command has "
                                                        r"\{.*'hidden': 64"),
    (other_text, r"--data \(the tokenized data\): the run has '[0-9a-f]{64}', this command has '[0-9a-f]{64}'"),
    (lambda exp, tmp: {"vocab_size": 280}, r"--vocab-size: the run has 300, this command has 280"),
    (lambda exp, tmp: {"total_steps": 16}, r"--steps / --tokens: the run has 12, this command has 16"),
    (lambda exp, tmp: {"config": dataclasses.replace(exp.config, lr=2e-3)}, r"--lr: the run has 0.001, this command "
                                                                           r"has 0.002"),
    (lambda exp, tmp: {"config": dataclasses.replace(exp.config, batch_size=3)}, r"--batch-size: the run has 2"),
    (lambda exp, tmp: {"family": "llama"}, r"--model: the run has 'gpt2', this command has 'llama'"),
])
def test_resume_refuses_any_setting_that_changes_what_is_trained(exp, tmp_path, change, match):
    out = str(tmp_path / "out")
    run(exp, "baseline", 0, out_dir=out, checkpoint_every=4)
    before = folder_files(tmp_path / "out" / "baseline-seed0")
    changed = dataclasses.replace(exp, **change(exp, tmp_path))
    with pytest.raises(RunFolderError, match=f"cannot resume .*another run than this command's: .*{match}"):
        run(changed, "baseline", 0, out_dir=out, resume=True)
    assert folder_files(tmp_path / "out" / "baseline-seed0") == before


def test_resume_refuses_other_schedule_options(exp, tmp_path):
    exp = dataclasses.replace(exp, total_steps=40)
    run(exp, "vcycle", 0, out_dir=str(tmp_path), checkpoint_every=4)
    with pytest.raises(RunFolderError, match=r"--schedule-args: the run has \{\}, this command has \{'alpha': 0.05"):
        run(exp, "vcycle", 0, {"alpha": 0.05, "optimizer_policy": "keep"}, out_dir=str(tmp_path), resume=True)


def test_resume_needs_a_run_and_its_checkpoint(exp, tmp_path):
    with pytest.raises(RunFolderError, match="nothing to resume in .*: it holds no run \\(a mistyped --out\\?\\)"):
        run(exp, "baseline", 0, out_dir=str(tmp_path / "typo"), resume=True)
    run(exp, "baseline", 0, out_dir=str(tmp_path / "out"), checkpoint_every=0)
    folder = tmp_path / "out" / "baseline-seed0"
    os.remove(folder / "checkpoint.pt")  # as if killed before its first checkpoint
    with pytest.raises(RunFolderError, match="stopped before its first checkpoint; start it over with --overwrite"):
        run(exp, "baseline", 0, out_dir=str(tmp_path / "out"), resume=True)
    os.remove(folder / "run.json")
    (folder / "checkpoint.pt").write_bytes(b"from an earlier growlib")
    with pytest.raises(RunFolderError, match="its checkpoint has no run.json beside it"):
        run(exp, "baseline", 0, out_dir=str(tmp_path / "out"), resume=True)


def test_a_finished_run_resumes_to_its_own_result_without_training(exp, tmp_path):
    first = run(exp, "baseline", 0, out_dir=str(tmp_path), checkpoint_every=5)
    assert load_checkpoint(str(tmp_path / "baseline-seed0" / "checkpoint.pt"))["global_step"] == 12  # a final one
    metrics = (tmp_path / "baseline-seed0" / "metrics.jsonl").read_bytes()
    again = run(exp, "baseline", 0, out_dir=str(tmp_path), resume=True)
    assert again == first
    assert (tmp_path / "baseline-seed0" / "metrics.jsonl").read_bytes() == metrics


def test_one_process_per_run_folder_and_a_dead_holder_leaves_no_stale_lock(exp, tmp_path):
    folder = tmp_path / "baseline-seed0"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(folder / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"in use by another growlib process \\(pid {holder.pid}\\)"):
            run(exp, "baseline", 0, out_dir=str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert run(exp, "baseline", 0, out_dir=str(tmp_path)).steps == 12  # the kernel dropped the dead holder's lock


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resume_finishes(exp, tmp_path, monkeypatch):
    straight = run(exp, "baseline", 0, out_dir=str(tmp_path / "straight"), checkpoint_every=4)
    monkeypatch.setenv("GROWLIB_FAULT_INJECT", "fail_checkpoint_write:8")
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*No space left on device; its "
                                                   r"temporary file was removed and the previous checkpoint is intact "
                                                   r"\(step 8\); once there is space, --resume continues from step 4"):
        run(exp, "baseline", 0, out_dir=str(tmp_path / "out"), checkpoint_every=4)
    folder = tmp_path / "out" / "baseline-seed0"
    assert glob.glob(str(folder / "*.tmp-*")) == []
    assert load_checkpoint(str(folder / "checkpoint.pt"))["global_step"] == 4
    monkeypatch.delenv("GROWLIB_FAULT_INJECT")
    resumed = run(exp, "baseline", 0, out_dir=str(tmp_path / "out"), checkpoint_every=4, resume=True)
    assert len(resumed.evals) == len(straight.evals) == 3
    assert resumed.final_val_loss == straight.final_val_loss and resumed.evals == [
        e._replace(wall=r.wall) for e, r in zip(straight.evals, resumed.evals)]


@pytest.mark.parametrize("schedules,seeds,steps,match", [
    (["baseline", "stack", "baseline"], [0], 12, r"schedules lists \['baseline'\] more than once"),
    (["stack"], [0, 0], 12, r"seeds lists \[0\] more than once"),
    (["vcycle"], [0], 5, r"schedule 'vcycle' cannot run on this budget \(the baseline's 5 steps\): total_steps=5 is "
                         "too small"),
    (["ligo"], [0], 12, None),
])
def test_compare_checks_every_schedule_seed_and_budget_before_training(exp, tmp_path, schedules, seeds, steps, match):
    exp = dataclasses.replace(exp, total_steps=steps)
    if match is None:  # a budget this small is legal for ligo: it must train, not divide by zero
        compare(exp, schedules, seeds, str(tmp_path), tuning=None, **QUIET)
        assert (tmp_path / "summary.md").exists()
        return
    with pytest.raises(ValueError, match=match):
        compare(exp, schedules, seeds, str(tmp_path), tuning=None, **QUIET)
    assert not glob.glob(str(tmp_path / "*-seed*"))  # nothing trained


@pytest.mark.slow
def test_compare_refuses_a_folder_of_other_settings_before_training(exp, tmp_path):
    compare(exp, ["stack"], [0], str(tmp_path), tuning=None, **QUIET)
    metrics = (tmp_path / "baseline-seed0" / "metrics.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match=r"baseline-seed0 holds another run than this comparison's: "
                                             r"--steps / --tokens: the run has 12, this command has 16"):
        compare(dataclasses.replace(exp, total_steps=16), ["stack"], [0], str(tmp_path), tuning=None, **QUIET)
    assert (tmp_path / "baseline-seed0" / "metrics.jsonl").read_bytes() == metrics
    compare(dataclasses.replace(exp, total_steps=16), ["stack"], [0], str(tmp_path), tuning=None, overwrite=True,
            **QUIET)
    assert load_checkpoint(str(tmp_path / "baseline-seed0" / "checkpoint.pt"))["global_step"] == 16


@pytest.mark.slow
def test_compare_summarises_what_finished_when_a_schedule_fails(exp, tmp_path, monkeypatch):
    real_train = E.train

    def train(exp, schedule, *args, **kwargs):
        if schedule == "stack":
            raise RuntimeError("a bug in stack")
        return real_train(exp, schedule, *args, **kwargs)

    monkeypatch.setattr(E, "train", train)
    lines = []
    with pytest.raises(ScheduleFailures, match="1 schedule\\(s\\) failed: stack seed 0: RuntimeError: a bug in stack; "
                                               "the others are summarised in") as failure:
        compare(exp, ["stack", "msg"], [0, 1], str(tmp_path), tuning=None, log=lines.append)
    assert lines[-1].endswith("[4 of 4 runs done, about 0s left]")  # stack's seed 1 was never counted as to come
    summary = (tmp_path / "summary.md").read_text()
    assert "| msg |" in summary and "| stack |" not in summary and "| msg |" in failure.value.table
    assert "FAILED (not in the table): stack seed 0: RuntimeError: a bug in stack" in summary


@pytest.mark.slow
def test_a_diverged_tuning_run_loses_the_sweep_instead_of_ending_the_comparison(exp, tmp_path, monkeypatch):
    real_run = E.run

    def run(exp, schedule, seed, *args, **kwargs):
        if exp.config.lr > 1.5e-3:
            raise FloatingPointError("the loss is nan at step 3")
        return real_run(exp, schedule, seed, *args, **kwargs)

    monkeypatch.setattr(E, "run", run)
    from growlib.train.tuning import Tuning

    compare(exp, ["stack"], [0], str(tmp_path), tuning=Tuning(lr_grid=(1, 2), seeds=(9,)), **QUIET)
    tuning = (tmp_path / "tuning.md").read_text()
    assert "nan" in tuning.lower()
    rows = (tmp_path / "summary.csv").read_text().splitlines()[1:]
    assert all(row.split(",")[2] == "0.001" for row in rows)  # every arm at x1, the run that did not diverge
