"""A real ``growlib train`` process SIGKILLed again and again -- at points a seeded RNG picks, including inside a
level transition and halfway through a checkpoint write -- and resumed each time ends with exactly the
uninterrupted run's model, losses and evaluations (CPU).  After every kill, every checkpoint on disk loads.

The deterministic kill points use the test-only hook GROWLIB_FAULT_INJECT (growlib/train/faults.py): the
process announces on stderr that it sleeps there, and is killed then.  One kill is asynchronous (wherever the
process happens to be once it has logged a chosen step)."""

from __future__ import annotations

import inspect
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time

import pytest
import torch

from growlib.schedules import build_schedule
from growlib.train.checkpoint import load_checkpoint
from tests.factories import subprocess_environment as environment

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}
STEPS, CHECKPOINT_EVERY = 80, 10
STAGES = build_schedule("vcycle", STEPS, SIZE["layers"])  # level0-down 4, level1-coarsest 40, level0-up 36


def train_command(tmp_path, out, *extra):
    corpus, size = tmp_path / "corpus.txt", tmp_path / "size.json"
    if not corpus.exists():
        corpus.write_text(inspect.getsource(inspect))
        size.write_text(json.dumps(SIZE))
    return [sys.executable, "-m", "growlib.cli", "train", "--model", "gpt2", "--size", str(size),
            "--data", str(corpus), "--vocab-size", "300", "--steps", str(STEPS), "--batch-size", "4",
            "--seq-len", "32", "--eval-every", "20", "--eval-batches", "2", "--schedule", "vcycle",
            "--checkpoint-every", str(CHECKPOINT_EVERY), "--out", str(out), *extra]


def stage_start(name: str) -> int:
    """The number of steps done when the transition into stage ``name`` runs."""
    names = [s.name for s in STAGES]
    return sum(s.steps for s in STAGES[:names.index(name)])


def kill_plan(seed: int) -> tuple[int, list[tuple[int, str, str]]]:
    """The kills, in the order the run reaches them.  First an asynchronous kill of the fresh run, wherever it
    is once it has logged step ``logged`` (it sleeps before step logged + 2 at the latest, so it cannot run
    away); then, each after a resume, (steps done, fault to inject, kind) for a kill inside a level
    transition, halfway through a checkpoint write and before a step, all past the first kill."""
    rng = random.Random(seed)
    logged = rng.randint(2, 30)
    transition = rng.choice([s.name for s in STAGES[1:] if stage_start(s.name) >= logged + 2])
    write = rng.choice([w for w in range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY) if w >= logged + 2])
    taken = {stage_start(transition), write}
    step_done = rng.choice([p for p in range(logged + 2, STEPS - 1) if p not in taken])
    return logged, sorted([
        (stage_start(transition), f"sleep_in_transition:{transition}", "transition"),
        (write, f"sleep_in_checkpoint_write:{write}", "checkpoint write"),
        (step_done, f"sleep_at_step:{step_done + 1}", "before a step"),
    ])


def logged_steps(metrics) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines[:-1]), default=0)  # the last line may be half written


def run_until_killed(command, env, run_dir, announced: str | None, logged: int | None) -> None:
    """Start the run, wait until it sleeps at its injected fault (``announced`` on stderr) or has logged step
    ``logged``, then SIGKILL it."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        if announced is not None:
            selector = selectors.DefaultSelector()
            selector.register(process.stderr, selectors.EVENT_READ)
            stderr = b""
            while f"growlib fault injection: {announced}".encode() not in stderr:
                assert time.monotonic() < deadline, f"never reached {announced}: {stderr.decode()[-2000:]}"
                if selector.select(timeout=1.0):
                    chunk = os.read(process.stderr.fileno(), 65536)
                    assert chunk, f"the run ended before reaching {announced}: {stderr.decode()[-2000:]}"
                    stderr += chunk
        else:
            while logged_steps(run_dir / "metrics.jsonl") < logged:
                assert process.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.002)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()


def checkpoints_on_disk_all_load(run_dir) -> dict | None:
    """Load every checkpoint file; return the run's own checkpoint (None before the first one)."""
    loaded = {path.name: load_checkpoint(str(path)) for path in run_dir.glob("*.pt")}
    return loaded.get("checkpoint.pt")


def train_records(run_dir) -> tuple[dict[int, float], dict[int, float]]:
    losses, evals = {}, {}
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        target = losses if record["kind"] == "train" else evals
        assert record["step"] not in target, f"{record['kind']} step {record['step']} logged twice"
        target[record["step"]] = record["loss" if record["kind"] == "train" else "val_loss"]
    return losses, evals


@pytest.mark.subprocess
@pytest.mark.parametrize("seed", [2024])
def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_model(tmp_path, seed):
    straight = tmp_path / "straight"
    subprocess.run(train_command(tmp_path, straight), check=True, env=environment(tmp_path),
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    run_dir = killed / "vcycle-seed0"
    logged, plan = kill_plan(seed)

    run_until_killed(train_command(tmp_path, killed), environment(tmp_path, f"sleep_at_step:{logged + 2}"),
                     run_dir, announced=None, logged=logged)
    checkpoint = checkpoints_on_disk_all_load(run_dir)
    assert (checkpoint["global_step"] if checkpoint else 0) <= logged + 1

    for index, (steps_done, fault, kind) in enumerate(plan):
        flag = "--resume" if index or checkpoint else "--overwrite"  # killed before its first checkpoint: start over
        run_until_killed(train_command(tmp_path, killed, flag), environment(tmp_path, fault), run_dir,
                         announced=fault, logged=None)
        last = checkpoints_on_disk_all_load(run_dir)["global_step"]
        assert last <= steps_done
        if kind == "checkpoint write":  # killed halfway: the half-written temporary file never loads
            partial = list(run_dir.glob("checkpoint.pt.tmp-*"))
            assert len(partial) == 1
            with pytest.raises(ValueError, match="truncated"):
                load_checkpoint(str(partial[0]))
            assert last == steps_done - CHECKPOINT_EVERY  # the previous checkpoint is intact

    subprocess.run(train_command(tmp_path, killed, "--resume"), check=True, env=environment(tmp_path),
                   capture_output=True, timeout=300)
    # no temporary file left behind
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt", "metrics.jsonl", "model", "run.json"]
    expected, resumed = (load_checkpoint(str(d / "vcycle-seed0" / "checkpoint.pt")) for d in (straight, killed))
    assert expected["global_step"] == resumed["global_step"] == STEPS
    assert expected["model"]["state"].keys() == resumed["model"]["state"].keys()
    for name, tensor in expected["model"]["state"].items():
        assert torch.equal(tensor, resumed["model"]["state"][name]), name
    assert train_records(run_dir) == train_records(straight / "vcycle-seed0")
    assert sorted(train_records(run_dir)[0]) == list(range(1, STEPS + 1))
