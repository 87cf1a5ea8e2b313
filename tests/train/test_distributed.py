"""Two torchrun processes on the CPU (gloo) train a V-cycle through its transitions with DDP and with
DeepSpeed ZeRO stages 1 and 2, the engine rebuilt around each stage's model.  All three compute the same
averaged gradients, so their losses agree step for step."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from growlib.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.distributed

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}
STEPS = 40


def train(tmp_path, name: str, port: int, *extra: str) -> list[dict]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))
    size = tmp_path / "size.json"
    size.write_text(json.dumps(SIZE))
    out = tmp_path / name
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "growlib.cli", "train", "--model", "gpt2", "--size", str(size), "--data", str(corpus),
               "--vocab-size", "300", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
               "--eval-every", "10", "--eval-batches", "2", "--schedule", "vcycle", "--out", str(out), *extra]
    env = {**os.environ, "GROWLIB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final validation loss") == 1  # rank 0 alone reports
    records = [json.loads(line) for line in (out / "vcycle-seed0" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))  # rank 0 alone writes the metrics
    assert {r["stage"] for r in train_records} == {"level0-down", "level1-coarsest", "level0-up"}
    assert train_records[-1]["tokens"] == STEPS * 4 * 32 * 2  # both ranks' tokens
    return train_records


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    records = train(tmp_path, "out", 29517, "--checkpoint-every", str(STEPS))
    checkpoint = load_checkpoint(str(tmp_path / "out" / "vcycle-seed0" / "checkpoint.pt"))
    assert checkpoint["global_step"] == STEPS
    return records


def test_two_process_ddp_runs_a_vcycle_through_its_transitions(ddp_run):
    assert ddp_run[-1]["loss"] < ddp_run[0]["loss"]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_process_deepspeed_zero_matches_ddp(ddp_run, tmp_path, zero_stage):
    pytest.importorskip("deepspeed")
    config = tmp_path / "deepspeed.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}}))
    records = train(tmp_path, "out", 29520 + zero_stage, "--deepspeed", str(config))
    assert not (tmp_path / "out" / "vcycle-seed0" / "checkpoint.pt").exists()
    ddp_losses = [r["loss"] for r in ddp_run]
    assert [r["loss"] for r in records] == pytest.approx(ddp_losses, rel=1e-4)
    assert [r["flops"] for r in records] == [r["flops"] for r in ddp_run]
