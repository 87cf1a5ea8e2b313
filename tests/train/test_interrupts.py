"""Real ``growlib`` processes interrupted as users interrupt them: Ctrl-C / SIGTERM (a checkpoint at the current
step and one line saying where --resume continues), a full disk (one line, the last checkpoint intact, --resume
finishes), a second process on the same folder, a killed run started again without --resume, and a killed
``compare`` run again (finished runs kept, the interrupted one resumed, the result the uninterrupted one's)."""

from __future__ import annotations

import csv
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from growlib.train.checkpoint import load_checkpoint
from tests.factories import subprocess_environment as environment

pytestmark = pytest.mark.subprocess

SIZE = '{"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}'


def command(tmp_path, *args, subcommand="train"):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(inspect.getsource(inspect))
    return [sys.executable, "-m", "growlib.cli", subcommand, "--model", "gpt2", "--size", SIZE, "--data", str(corpus),
            "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--eval-every", "10", "--eval-batches", "1",
            *args]


def train_steps(metrics) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "train"' in line]


def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def wait_for_announcement(process, what: str) -> None:
    """Read stderr until the fault injection says it sleeps at ``what``."""
    for line in process.stderr:
        if f"growlib fault injection: {what}" in line:
            return
    raise AssertionError(f"the process ended without reaching {what}: {process.wait()}")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_checkpoints_the_current_step_and_says_where_resume_continues(tmp_path, signal_number):
    out = tmp_path / "out"
    args = ("--steps", "100000", "--checkpoint-every", "1000", "--out", str(out))
    process = subprocess.Popen(command(tmp_path, *args), env=environment(tmp_path), stderr=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    metrics = out / "baseline-seed0" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(train_steps(metrics)) >= 3, process)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = train_steps(metrics)[-1]
    name = signal.Signals(signal_number).name
    assert stderr.strip().splitlines()[-1] == (
        f"growlib train: interrupted by {name} at step {step} of 100000; checkpoint "
        f"{out / 'baseline-seed0' / 'checkpoint.pt'} holds step {step}: --resume continues from there")
    assert load_checkpoint(str(out / "baseline-seed0" / "checkpoint.pt"))["global_step"] == step
    resumed = subprocess.run(command(tmp_path, *args, "--resume"), capture_output=True, text=True,
                             env=environment(tmp_path, f"exit_at_step:{step + 3}"))
    assert resumed.returncode == 13, resumed.stderr  # the fault's exit, after two more steps
    assert train_steps(metrics) == list(range(1, step + 3))


def test_a_full_disk_is_one_line_the_last_checkpoint_survives_and_resume_finishes(tmp_path):
    out = tmp_path / "out"
    args = ("--steps", "12", "--checkpoint-every", "4", "--out", str(out))
    full = subprocess.run(command(tmp_path, *args), env=environment(tmp_path, "fail_checkpoint_write:8"),
                          capture_output=True, text=True)
    assert full.returncode == 1 and "Traceback" not in full.stderr
    checkpoint = out / "baseline-seed0" / "checkpoint.pt"
    assert full.stderr.strip().splitlines()[-1] == (
        f"growlib train: could not write checkpoint {checkpoint}: No space left on device; its temporary file was "
        "removed and the previous checkpoint is intact (step 8); once there is space, --resume continues from step 4")
    assert sorted(os.listdir(out / "baseline-seed0")) == [".lock", "checkpoint.pt", "metrics.jsonl", "run.json"]
    assert load_checkpoint(str(checkpoint))["global_step"] == 4
    resumed = subprocess.run(command(tmp_path, *args, "--resume"), env=environment(tmp_path), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert train_steps(out / "baseline-seed0" / "metrics.jsonl") == list(range(1, 13))


def test_a_second_process_is_refused_and_a_killed_run_is_neither_deleted_nor_restarted_silently(tmp_path):
    out = tmp_path / "out"
    args = ("--steps", "12", "--checkpoint-every", "2", "--out", str(out))
    first = subprocess.Popen(command(tmp_path, *args), env=environment(tmp_path, "sleep_at_step:5"),
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_announcement(first, "sleep_at_step:5")
        second = subprocess.run(command(tmp_path, *args, "--overwrite"), env=environment(tmp_path),
                                capture_output=True, text=True)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == (
            f"growlib train: run folder {out / 'baseline-seed0'} is in use by another growlib process (pid "
            f"{first.pid}): one process per run folder; wait for it, or use another --out")
    finally:
        first.kill()
        first.wait()
    folder = out / "baseline-seed0"
    files = {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "run.json")}
    again = subprocess.run(command(tmp_path, *args), env=environment(tmp_path), capture_output=True, text=True)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "already holds a run (run.json, checkpoint.pt, metrics.jsonl): --resume continues it" in again.stderr
    assert {name: (folder / name).read_bytes() for name in files} == files
    resumed = subprocess.run(command(tmp_path, *args, "--resume"), env=environment(tmp_path), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr  # the killed holder left no stale lock
    assert train_steps(folder / "metrics.jsonl") == list(range(1, 13))


def test_a_killed_compare_run_again_keeps_finished_runs_and_resumes_the_interrupted_one(tmp_path):
    args = ("--schedules", "baseline,vcycle", "--seeds", "0", "--no-tune", "--steps", "40", "--checkpoint-every", "2")
    straight = subprocess.run(command(tmp_path, *args, "--out", str(tmp_path / "straight"), subcommand="compare"),
                              env=environment(tmp_path), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "out"
    killed = subprocess.Popen(command(tmp_path, *args, "--out", str(out), subcommand="compare"),
                              env=environment(tmp_path, "sleep_in_transition:level1-coarsest"),
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        wait_for_announcement(killed, "sleep_in_transition:level1-coarsest")
    finally:
        killed.kill()
        killed.wait()
    baseline_metrics = (out / "baseline-seed0" / "metrics.jsonl").read_bytes()
    interrupted_at = load_checkpoint(str(out / "vcycle-seed0" / "checkpoint.pt"))["global_step"]
    assert interrupted_at > 0
    again = subprocess.run(command(tmp_path, *args, "--out", str(out), subcommand="compare"),
                           env=environment(tmp_path), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "baseline seed 0: 40 steps" in again.stdout and "(read back from its checkpoint)" in again.stdout
    assert (out / "baseline-seed0" / "metrics.jsonl").read_bytes() == baseline_metrics  # not retrained
    steps = train_steps(out / "vcycle-seed0" / "metrics.jsonl")
    assert steps == list(range(1, steps[-1] + 1))  # every step once: resumed, not restarted or mixed

    def losses(folder):
        return {row["schedule"]: row["final_val_loss"] for row in csv.DictReader(open(folder / "summary.csv"))}

    assert losses(out) == losses(tmp_path / "straight")
