"""End-to-end row of growlib's GPU proof run: every schedule's stages trained at GPT-2 small (124M) scale, and
every transition between them timed on that model.

Usage (from the repository root)::

    python perf/bench_end_to_end.py --out DIR [--time-limit SECONDS]   # CUDA GPU: GPT-2 small
    python perf/bench_end_to_end.py --out DIR --smoke                   # CPU: a tiny GPT-2, same code path

Writes ``DIR/end_to_end.csv``, one row per measurement, appended as soon as it is measured (an interrupted run
keeps its rows), each with the environment of ``common.environment_row()``, whose ``mode`` column says gpu or
smoke.  The last stdout line is the ``key:`` summary perf/gpu_run.sh collects.  Exits 0 when something was
measured, 1 with a message when nothing was, and 2 without printing a number when there is no CUDA GPU (or
under TRITON_INTERPRET) and ``--smoke`` is not given.

What is measured, on random tokens (8 sequences x 512 tokens a step, vocabulary 50257; nothing downloaded):

* ``stage`` rows: for each schedule (baseline, vcycle, ode_multilevel, mslt, stack, msg, ligo), every stage
  of it, trained by growlib's own ``run_schedule`` with the schedule's own transitions between the stages.
  The stages come from ``build_schedule(name, 1000, 12)`` (so the fractions, ramps and freezing are the
  schedule's defaults at a 1000-step budget; LiGO fits its operator for 2 steps there, a fit step being
  timed on its own below), and each stage is then cut to 3 warm-up + 24 measured optimizer steps.  The steps are timed
  through ``run_schedule``'s ``progress`` callback, which synchronises CUDA, so a step's time is everything
  the loop does for it (forward, backward, clipping and the non-finite check, the AdamW step).  MSG's masks
  are still ramping during the measured steps (its ramp is 20% of a stage of ~333 steps).
* ``transition`` rows: each operator the schedules transition with, on GPT-2 small: coalesce and
  de-coalesce + interpolate (vcycle), restrict and prolong (ode_multilevel), grow 6 -> 12 layers by
  ``copy_top`` (mslt) and ``stack`` (stack, msg), and one LiGO fit step (expansion + forward + backward +
  AdamW step of the operator growing 6 -> 12 layers).  The first call is reported apart (``first_call_ms``:
  Triton JIT or cache load, model construction); then 3 timed calls.  A map transition's time includes
  building its output model, as the schedules do.  FLOPs are growlib's own counts: ``counting_map_flops``
  for the maps, ``step_flops`` + ``LiGO.flops_per_expansion(backward=True)`` for a fit step (what the ligo
  schedule charges).

Precision, as growlib's trainer runs on a GPU: fp32 weights with bf16 autocast and fused AdamW for the stages
(``precision`` = float32+autocast_bf16); the maps run on those fp32 weights (Triton structured-map kernels);
LiGO's fit runs in fp32 without autocast (its Kronecker kernels with 3xTF32 dots), as ``LiGO.fit`` does.
``frac_matmul_ceiling`` puts a stage's model FLOP/s against the GPU's bf16 matmul ceiling.

``--time-limit``: the seconds from the start of the process (imports included: ``common.Deadline``) that the
benchmark may take.  A measurement starts only when the longest one of its kind so far (a
schedule's run, a transition) fits in what is left, else it is written as skipped; a schedule still training
past the limit stops at its next step (its finished stages keep their rows), and LiGO's fit at its next fit
step.  What cannot be cut is one map transition, or LiGO's operator construction and first (JIT) fit step:
pass a limit a few seconds below the hard budget.

Time on an H200, estimated (not measured: this was written on machines without a GPU), about 40-70 s, the
upper end with a cold Triton cache: imports and CUDA start 8-12 s; the copy and matmul ceilings ~2 s; the 18
stages x 27 steps, ~14 full-model step equivalents (growlib counts 3.27 TFLOP for one GPT-2 small step of
8 x 512 tokens) at an estimated 20-40 ms a full step, 8-15 s; ~50 GPT-2 constructions (each schedule's start,
its transitions' new models, the timed transitions' calls) at 0.1-0.2 s, 5-10 s; Triton JIT of the
structured-map variants, 3-6 s, and of LiGO's fp32 GEMM tiles (forward and backward), 5-15 s; LiGO's operator
(256M coefficients, growing 6 -> 12 layers at full width) built twice, 2-4 s, and 6 fit steps of ~1.7 TFLOP
of fp32 expansion plus a 3.27 TFLOP fp32 forward + backward each, ~0.2 s a step.  If the first GPU run takes
longer, lower ``GPU_SETUP.measured_steps`` first: stage steps are the part that scales.

``--smoke``: the same code path on the CPU (TRITON_INTERPRET=1 is set before growlib is imported; growlib's
auto policy picks its PyTorch reference for CPU tensors) with a 4-layer, 64-wide GPT-2, 1 warm-up + 2 measured
steps per stage and 1 timed call per transition, on one CPU thread.  Its rows are labelled mode=smoke and are no speed claims.
"""

