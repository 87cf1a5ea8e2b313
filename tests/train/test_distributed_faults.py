"""Two CPU processes (gloo): a rank that dies or stalls makes the whole torchrun fail fast with a clear error
instead of hanging, and ranks whose models differ after a transition are caught, naming stage and tensor."""

from __future__ import annotations

import datetime
import inspect
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from growlib.schedules.protocol import RunState, Stage, Transition
from growlib.train.loop import run_schedule
from tests.factories import free_port, tiny_model
from tests.train.test_loop import CONFIG, EVAL, random_batch, trainable_count

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}


@pytest.mark.parametrize("fault,rank0_error", [
    ("exit_at_step:6:1", "Connection (reset|closed) by peer"),  # rank 1 crashes
    ("sleep_at_step:6:1", "Timed out waiting 4000ms"),  # rank 1 hangs: rank 0's collective times out
], ids=["dead rank", "stalled rank"])
@pytest.mark.distributed
def test_a_failing_rank_makes_torchrun_exit_nonzero_quickly(tmp_path, fault, rank0_error):
    corpus, size = tmp_path / "corpus.txt", tmp_path / "size.json"
    corpus.write_text(inspect.getsource(inspect))
    size.write_text(json.dumps(SIZE))
    port = free_port()
    # torchrun polls its workers every 0.1 s by default and stops the others as soon as one has failed: on a busy
    # machine that could kill rank 0 before it met the dead peer in a collective and said so.  Polling every 2 s
    # leaves rank 0 that time, still well inside the 60 s asserted below.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "--monitor-interval", "2", "-m", "growlib.cli", "train", "--size", str(size), "--data", str(corpus), "--vocab-size", "300",
               "--steps", "20", "--batch-size", "4", "--seq-len", "32", "--eval-every", "10", "--eval-batches", "2",
               "--schedule", "vcycle", "--out", str(tmp_path / "out")]
    env = {**os.environ, "GROWLIB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "GROWLIB_DIST_TIMEOUT_S": "4", "GROWLIB_FAULT_INJECT": fault}
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert elapsed < 60, f"torchrun took {elapsed:.0f} s to fail"
    assert f"growlib fault injection: {fault.split(':')[0]}:6 on rank 1" in output
    assert "growlib train: rank 0 of 2: a collective operation failed" in output, output[-3000:]
    assert re.search(rank0_error, output), output[-3000:]


def _train_with_ranks_that_diverge(rank: int, init_file: str) -> None:
    """Rank 1's transition swaps two weights (same sum and sum of squares): DDP would silently overwrite it
    with rank 0's model; the check after the transition must refuse."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=30))
    try:
        def grow(state):
            if rank == 1:
                with torch.no_grad():
                    weight = state.model.get_parameter("transformer.h.1.attn.c_attn.weight")
                    weight[0, :2] = weight[0, :2].flip(0).clone()
            return Transition(state.model)

        stages = [Stage("small", 2, lambda s: Transition(s.model)), Stage("grown", 2, grow)]
        run_schedule(stages, RunState(tiny_model("gpt2", layers=2)), CONFIG, train_batch=random_batch,
                     eval_batches=EVAL, step_flops=trainable_count)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_ranks_holding_different_models_after_a_transition_are_refused(tmp_path):
    with pytest.raises(torch.multiprocessing.ProcessRaisedException) as error:
        torch.multiprocessing.spawn(_train_with_ranks_that_diverge, args=(str(tmp_path / "init"),), nprocs=2)
    message = str(error.value)
    assert "RankDivergenceError: the ranks hold different models after the transition into stage 'grown'" in message
    assert "parameter 'transformer.h.1.attn.c_attn.weight'" in message


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf"])
def test_an_invalid_timeout_is_refused(monkeypatch, value):
    from growlib import cli

    monkeypatch.setenv("GROWLIB_DIST_TIMEOUT_S", value)
    with pytest.raises(cli.UsageError, match=f"GROWLIB_DIST_TIMEOUT_S must be a positive number of seconds, got '{value}'"):
        cli._distributed_timeout()


def test_the_timeout_defaults_to_ten_minutes_and_takes_seconds(monkeypatch):
    from growlib import cli

    monkeypatch.delenv("GROWLIB_DIST_TIMEOUT_S", raising=False)
    assert cli._distributed_timeout() == datetime.timedelta(minutes=10)
    monkeypatch.setenv("GROWLIB_DIST_TIMEOUT_S", "7.5")
    assert cli._distributed_timeout() == datetime.timedelta(seconds=7.5)
