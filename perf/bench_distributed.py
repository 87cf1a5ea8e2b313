"""Memory per rank at every transition, under DDP, FSDP2 (transitions gathered, or shard-local) and DeepSpeed
ZeRO-3: two torchrun processes on the CPU (gloo) train a GPT-2 (8 layers x 512) through the V-cycle, MSLT and
LiGO, and each rank measures its own RSS around every transition (gathered: the sharded model made whole, the
maps, the new model sharded again; shard-local: each rank building its shard of the new model, one parameter
at a time), around each stage's training and around the final checkpoint.  Peak: the process's high-water mark,
reset before each measured span (Linux ``/proc/self/clear_refs``); before: the RSS when the span starts.

Usage (from the repository root; about 13 minutes on 2 cores)::

    python perf/bench_distributed.py --out perf/results/distributed_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

from markdown_table import write_table

ENGINES = ("ddp", "fsdp-gather", "fsdp-shard-local", "zero3")
SCHEDULES = ("vcycle", "mslt", "ligo")
SIZE = {"layers": 8, "hidden": 512, "heads": 8, "intermediate": 2048}
TRAIN_ARGS = ["--model", "gpt2", "--vocab-size", "2048", "--steps", "24", "--batch-size", "2", "--seq-len", "64",
              "--eval-every", "24", "--eval-batches", "1", "--checkpoint-every", "0", "--threads", "1"]


def _memory_mib() -> dict[str, float]:
    """This process's current RSS and high-water mark (MiB), from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark becomes the current RSS


def _measured(spans: list, kind: str, describe):
    """Wrap a _ScheduleRun method so each call records (kind, what, RSS before, peak during)."""
    def wrap(method):
        def measured(self, *args, **kwargs):
            _reset_peak()
            before = _memory_mib()["VmRSS"]
            result = method(self, *args, **kwargs)
            spans.append({"kind": kind, "what": describe(self, *args, **kwargs), "before_mib": before,
                          "peak_mib": _memory_mib()["VmHWM"]})
            return result
        return measured
    return wrap


def worker(engine: str, schedule: str, out: str) -> None:
    """One rank: patch the loop to measure, then run ``growlib train`` under it."""
    from growlib import cli
    from growlib.train import loop

    spans: list[dict] = []
    run = loop._ScheduleRun
    run.transition_into = _measured(spans, "transition", lambda self, i: self.stages[i].name)(run.transition_into)
    run.train_stage = _measured(spans, "training", lambda self, i, first_step: self.stages[i].name)(run.train_stage)
    run.write_checkpoint = _measured(spans, "checkpoint", lambda self, i, step: f"step {self.global_step}")(
        run.write_checkpoint)
    size = os.path.join(out, f"size-rank{os.environ['RANK']}.json")
    with open(size, "w") as f:
        json.dump(SIZE, f)
    flags = {"ddp": [], "fsdp-gather": ["--fsdp", "--fsdp-transitions", "gather"],
             "fsdp-shard-local": ["--fsdp", "--fsdp-transitions", "shard-local"],
             "zero3": ["--deepspeed", os.path.join(out, "zero3.json")]}[engine]
    status = cli.main(["train", *TRAIN_ARGS, "--size", size, "--schedule", schedule, "--out",
                       os.path.join(out, f"{engine}-{schedule}"), *flags])
    if status:
        raise SystemExit(status)
    with open(os.path.join(out, f"{engine}-{schedule}-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(spans, f)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="markdown file to write")
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "SCHEDULE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help="a --size JSON instead of the default (to try it out small)")
    args = parser.parse_args(argv)
    if args.size:
        SIZE.update(json.loads(args.size))
    if args.worker:
        worker(*args.worker)
        return 0
    if not args.out:
        parser.error("--out is required")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "zero3.json"), "w") as f:
            json.dump({"zero_optimization": {"stage": 3}}, f)
        env = {**os.environ, "GROWLIB_CACHE": os.path.join(folder, "cache"), "OMP_NUM_THREADS": "1"}
        for schedule in SCHEDULES:
            for engine in ENGINES:
                done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                       "--master_port", str(_free_port()), __file__, "--worker", engine, schedule,
                                       folder, "--size", json.dumps(SIZE)], env=env, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{engine} {schedule} failed:\n{done.stderr[-3000:]}")
                results[(engine, schedule)] = [
                    json.load(open(os.path.join(folder, f"{engine}-{schedule}-rank{rank}.json"))) for rank in (0, 1)]
    lines = [f"Memory per rank, 2 torchrun processes on the CPU (gloo), GPT-2 {SIZE['layers']} layers x {SIZE['hidden']} "
             f"(~27M parameters: 107 MB of fp32 weights, 214 MB of AdamW state), 24 steps per schedule; "
             f"{platform.machine()}, {os.cpu_count()} CPUs.  Each span: the RSS when it starts and the peak during it "
             "(MiB, rank 0 / rank 1); +: the peak above the start.  DDP holds the whole model, gradients and "
             "optimizer on every rank; FSDP2 and ZeRO-3 hold half of each and checkpoint each rank's shards.  At a "
             "transition ZeRO-3 and fsdp-gather gather the model (FSDP2: and its optimizer state) whole on every "
             "rank; fsdp-shard-local builds each rank's shard of the new model one parameter at a time where the "
             "transition allows (the V-cycle's and MSLT's here: GPT-2's tied embeddings keep MSLT off its "
             "forward-only stack; LiGO's gather, as fsdp-gather does).", ""]
    for schedule in SCHEDULES:
        lines += [f"### {schedule}", "", "| span | " + " | ".join(ENGINES) + " |", "|---|" + "---|" * len(ENGINES)]
        spans = results[(ENGINES[0], schedule)][0]
        if any(len(results[(engine, schedule)][rank]) != len(spans) for engine in ENGINES for rank in (0, 1)):
            raise RuntimeError(f"{schedule}: the engines' runs measured different spans")
        for index, span in enumerate(spans):
            cells = []
            for engine in ENGINES:
                per_rank = [results[(engine, schedule)][rank][index] for rank in (0, 1)]
                cells.append(" / ".join(f"{s['before_mib']:.0f} -> {s['peak_mib']:.0f} (+{s['peak_mib'] - s['before_mib']:.0f})"
                                        for s in per_rank))
            lines.append(f"| {span['kind']} {span['what']} | " + " | ".join(cells) + " |")
        lines.append("")
    write_table(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