from __future__ import annotations

import os
import sys
import time

if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before growlib's @triton.jit decorators run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import growlib  # noqa: E402
from growlib.apply import counting_map_flops  # noqa: E402
from growlib.kernels.launch import recorded as launch_records  # noqa: E402
from growlib.kernels.launch import summarize as summarize_launches  # noqa: E402
from growlib.models import adapter_for  # noqa: E402
from growlib.kernels.backend import resolve_backend  # noqa: E402
from growlib.schedules import SCHEDULES, build_schedule  # noqa: E402
from growlib.schedules.multilevel import vcycle  # noqa: E402
from growlib.schedules.progressive import ligo  # noqa: E402
from growlib.train.flops import step_flops  # noqa: E402
from growlib.schedules.protocol import RunState, Stage  # noqa: E402
from growlib.train.config import TrainConfig  # noqa: E402
from growlib.train.loop import run_schedule  # noqa: E402
from growlib.train.sizes import build_model, parse_size  # noqa: E402

from common import (Deadline, add_benchmark_arguments, append_csv, fraction, print_key, print_table,  # noqa: E402
                    start_benchmark, synchronize)

CSV_NAME = "end_to_end.csv"
#: The budget the schedules' stage fractions are taken of, before every stage is cut to the measured steps.
SCHEDULE_BUDGET = 1000
#: Options that keep a schedule's run short without changing what its stages train: LiGO's fit is timed as a
#: transition of its own, so inside the schedule it fits 2 steps (``LiGO.fit(steps=1)`` divides by zero in its
#: learning-rate decay, growlib/operators/ligo.py).
SCHEDULE_OPTIONS = {"ligo": {"fit_steps": 2}}
#: The transitions each schedule makes, measured on their own.
TRANSITIONS = {
    "vcycle": ("coalesce", "decoalesce_interpolate"),
    "ode_multilevel": ("restrict", "prolong"),
    "mslt": ("grow_copy_top",),
    "stack": ("grow_stack",),
    "msg": ("grow_stack",),
    "ligo": ("ligo_fit_step",),
}
COLUMNS = ("mode", "measurement", "schedule", "name", "detail", "layers", "hidden", "parameters",
           "trainable_parameters", "batch", "seq_len", "precision", "backend", "warmup", "repeats", "median_ms",
           "p20_ms", "p80_ms", "first_call_ms", "tokens_per_s", "flops", "tflops", "frac_matmul_ceiling",
           "triton_launches", "error")
POOL = 4  # distinct random batches, cycled through


@dataclass(frozen=True)
class Setup:
    """The model, data and step counts of a GPU run or a smoke run."""

    size: str | dict  # growlib.train.sizes: layers, hidden, heads, intermediate
    vocab: int
    positions: int
    batch: int
    seq_len: int
    warmup_steps: int  # per stage, not timed (>= 1: the first step's interval holds the transition)
    measured_steps: int  # per stage, timed
    repeats: int  # timed calls per transition, after the first


GPU_SETUP = Setup("base", vocab=50257, positions=1024, batch=8, seq_len=512, warmup_steps=3,
                  measured_steps=24, repeats=3)
SMOKE_SETUP = Setup({"layers": 4, "hidden": 64, "heads": 4, "intermediate": 256}, vocab=512,
                    positions=64, batch=2, seq_len=32, warmup_steps=1, measured_steps=2, repeats=1)


