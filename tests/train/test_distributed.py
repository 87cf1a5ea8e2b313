"""Two torchrun processes on the CPU (gloo) train through every transition with DDP, DeepSpeed ZeRO stages 1, 2
and 3, and FSDP2 (the engine rebuilt around each stage's model; a sharded model made whole again for each
transition and checkpoint).  All compute the same averaged gradients on the same batches, so their losses agree
step for step; a run whose rank is SIGKILLed mid-run resumes to exactly the uninterrupted run's losses."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from growlib.train.checkpoint import load_checkpoint
from tests.factories import free_port

pytestmark = pytest.mark.distributed

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}
STEPS = 40
#: the schedules run under FSDP and compared with DDP: every kind of transition (coalesce / de-coalesce +
#: interpolate, restrict / prolong, new layers on top with the bottom frozen and run forward-only, LiGO's fit)
FSDP_SCHEDULES = {"vcycle": [], "ode_multilevel": [], "ligo": [],
                  "mslt": ["--schedule-args", "frozen_forward=true", "freeze_embeddings=true"]}


def torchrun_train(tmp_path, name: str, schedule: str, *extra: str, env: dict | None = None,
                   background: bool = False):
    """``growlib train`` under ``torchrun --nproc_per_node 2``: the finished process, or the running one."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))
    size = tmp_path / "size.json"
    size.write_text(json.dumps(SIZE))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "growlib.cli", "train", "--model", "gpt2", "--size", str(size), "--data",
               str(corpus), "--vocab-size", "300", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
               "--eval-every", "10", "--eval-batches", "2", "--schedule", schedule, "--out", str(tmp_path / name),
               *extra]
    env = {**os.environ, "GROWLIB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **(env or {})}
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def records(tmp_path, name: str, schedule: str, kind: str = "train") -> list[dict]:
    lines = (tmp_path / name / f"{schedule}-seed0" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train(tmp_path, name: str, schedule: str = "vcycle", *extra: str, transitions: dict | None = None) -> list[dict]:
    """The run's training records; ``transitions`` (if given) receives {stage: how its transition ran} from
    what a sharded engine logs: "shard-local" or "gathered"."""
    done = torchrun_train(tmp_path, name, schedule, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    if transitions is not None:
        for line in (done.stdout + done.stderr).splitlines():
            if line.startswith("transition into stage "):
                stage, variant = line.removeprefix("transition into stage ").split(": ")
                transitions[stage.strip("'")] = variant.split()[0]
    assert done.stdout.count("final validation loss") == 1  # rank 0 alone reports
    train_records = records(tmp_path, name, schedule)
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))  # rank 0 alone writes the metrics
    assert train_records[-1]["tokens"] == STEPS * 4 * 32 * 2  # both ranks' tokens
    return train_records


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """DDP's training records of every schedule the sharded engines are compared on (and, under
    "<schedule>:eval", its evaluations)."""
    runs = {}
    for schedule, options in FSDP_SCHEDULES.items():
        tmp_path = tmp_path_factory.mktemp(f"ddp-{schedule}")
        runs[schedule] = train(tmp_path, "out", schedule, "--checkpoint-every", str(STEPS), *options)
        runs[f"{schedule}:eval"] = records(tmp_path, "out", schedule, "eval")
        checkpoint = load_checkpoint(str(tmp_path / "out" / f"{schedule}-seed0" / "checkpoint.pt"))
        assert checkpoint["global_step"] == STEPS
    return runs


@pytest.mark.parametrize("schedule", FSDP_SCHEDULES)
def test_two_process_ddp_logs_the_losses_of_one_process_accumulating_both_ranks_batches(ddp_runs, tmp_path,
                                                                                         schedule):
    """Rank r of 2 trains step s on micro-batch 2s + r; one process accumulating 2 micro-batches a step trains on
    the same ones, so the engines compared with DDP below are compared with one process too.  LiGO's fit at its
    transition draws batches by position, which one process and the ranks number differently: there the
    curves agree to 1e-3 (measured: 1.4e-4)."""
    from growlib.schedules import parse_options
    from growlib.train.config import TrainConfig
    from growlib.train.experiment import Experiment, run

    corpus, size = tmp_path / "corpus.txt", tmp_path / "size.json"
    corpus.write_text(inspect.getsource(inspect))
    size.write_text(json.dumps(SIZE))
    experiment = Experiment(family="gpt2", size=str(size), data=str(corpus), vocab_size=300, total_steps=STEPS,
                            cache_dir=str(tmp_path / "cache"), device="cpu",
                            config=TrainConfig(batch_size=4, grad_accum=2, seq_len=32, eval_every=10, eval_batches=2))
    options = parse_options(schedule, FSDP_SCHEDULES[schedule][1:])
    run(experiment, schedule, 0, options or None, out_dir=str(tmp_path / "one"))
    got = records(tmp_path, "one", schedule)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ddp_runs[schedule]]
    tolerance = 1e-3 if schedule == "ligo" else 1e-4
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ddp_runs[schedule]], rel=tolerance)


