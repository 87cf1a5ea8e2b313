"""DDP on the CPU: two torchrun processes (gloo) train a schedule through its transitions, DDP rebuilt around
each stage's model."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import torch

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}


def test_two_process_ddp_runs_a_vcycle_through_its_transitions(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))
    size = tmp_path / "size.json"
    size.write_text(json.dumps(SIZE))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "growlib.cli", "train", "--model", "gpt2", "--size", str(size), "--data", str(corpus),
               "--vocab-size", "300", "--steps", "40", "--batch-size", "4", "--seq-len", "32", "--eval-every", "10",
               "--eval-batches", "2", "--schedule", "vcycle", "--checkpoint-every", "40", "--out", str(out)]
    env = {**os.environ, "GROWLIB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "vcycle-seed0" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 41))  # rank 0 alone writes the metrics
    assert {r["stage"] for r in train} == {"level0-down", "level1-coarsest", "level0-up"}
    assert train[-1]["tokens"] == 40 * 4 * 32 * 2  # both ranks' tokens
    checkpoint = torch.load(out / "vcycle-seed0" / "checkpoint.pt", weights_only=True)
    assert checkpoint["global_step"] == 40