class OutOfTime(Exception):
    """--time-limit passed while a schedule was training or LiGO fitting."""


def schedule_default(builder: Callable, option: str):
    """A schedule's default for ``option``, so the transitions timed alone run as the schedule runs them."""
    return inspect.signature(builder).parameters[option].default


def shape_of(model: torch.nn.Module) -> str:
    dims = growlib.schema_of(model).dims
    return f"{dims['layers']}x{dims['model']}"


def model_facts(model: torch.nn.Module) -> dict:
    dims = growlib.schema_of(model).dims
    params = list(model.parameters())
    return {"layers": dims["layers"], "hidden": dims["model"], "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}


def frozen_layers(model: torch.nn.Module) -> list[int]:
    """Layers none of whose tensors is trained."""
    schema = growlib.schema_of(model)
    layers = {s.layer for s in schema.specs if s.layer is not None}
    trained = {s.layer for s in schema.specs if s.layer is not None and model.get_parameter(s.source).requires_grad}
    return sorted(layers - trained)


def quantiles_ms(seconds: list[float]) -> dict:
    median, p20, p80 = np.percentile(np.array(seconds) * 1e3, [50, 20, 80])
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80)}


class Bench:
    """One run: the setup, its random batches, the CSV and the time limit."""

    def __init__(self, setup: Setup, device: torch.device, csv_path: Path, environment: dict, ceilings: dict,
                 log: Callable[[str], None], deadline: Deadline):
        self.setup, self.device, self.csv_path, self.log, self.deadline = setup, device, csv_path, log, deadline
        self.constant = {**ceilings, **environment}  # the environment holds the mode
        self.layers = parse_size(setup.size)["layers"]
        self.tokens_per_step = setup.batch * setup.seq_len
        self.longest: dict[str, float] = {}  # measurement kind -> longest seconds one took so far
        self.rows: list[dict] = []
        self.measured = 0
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(setup.vocab, (POOL, setup.batch, setup.seq_len), generator=generator)
        self.batches = [{"input_ids": ids[i].to(self.device), "labels": ids[i].to(self.device)} for i in range(POOL)]

    # -- building blocks -----------------------------------------------------------------------------------
    def batch(self, step: int) -> dict:
        return self.batches[step % POOL]

    def sync(self) -> None:
        synchronize(self.device)

    def model(self, layers: int | None = None) -> torch.nn.Module:
        """A freshly initialised GPT-2 of the setup's size (``layers`` deep), built on the device."""
        size = {**parse_size(self.setup.size), **({"layers": layers} if layers else {})}
        torch.manual_seed(0)
        with torch.device(self.device):
            return build_model("gpt2", size, self.setup.vocab, self.setup.positions).train()

    def flops_of_step(self, model: torch.nn.Module) -> float:
        """One optimizer step's FLOPs for ``model`` as currently frozen (growlib's count)."""
        return float(step_flops(model, self.setup.batch, self.setup.seq_len).total)

    def write(self, row: dict) -> None:
        """Append one row to the CSV at once (an interrupted run keeps it)."""
        full = {**dict.fromkeys(COLUMNS), "batch": self.setup.batch, "seq_len": self.setup.seq_len,
                "backend": resolve_backend(self.device), **row, **self.constant}
        append_csv(self.csv_path, [full])
        self.rows.append(full)
        if not full["error"]:
            self.measured += 1

    # -- the time limit ------------------------------------------------------------------------------------
    def may_start(self, kind: str, schedule: str, name: str) -> bool:
        """Whether the longest ``kind`` measurement so far still fits in the time limit; if not, the
        measurement is written as skipped."""
        estimate = self.longest.get(kind, 0.0)
        if self.deadline.allows(estimate) and self.deadline.left() > 0:
            return True
        what = f"{schedule} {name or 'stages'}"
        refusal = self.deadline.refusal(what, estimate)
        self.write({"measurement": kind, "schedule": schedule, "name": name, "error": refusal})
        self.log(refusal)
        return False

    def check_time(self) -> None:
        if self.deadline.left() < 0:
            raise OutOfTime("--time-limit passed")

    def run(self, kind: str, schedule: str, name: str, measure: Callable[[], None]) -> None:
        """Run one measurement; a failure becomes a row with its error (and a traceback on stderr), a run the
        time limit cut short a skipped row."""
        started, what = time.monotonic(), f"{schedule} {name or 'stages'}"
        try:
            measure()
        except OutOfTime:  # its finished rows stay; what was cut is written as skipped
            self.write({"measurement": kind, "schedule": schedule, "name": name,
                        "error": f"skipped: {what} stopped when --time-limit passed"})
            self.log(f"stopped {what}: --time-limit passed")
        except Exception as error:  # record it and go on: one broken measurement must not lose the others
            traceback.print_exc()
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            self.write({"measurement": kind, "schedule": schedule, "name": name, "error": message[:300]})
            self.log(f"{what} failed: {message}")
        finally:
            self.longest[kind] = max(self.longest.get(kind, 0.0), time.monotonic() - started)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------

