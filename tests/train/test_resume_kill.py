"""A real training subprocess killed with SIGKILL and resumed reproduces the uninterrupted run exactly (CPU)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pytest

SIZE = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128}


def train_command(tmp_path, out, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(inspect.getsource(inspect) * 3)
    size = tmp_path / "size.json"
    size.write_text(json.dumps(SIZE))
    return [sys.executable, "-m", "growlib.cli", "train", "--model", "gpt2", "--size", str(size),
            "--data", str(corpus), "--vocab-size", "300", "--steps", "400", "--batch-size", "8", "--seq-len", "64",
            "--eval-every", "50", "--eval-batches", "2", "--schedule", "vcycle", "--checkpoint-every", "25",
            "--out", str(out), *extra]


def train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {}
    for r in records:
        if r["kind"] == "train":
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    return losses


def last_step(metrics) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines[:-1]]  # the last line may be half written
    return max(steps, default=0)


def test_sigkilled_run_resumes_to_the_same_losses(tmp_path):
    env = {**os.environ, "GROWLIB_CACHE": str(tmp_path / "cache")}
    straight = tmp_path / "straight"
    subprocess.run(train_command(tmp_path, straight), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(tmp_path, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = killed / "vcycle-seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while last_step(metrics) < 110 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if process.poll() is not None:
        pytest.fail("the training process ended before it could be killed")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last_step(metrics) < 400
    assert (killed / "vcycle-seed0" / "checkpoint.pt").exists()

    subprocess.run(train_command(tmp_path, killed, "--resume"), check=True, env=env, capture_output=True,
                   timeout=600)
    expected = train_losses(straight / "vcycle-seed0")
    assert sorted(expected) == list(range(1, 401))
    assert train_losses(killed / "vcycle-seed0") == expected