def test_two_process_ddp_runs_a_vcycle_through_its_transitions(ddp_runs):
    assert {r["stage"] for r in ddp_runs["vcycle"]} == {"level0-down", "level1-coarsest", "level0-up"}
    assert ddp_runs["vcycle"][-1]["loss"] < ddp_runs["vcycle"][0]["loss"]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_process_deepspeed_zero_matches_ddp(ddp_runs, tmp_path, zero_stage):
    pytest.importorskip("deepspeed")
    config = tmp_path / "deepspeed.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}}))
    got = train(tmp_path, "out", "vcycle", "--deepspeed", str(config))
    checkpoint = load_checkpoint(str(tmp_path / "out" / "vcycle-seed0" / "checkpoint.pt"))  # the final one
    assert checkpoint["global_step"] == STEPS and checkpoint["engine"]["tag"] == f"step{STEPS}"
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ddp_runs["vcycle"]], rel=1e-4)
    assert [r["flops"] for r in got] == [r["flops"] for r in ddp_runs["vcycle"]]


def engine_flags(tmp_path, engine: str) -> list[str]:
    """The command-line flags that pick ``engine``: fsdp, or zero<N> (DeepSpeed at that ZeRO stage)."""
    if engine == "fsdp":
        return ["--fsdp"]
    pytest.importorskip("deepspeed")
    config = tmp_path / "deepspeed.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": int(engine[-1])}}))
    return ["--deepspeed", str(config)]


def schedule_flags(schedule: str, engine: str) -> list[str]:
    """ZeRO-3 partitions the weights MSLT's fused frozen stack reads: there its frozen layers run as HF layers
    (the same function: measured within 1e-7 of the stack's losses)."""
    flags = FSDP_SCHEDULES[schedule]
    return [flag.replace("frozen_forward=true", "frozen_forward=false") for flag in flags] if engine == "zero3" \
        else flags


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
@pytest.mark.parametrize("schedule", FSDP_SCHEDULES)
def test_sharded_engines_match_ddp_through_every_transition(ddp_runs, tmp_path, schedule, engine):
    """FSDP2 builds each rank's shard of the new model in the V-cycle's and the ODE method's transitions and
    gathers the model for LiGO's and those of MSLT's forward-only stack; ZeRO-3 gathers it for every one."""
    transitions = {}
    got = train(tmp_path, "out", schedule, *engine_flags(tmp_path, engine), "--checkpoint-every", "20",
                *schedule_flags(schedule, engine), transitions=transitions)
    shard_local = engine == "fsdp" and schedule in ("vcycle", "ode_multilevel")
    stages = [r["stage"] for r in got]
    later_stages = sorted(set(stages) - {stages[0]})  # the first is built from the run's plain initial model
    assert {stage: transitions.get(stage) for stage in later_stages} == \
        {stage: "shard-local" if shard_local else "gathered" for stage in later_stages}
    expected = ddp_runs[schedule]
    assert [r["stage"] for r in got] == [r["stage"] for r in expected]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-4)
    assert [r["flops"] for r in got] == [r["flops"] for r in expected]
    evals = records(tmp_path, "out", schedule, "eval")
    assert [r["parameters"] for r in evals] == [r["parameters"] for r in ddp_runs[f"{schedule}:eval"]]
    checkpoint = load_checkpoint(str(tmp_path / "out" / f"{schedule}-seed0" / "checkpoint.pt"))
    assert checkpoint["global_step"] == STEPS and checkpoint["engine"]["tag"] == f"step{STEPS}"
    assert checkpoint["model"]["state"] is None and checkpoint["optimizer"] is None  # each rank wrote its shards


@pytest.mark.parametrize("engine,schedule", [("fsdp", "vcycle"), ("fsdp", "mslt"), ("zero2", "mslt"),
                                             ("zero3", "mslt")])