class StageMeter:
    """Times the optimizer steps ``run_schedule`` reports through its ``progress`` callback (after a CUDA
    synchronisation) and writes a stage's row as soon as its measured steps are done.

    ``run_schedule`` calls ``step_flops`` with each stage's model, entered and frozen, just before the stage's
    first step: that is where the stage's shape, trainable parameters and FLOPs per step are read."""

    def __init__(self, bench: Bench, schedule: str, stages: list[Stage], launches: list[dict]):
        self.bench, self.schedule, self.launches = bench, schedule, launches
        self.stages = {stage.name: stage for stage in stages}
        self.stage: str | None = None
        self.step_ends: list[float] = []
        self.entered: dict = {}  # facts of the model the loop is about to train
        self.facts: dict = {}  # facts of the stage being timed
        self.first_measured_launch = 0

    def step_flops(self, model: torch.nn.Module) -> float:
        flops = self.bench.flops_of_step(model)
        frozen = frozen_layers(model)
        self.entered = {**model_facts(model), "flops": flops, "frozen": frozen}
        return flops

    def progress(self, record: dict) -> None:
        self.bench.sync()
        now = time.perf_counter()
        setup = self.bench.setup
        if record["stage"] != self.stage:
            self.stage, self.step_ends, self.facts = record["stage"], [], self.entered
        self.step_ends.append(now)
        if len(self.step_ends) == setup.warmup_steps:
            self.first_measured_launch = len(self.launches)
        if len(self.step_ends) == setup.warmup_steps + setup.measured_steps:
            self.write_row()
        self.bench.check_time()

    def write_row(self) -> None:
        bench, setup, facts = self.bench, self.bench.setup, self.facts
        step_seconds = np.diff(self.step_ends[setup.warmup_steps - 1:]).tolist()
        seconds = sum(step_seconds)
        detail = f"{facts['layers']}x{facts['hidden']}"
        if facts["frozen"]:
            detail += f", layers {facts['frozen'][0]}-{facts['frozen'][-1]} frozen"
        if self.stages[self.stage].before_step is not None:
            detail += ", new layers masked"
        tokens_per_s = bench.tokens_per_step * len(step_seconds) / seconds
        tflops = facts["flops"] * len(step_seconds) / seconds / 1e12
        bench.write({
            "measurement": "stage", "schedule": self.schedule, "name": self.stage, "detail": detail,
            **{k: facts[k] for k in ("layers", "hidden", "parameters", "trainable_parameters")},
            "precision": "float32+autocast_bf16" if bench.device.type == "cuda" else "float32",
            "warmup": setup.warmup_steps, "repeats": len(step_seconds), **quantiles_ms(step_seconds),
            "tokens_per_s": tokens_per_s, "flops": facts["flops"],
            "tflops": tflops, "frac_matmul_ceiling": fraction(tflops, bench.constant["matmul_ceiling_tflops"]),
            "triton_launches": summarize_launches(self.launches[self.first_measured_launch:]),
        })
        bench.log(f"{self.schedule} {self.stage} ({detail}): {tokens_per_s:,.0f} tokens/s")