def test_a_run_whose_rank_is_killed_resumes_to_the_uninterrupted_losses(tmp_path, engine, schedule):
    """Killed in MSLT's second stage (under FSDP2 with its forward-only stack of whole layers), or in the
    V-cycle's coarse level, where the fine model it keeps for the way up is sharded too (left so by a shard-local
    transition) and checkpointed as shards."""
    options = (*engine_flags(tmp_path, engine), "--checkpoint-every", "10", *schedule_flags(schedule, engine))
    uninterrupted = train(tmp_path, "whole", schedule, *options)
    running = torchrun_train(tmp_path, "killed", schedule, *options, background=True,
                             env={"GROWLIB_FAULT_INJECT": "sleep_at_step:25:1", "GROWLIB_DIST_TIMEOUT_S": "4"})
    output, started = "", time.monotonic()
    while "fault injection: sleep_at_step:25 on rank 1" not in output:  # rank 1 waits before step 25
        line = running.stdout.readline()
        assert line or running.poll() is None, output[-3000:]
        output += line
        assert time.monotonic() - started < 300, output[-3000:]
    os.kill(int(output.rsplit("(pid ", 1)[1].split(")")[0]), signal.SIGKILL)
    output += running.communicate(timeout=120)[0]
    assert running.returncode != 0
    assert "rank 0 of 2: a collective operation failed" in output, output[-3000:]
    assert [r["step"] for r in records(tmp_path, "killed", schedule)][-1] == 24  # it got that far
    run_folder = tmp_path / "killed" / f"{schedule}-seed0"
    if schedule == "vcycle":  # the kept fine model is in the shards, not in growlib's checkpoint
        kept = load_checkpoint(str(run_folder / "checkpoint.pt"))["kept"]
        assert list(kept) == ["level0"] and kept["level0"]["state"] is None

    # a shard altered on disk: the resume is refused and changes nothing, the metrics log included
    metrics = run_folder / "metrics.jsonl"
    logged = metrics.read_bytes()
    shard = sorted((run_folder / "engine" / "step20").iterdir())[-1]
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    refused = torchrun_train(tmp_path, "killed", schedule, *options, "--resume")
    assert refused.returncode != 0 and f"{shard.name} is corrupted" in refused.stdout + refused.stderr
    assert metrics.read_bytes() == logged
    shard.write_bytes(intact)

    # the V-cycle resumes gathering its transitions: the restored sharded fine model takes the gathered coarse one
    switched = ("--fsdp-transitions", "gather") if schedule == "vcycle" else ()
    resumed = train(tmp_path, "killed", schedule, *options, *switched, "--resume")
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in uninterrupted]

    def evaluations(name):
        return [(r["step"], r["flops"], r["val_loss"]) for r in records(tmp_path, name, schedule, "eval")]

    assert evaluations("killed") == evaluations("whole")
    engine_folder = run_folder / "engine"  # only the last checkpoint's shards are kept
    assert os.listdir(engine_folder / f"step{STEPS}") and not (engine_folder / "step20").exists()


@pytest.mark.parametrize("schedule", ["vcycle", "mslt", "stack"])
def test_fsdp_shard_local_transitions_train_the_gathered_transitions_models_bit_for_bit(tmp_path, schedule):
    """Each rank building its shard of the new model (coalesce, de-coalesce + interpolate; MSLT's layers added
    on top, the bottom frozen, then all unfrozen: GPT-2's tied embeddings keep MSLT off its forward-only stack)
    computes what gathering the model whole computes: the two runs log the same losses, FLOPs and evaluations
    exactly."""
    ran_gathered, ran_shard_local = {}, {}
    gathered = train(tmp_path, "gather", schedule, "--fsdp", "--fsdp-transitions", "gather", transitions=ran_gathered)
    shard_local = train(tmp_path, "local", schedule, "--fsdp", "--fsdp-transitions", "shard-local",
                        transitions=ran_shard_local)
    later_stages = sorted({r["stage"] for r in gathered} - {gathered[0]["stage"]})
    assert ran_gathered == {stage: "gathered" for stage in later_stages}
    assert {stage: ran_shard_local[stage] for stage in later_stages} == {stage: "shard-local" for stage in later_stages}
    assert [(r["stage"], r["loss"], r["flops"]) for r in shard_local] == \
        [(r["stage"], r["loss"], r["flops"]) for r in gathered]

    def evaluations(name):
        return [(r["step"], r["val_loss"], r["parameters"]) for r in records(tmp_path, name, schedule, "eval")]

    assert evaluations("local") == evaluations("gather")


def test_fsdp_maps_the_optimizer_state_through_transitions_as_ddp_does(tmp_path):
    """optimizer_policy=map reads AdamW's moments whole at every transition: FSDP gathers them, maps them and
    loads the result into the new stage's sharded optimizer."""
    options = ("--schedule-args", "optimizer_policy=map")
    expected = train(tmp_path, "ddp", "vcycle", *options)
    got = train(tmp_path, "fsdp", "vcycle", "--fsdp", *options)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-4)