def measure_stages(bench: Bench, schedule: str) -> None:
    """Train ``schedule`` through growlib's loop, every stage cut to the warm-up + measured steps."""
    setup = bench.setup
    steps = setup.warmup_steps + setup.measured_steps
    stages = [dataclasses.replace(stage, steps=steps)
              for stage in build_schedule(schedule, SCHEDULE_BUDGET, bench.layers,
                                          **SCHEDULE_OPTIONS.get(schedule, {}))]
    config = TrainConfig(lr=3e-4, batch_size=setup.batch, seq_len=setup.seq_len, eval_every=10 ** 9,
                         eval_batches=1)
    with launch_records() as launches:
        meter = StageMeter(bench, schedule, stages, launches)
        run_schedule(stages, RunState(bench.model()), config, train_batch=bench.batch,
                     eval_batches=[bench.batch(0)], step_flops=meter.step_flops, progress=meter.progress,
                     schedule_name=schedule)


# ----------------------------------------------------------------------------------------------------------
# Transitions
# ----------------------------------------------------------------------------------------------------------

def map_transition(bench: Bench, name: str) -> tuple[torch.nn.Module, Callable[[], torch.nn.Module], str]:
    """(the model a transition reads, the transition as a call returning the model it writes, a note), with
    the operators and arguments the schedules use at the setup's depth L."""
    layers = bench.layers
    if name == "coalesce":
        fine = bench.model()
        return fine, lambda: growlib.coalesce(fine), ""
    if name == "decoalesce_interpolate":
        fine = bench.model()
        coarse = growlib.coalesce(fine)
        alpha = schedule_default(vcycle, "alpha")
        return coarse, lambda: growlib.interpolate_(fine, coarse, alpha), f"alpha {alpha}, in place"
    if name == "restrict":
        fine = bench.model()
        return fine, lambda: growlib.restrict(fine, parity="even"), "even layers"
    if name == "prolong":
        fine = bench.model()
        coarse = growlib.restrict(fine, parity="even")
        return coarse, lambda: growlib.prolong_(fine, coarse, parity="even"), "even layers, in place"
    if name in ("grow_stack", "grow_copy_top"):
        method = name.removeprefix("grow_")
        small = bench.model(layers // 2)
        return small, lambda: growlib.grow_depth(small, layers, method), ""
    raise ValueError(f"unknown transition {name!r}")


def measure_map_transition(bench: Bench, schedule: str, name: str) -> None:
    source, transition, note = map_transition(bench, name)
    bench.sync()
    started = time.perf_counter()
    with counting_map_flops() as maps, launch_records() as launches:
        result = transition()
        bench.sync()
    first_call = time.perf_counter() - started
    seconds = []
    for _ in range(bench.setup.repeats):
        bench.sync()
        started = time.perf_counter()
        transition()
        bench.sync()
        seconds.append(time.perf_counter() - started)
    detail = f"{shape_of(source)} -> {shape_of(result)}" + (f", {note}" if note else "")
    stats = quantiles_ms(seconds)
    bench.write({
        "measurement": "transition", "schedule": schedule, "name": name, "detail": detail, **model_facts(result),
        "trainable_parameters": None, "precision": "float32", "repeats": len(seconds), **stats,
        "first_call_ms": first_call * 1e3, "flops": maps.flops, "tflops": maps.flops / stats["median_ms"] / 1e9,
        "triton_launches": summarize_launches(launches),
    })
    bench.log(f"{schedule} {name} ({detail}): {stats['median_ms']:.2f} ms (first call {first_call * 1e3:.0f} ms)")


def measure_transition(bench: Bench, schedule: str, name: str) -> None:
    if name == "ligo_fit_step":
        measure_ligo_fit_step(bench, schedule)
    else:
        measure_map_transition(bench, schedule, name)


def measure_ligo_fit_step(bench: Bench, schedule: str) -> None:
    """Fit the ligo schedule's operator (half the depth -> the full depth, full width) for 1 + repeats steps;
    a global optimizer-step hook stamps the end of each step, so every interval after the first is exactly
    one fit step: expansion, forward and backward of the large model, clipping, the AdamW step."""
    small = bench.model(bench.layers // 2)
    adapter = adapter_for(small)
    target_config = adapter.config_at(small.config, {**adapter.dims(small.config), "layers": bench.layers})
    operator = growlib.LiGO(small, target_config)
    step_ends: list[float] = []

    def stamp(optimizer, args, kwargs):
        bench.sync()
        step_ends.append(time.perf_counter())
        bench.check_time()

    hook = register_optimizer_step_post_hook(stamp)
    try:
        bench.sync()
        started = time.perf_counter()
        with launch_records() as launches:
            operator.fit(bench.batches, steps=1 + bench.setup.repeats, lr=schedule_default(ligo, "fit_lr"))
    finally:
        hook.remove()
    seconds = np.diff(step_ends).tolist()
    large = operator.materialize()
    flops = bench.flops_of_step(large) + operator.flops_per_expansion(backward=True)
    stats = quantiles_ms(seconds)
    coefficients = sum(p.numel() for p in operator.parameters())
    detail = f"{shape_of(small)} -> {shape_of(large)}, {coefficients:,} learned coefficients"
    bench.write({
        "measurement": "transition", "schedule": schedule, "name": "ligo_fit_step", "detail": detail,
        **model_facts(large), "trainable_parameters": coefficients, "precision": "float32",
        "repeats": len(seconds), **stats, "first_call_ms": (step_ends[0] - started) * 1e3, "flops": flops,
        "tflops": flops / stats["median_ms"] / 1e9, "triton_launches": summarize_launches(launches),
    })
    bench.log(f"{schedule} ligo_fit_step ({detail}): {stats['median_ms']:.1f} ms")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_benchmark_arguments(parser, CSV_NAME)
    args = parser.parse_args(argv)
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    start = start_benchmark(args, CSV_NAME)  # exits 2 without a CUDA GPU unless --smoke
    setup = SMOKE_SETUP if start.smoke else GPU_SETUP
    if start.smoke:
        torch.set_num_threads(1)  # tiny ops: more threads only fight the other processes of a shared CPU
    bench = Bench(setup, start.device, start.csv_path, start.environment, start.ceilings, start.log, start.deadline)
    start.log(f"GPT-2 {bench.layers} layers, {setup.batch} x {setup.seq_len} tokens a step, {setup.warmup_steps} + "
              f"{setup.measured_steps} steps a stage, {setup.repeats} timed calls a transition")

    plan = []  # each schedule's transitions (cheap, and they show the JIT), then its stages
    for schedule in SCHEDULES:
        for name in TRANSITIONS.get(schedule, ()):
            plan.append(("transition", schedule, name, functools.partial(measure_transition, bench, schedule, name)))
        plan.append(("stage", schedule, "", functools.partial(measure_stages, bench, schedule)))
    for kind, schedule, name, measure in plan:
        if bench.may_start(kind, schedule, name):
            bench.run(kind, schedule, name, measure)

    failed = [row for row in bench.rows if row["error"] and not row["error"].startswith("skipped")]
    if bench.measured == 0:
        print(f"bench_end_to_end: no measurement finished ({len(failed)} failed, "
              f"{len(bench.rows) - len(failed)} skipped); see {start.csv_path}", file=sys.stderr)
        return 1
    print_table(bench.rows, ["measurement", "schedule", "name", "detail", "median_ms", "tokens_per_s", "flops",
                             "tflops", "first_call_ms", "error"], number_format=".4g")
    start.log(f"wrote {len(bench.rows)} rows to {start.csv_path}: {bench.measured} measured"
              + (f", {len(failed)} FAILED (see the error column)" if failed else ""))
    print_key(summary(bench))
    return 0


def summary(bench: Bench) -> str:
    """One line for perf/gpu_run.sh: the baseline's throughput and what was measured."""
    measured = [row for row in bench.rows if not row["error"]]
    text = f"GPT-2 {bench.layers}x{parse_size(bench.setup.size)['hidden']}"
    baseline = next((row for row in measured if row["schedule"] == "baseline"), None)
    if baseline is not None and bench.setup is not SMOKE_SETUP:  # smoke times are no speed claims
        text += f" baseline {baseline['tokens_per_s']:,.0f} tokens/s"
        if baseline["frac_matmul_ceiling"] is not None:
            text += f" ({baseline['frac_matmul_ceiling']:.0%} of the bf16 matmul ceiling)"
    stages = sum(row["measurement"] == "stage" for row in measured)
    transitions = sum(row["measurement"] == "transition" for row in measured)
    return f"{text}; {stages} stages and {transitions} transitions measured, {len(bench.rows) - len(measured)} not"


if __name__ == "__main__":
    sys.exit(main())
