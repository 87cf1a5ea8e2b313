"""Benchmark of the structured growth-map kernel: Triton vs the eager PyTorch reference vs torch.compile.

Usage (from the repository root)::

    python perf/bench_structured_map.py --out DIR                    # on a CUDA GPU: DIR/structured_map.csv
    python perf/bench_structured_map.py --out DIR --time-limit 60    # stop starting measurements after ~60 s
    TRITON_INTERPRET=1 python perf/bench_structured_map.py --out DIR --smoke   # CPU rehearsal, tiny models

Every op is a whole-model map at real parameter sizes (BERT-Large and GPT-2-medium first, then BERT-Base in
bf16 and fp32, GPT-2 small, a 1B Llama, as far as the time limit reaches), run three ways on the same tensors:

* ``triton``  growlib's Triton kernel (``growlib.use_backend("triton")``);
* ``eager``   growlib's PyTorch reference (``growlib.use_backend("torch")``);
* ``compile`` the reference's per-task arithmetic under ``torch.compile`` (see ``compiled_reference``);

at three scopes: ``end_to_end`` is ``growlib.apply_map`` as users call it (task tables built on the host,
inputs validated, the map run); ``kernel_only`` replays the arguments apply_map passed to
``growlib.structured_map_`` straight into each implementation's launcher; ``shape_group`` replays only the
op's largest group of tasks that share one shape (e.g. every layer's FFN weight), which torch.compile covers
with a single static graph.  torch.compile needs one graph per task shape (8 to 18 per op), so it is measured
on each model's ``shape_group`` right after that model's other rows, and on whole ops only after every model,
where their remaining graphs fit the time limit.
Times are compared with the op's compulsory memory traffic and the GPU's copy bandwidth, since the map is a
gather with a few flops per element and can at best stream at copy speed.  Triton's replayed scopes also
record ``kernel_device_ms``, the GPU time of the kernel alone (the profiler's), since their timed calls
include the launcher's host-side work (per-task tables, one copy to the GPU).  One CSV row is written per
measurement.  Without a CUDA GPU (and without --smoke) it exits with status 2 and times nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import growlib
import growlib.apply
from growlib.kernels import structured_map as kernel
from growlib.kernels.launch import ceil_div, device_capability
from growlib.models import adapter_for
from growlib.schema import GrowthMap, Schema

from common import (BenchmarkStart, CompileEstimate, add_benchmark_arguments, append_csv, compile_failure,
                    device_kernel_ms, first_call, fraction, measured_count, print_key, print_table, run_cases,
                    speedups, start_benchmark, time_fn)

WIDTH, DEPTH = 2, 2  # coalescing factors
ALPHA = 0.25  # interpolation weight
SCOPES = ("kernel_only", "end_to_end", "shape_group")
# Seconds assumed for one timed measurement and for building a model with its ops (GPU / smoke): a case
# is started only when its build and a few measurements fit the time limit.
MEASURE_S = {"cuda": 3.0, "cpu": 2.0}
BUILD_S = {"cuda": 15.0, "cpu": 3.0}


# ----------------------------------------------------------------------------------------------------------
# Models and ops
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelCase:
    name: str
    model_class: type
    config: Callable[[], object]
    dtype: torch.dtype


BERT_BASE = functools.partial(BertConfig, vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072)
BERT_LARGE = functools.partial(BertConfig, vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096)
GPT2_SMALL = functools.partial(GPT2Config, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
GPT2_MEDIUM = functools.partial(GPT2Config, vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)
LLAMA_1B = functools.partial(LlamaConfig, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             tie_word_embeddings=True)

CASES = (  # in order of value: a time limit cuts the later ones
    ModelCase("bert-large", BertForMaskedLM, BERT_LARGE, torch.bfloat16),
    ModelCase("gpt2-medium", GPT2LMHeadModel, GPT2_MEDIUM, torch.bfloat16),
    ModelCase("bert-base", BertForMaskedLM, BERT_BASE, torch.bfloat16),
    ModelCase("bert-base", BertForMaskedLM, BERT_BASE, torch.float32),
    ModelCase("gpt2-small", GPT2LMHeadModel, GPT2_SMALL, torch.bfloat16),
    ModelCase("llama-1b", LlamaForCausalLM, LLAMA_1B, torch.bfloat16),
)
# --smoke: one tiny model (the interpreter takes about a second per whole-model launch)
SMOKE_CASES = (
    ModelCase("bert-tiny", BertForMaskedLM,
              functools.partial(BertConfig, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32), torch.bfloat16),
)


def build_model(case: ModelCase, device: torch.device) -> torch.nn.Module:
    """A randomly initialised model at the case's real sizes (no hub download: the values do not matter)."""
    with torch.device(device):
        model = case.model_class(case.config())
    return model.to(case.dtype)


@dataclass
class MapStep:
    gmap: GrowthMap
    source: Schema
    target: Schema
    alpha: float | None = None
    rms: bool = False


@dataclass
class MapOp:
    """One whole-model operation: the apply_map calls it consists of, timed together."""

    name: str
    steps: list[MapStep]

    def run(self) -> None:
        for step in self.steps:
            growlib.apply_map(step.gmap, step.source, step.target, alpha=step.alpha, rms=step.rms)


def _state_like(model: torch.nn.Module, fill: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Optimizer-state-like tensors for every parameter name; tied parameters share one, as in torch.optim."""
    by_param, named = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in by_param:
            by_param[id(param)] = fill(param.detach())
        named[name] = by_param[id(param)]
    return named


def build_ops(fine: torch.nn.Module) -> list[MapOp]:
    """The benchmarked ops between ``fine`` and its coalesced model, schemas and maps built once.

    The optimizer-state op runs in the de-coalescing direction, where growlib's schedules map state by default
    (first moments linearly, second moments in rms mode)."""
    adapter = adapter_for(fine)
    fine_dims = adapter.dims(fine.config)
    down = growlib.coalesce_map(fine_dims, width=WIDTH, depth=DEPTH)
    coarse = adapter.new_model(fine, down.target_dims)
    up = growlib.decoalesce_map(adapter.dims(coarse.config), fine_dims)
    fine_schema, coarse_schema = adapter.schema(fine), adapter.schema(coarse)

    def state_schema(model, fill):
        return adapter.schema(model, _state_like(model, fill))

    return [
        MapOp("coalesce", [MapStep(down, fine_schema, coarse_schema)]),
        MapOp("decoalesce", [MapStep(up, coarse_schema, fine_schema)]),
        MapOp("interpolate_", [MapStep(up, coarse_schema, fine_schema, alpha=ALPHA)]),
        MapOp("optimizer_state", [
            MapStep(up, state_schema(coarse, torch.randn_like), state_schema(fine, torch.zeros_like)),
            MapStep(up, state_schema(coarse, torch.rand_like), state_schema(fine, torch.zeros_like), rms=True),
        ]),
    ]


# ----------------------------------------------------------------------------------------------------------
# The launches behind an op
# ----------------------------------------------------------------------------------------------------------

@dataclass
class KernelCall:
    """The arguments of one ``structured_map_`` call (apply_map makes one per dtype group); the launchers
    ``structured_map_triton`` and ``structured_map_reference`` take the same ones."""

    dst: list[torch.Tensor]
    src: list[list[torch.Tensor]]
    depth_weight: torch.Tensor
    row_start: torch.Tensor
    col_start: torch.Tensor
    table_index: torch.Tensor
    table_weight: torch.Tensor
    alpha: float | None
    rms: bool

    def run(self, launch: Callable) -> None:
        launch(self.dst, self.src, self.depth_weight, self.row_start, self.col_start, self.table_index,
               self.table_weight, alpha=self.alpha, rms=self.rms)

    def task_signature(self, t: int) -> tuple:
        """What a static torch.compile graph of task ``t`` is specialised on: the shapes, strides and dtypes of
        its destination and live sources, its table width and its epilogue."""
        out = self.dst[t]
        live = [s for s, w in zip(self.src[t], self.depth_weight[t].tolist()) if w != 0.0]
        return (tuple(out.shape), out.stride(), out.dtype, tuple((tuple(s.shape), s.stride(), s.dtype) for s in live),
                self.table_index.shape[1], self.alpha, self.rms)

    def subset(self, tasks: list[int]) -> KernelCall:
        """The same call restricted to some of its tasks (the tables are shared, their offsets kept)."""
        return KernelCall([self.dst[t] for t in tasks], [self.src[t] for t in tasks], self.depth_weight[tasks],
                          self.row_start[tasks], self.col_start[tasks], self.table_index, self.table_weight,
                          self.alpha, self.rms)


@contextlib.contextmanager
def _patched(owner, name: str, value) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def record_kernel_calls(op: MapOp) -> list[KernelCall]:
    """The calls ``op`` makes to ``structured_map_``, captured without running them, so that the
    launch can be timed without apply_map's host-side task building."""
    calls = []

    def record(dst, src, depth_weight, row_start, col_start, table_index, table_weight, *, alpha=None, rms=False):
        calls.append(KernelCall(list(dst), [list(row) for row in src], depth_weight, row_start, col_start,
                                table_index, table_weight, alpha, rms))

    with _patched(growlib.apply, "structured_map_", record):
        op.run()
    return calls


def signatures(calls: list[KernelCall], scope: str) -> set[tuple]:
    """The static graphs torch.compile needs for ``calls`` at ``scope``.  apply_map runs the reference inside
    a torch.library op, where tensors carry other dispatch keys than in a replay, so end_to_end graphs are
    never shared with the replayed scopes'."""
    context = "in_op" if scope == "end_to_end" else "replay"
    return {(context, call.task_signature(t)) for call in calls for t in range(len(call.dst))}


def largest_shape_group(calls: list[KernelCall]) -> list[KernelCall]:
    """The tasks sharing the op's most frequent signature (ties: the most bytes), as calls of their own."""
    counts: Counter = Counter()
    for call in calls:
        for t, out in enumerate(call.dst):
            counts[call.task_signature(t)] += out.numel()
    best = max(counts, key=counts.get)
    group = [call.subset([t for t in range(len(call.dst)) if call.task_signature(t) == best]) for call in calls]
    return [call for call in group if call.dst]


def run_calls(calls: list[KernelCall], launch: Callable) -> None:
    for call in calls:
        call.run(launch)


def bytes_moved(calls: list[KernelCall]) -> int:
    """The op's compulsory memory traffic: every source element some nonzero weight reads, once; every
    destination element written once, and read once more when blended.

    A source read by several tasks (a coarse layer copied into two fine ones) counts once, as rows touched x
    columns touched, which is exact for maps that read whole tensors, as all benchmarked ones do."""
    touched: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
    total = 0
    for call in calls:
        index = call.table_index.cpu().long()
        live = call.table_weight.cpu() != 0
        depth = call.depth_weight.cpu()
        for t, (out, r0, c0) in enumerate(zip(call.dst, call.row_start.tolist(), call.col_start.tolist())):
            n_rows, n_cols = out.shape
            rows = index[r0:r0 + n_rows][live[r0:r0 + n_rows]]
            cols = index[c0:c0 + n_cols][live[c0:c0 + n_cols]]
            for d, source in enumerate(call.src[t]):
                if depth[t, d] == 0:
                    continue
                key = (source.data_ptr(), tuple(source.shape), source.stride())
                if key not in touched:
                    touched[key] = (torch.zeros(source.shape[0], dtype=torch.bool),
                                    torch.zeros(source.shape[1], dtype=torch.bool), source.element_size())
                row_mask, col_mask, _ = touched[key]
                row_mask[rows] = True
                col_mask[cols] = True
            total += out.numel() * out.element_size() * (2 if call.alpha is not None else 1)
    return total + sum(int(r.sum()) * int(c.sum()) * size for r, c, size in touched.values())


def triton_programs(calls: list[KernelCall]) -> int:
    """Programs the Triton launches start: one per (task, BLOCK_R x BLOCK_C tile)."""
    def programs(out: torch.Tensor) -> int:
        block_r, block_c, _ = kernel.launch_config(device_capability(out.device))
        return ceil_div(out.shape[0], block_r) * ceil_div(out.shape[1], block_c)

    return sum(programs(out) for call in calls for out in call.dst)


# ----------------------------------------------------------------------------------------------------------
# torch.compile of the reference
# ----------------------------------------------------------------------------------------------------------

def compiled_reference(backend: str) -> Callable:
    """``structured_map_reference`` with its per-task arithmetic (``map_task``) under torch.compile.

    Compiling the whole reference measures nothing: its task loop reads table offsets and depth weights on
    the host, which dynamo cannot trace, and a graph break inside a loop leaves the loop eager.  The task
    body is pure tensor code.  Static shapes (a graph per task shape, shared by every op and model that has
    that shape) compile faster than symbolic ones and are what a user's fixed model gets."""
    return functools.partial(kernel.structured_map_reference,
                             task=torch.compile(kernel.map_task, dynamic=False, backend=backend))


def launchers(compiled: Callable) -> dict[str, Callable]:
    """Each implementation's launcher, called with a KernelCall's arguments (kernel_only and shape_group)."""
    return {"eager": kernel.structured_map_reference, "compile": compiled, "triton": kernel.structured_map_triton}


@contextlib.contextmanager
def routed_to(impl: str, compiled: Callable) -> Iterator[None]:
    """apply_map routed to one implementation (the end_to_end scope): growlib's own backends for triton and
    eager; for compile, the torch backend with its reference swapped for the compiled one, so the three
    differ only in the launcher."""
    if impl == "compile":
        with growlib.use_backend("torch"), _patched(kernel, "structured_map_reference", compiled):
            yield
    else:
        with growlib.use_backend("triton" if impl == "triton" else "torch"):
            yield


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ScopeFacts:
    """What one scope of an op replays and moves, worked out once (the tables live on the GPU)."""

    calls: list[KernelCall]
    tasks: int
    bytes_moved: int
    triton_programs: int
    graphs: set[tuple]


@dataclass
class OpBench:
    """One op of one model and, per scope, the kernel calls it replays."""

    model: str
    dtype: str
    op: MapOp
    scopes: dict[str, ScopeFacts]

    @classmethod
    def of(cls, model: str, dtype: str, op: MapOp) -> OpBench:
        whole = record_kernel_calls(op)
        scopes = {}
        for scope, calls in (("kernel_only", whole), ("end_to_end", whole), ("shape_group", largest_shape_group(whole))):
            scopes[scope] = ScopeFacts(calls, sum(len(call.dst) for call in calls), bytes_moved(calls),
                                       triton_programs(calls), signatures(calls, scope))
        return cls(model, dtype, op, scopes)

    def runner(self, scope: str, impl: str, compiled: Callable) -> Callable[[], None]:
        """The callable timed for one (scope, implementation)."""
        if scope != "end_to_end":
            launch, calls = launchers(compiled)[impl], self.scopes[scope].calls
            return lambda: run_calls(calls, launch)

        def end_to_end() -> None:
            with routed_to(impl, compiled):
                self.op.run()
        return end_to_end


@dataclass
class FirstRun:
    """An implementation's first run: its wall time (Triton JIT / torch.compile included), its largest
    deviation from the eager reference run just before it, the Triton launches it made, the graphs it
    compiled."""

    seconds: float
    max_abs_diff: float
    launches: str
    graphs: int


def first_run(calls: list[KernelCall], run: Callable[[], None], device: torch.device) -> FirstRun:
    """Run the eager reference, then ``run``, from the same destination contents, compare, and restore them.
    (Measured ops write their destinations and read each other's, so the reference is recomputed right before
    rather than kept from earlier.)"""
    dsts = [out for call in calls for out in call.dst]
    saved = [t.clone() for t in dsts]
    run_calls(calls, kernel.structured_map_reference)
    expected = [t.clone() for t in dsts]
    for t, s in zip(dsts, saved):
        t.copy_(s)
    try:
        first = first_call(run, device)
        diff = max(((t.float() - e.float()).abs().max().item() for t, e in zip(dsts, expected) if t.numel()),
                   default=0.0)
    finally:
        for t, s in zip(dsts, saved):
            t.copy_(s)
    return FirstRun(first.seconds, diff, first.triton_launches, first.compile_graphs)


class StructuredBench:
    """Measures ops and writes one CSV row per measurement."""

    def __init__(self, start: BenchmarkStart):
        self.start = start
        self.compiled = compiled_reference(start.compile_backend)
        self.compile_estimate = CompileEstimate(start.compile_backend)
        self.compiled_signatures: set[tuple] = set()
        self.rows: list[dict] = []

    def write(self, ob: OpBench, scope: str, impl: str, timing=None, first: FirstRun | None = None,
              error: str = "", kernel_ms: float | None = None) -> None:
        facts = ob.scopes[scope]
        median, p20, p80 = timing or (None, None, None)
        gbps = facts.bytes_moved / (median * 1e6) if median and not self.start.smoke else None
        kernel_gbps = facts.bytes_moved / (kernel_ms * 1e6) if kernel_ms else None
        row = {"model": ob.model, "dtype": ob.dtype, "op": ob.op.name, "scope": scope, "impl": impl,
               "tasks": facts.tasks, "triton_programs": facts.triton_programs,
               "bytes_moved": facts.bytes_moved, "median_ms": median, "p20_ms": p20, "p80_ms": p80, "gbps": gbps,
               "frac_copy_ceiling": fraction(gbps, self.start.ceilings["copy_ceiling_gbps"]),
               "kernel_device_ms": kernel_ms,
               "kernel_frac_copy_ceiling": fraction(kernel_gbps, self.start.ceilings["copy_ceiling_gbps"]),
               "first_call_s": first.seconds if first else None,
               "max_abs_diff_vs_eager": first.max_abs_diff if first else None,
               "compile_graphs": first.graphs if first and impl == "compile" else None, "error": error,
               "triton_launches": first.launches if first else "", **self.start.ceilings, **self.start.environment}
        append_csv(self.start.csv_path, [row])
        self.rows.append(row)
        self.start.log(f"  {ob.model} {ob.op.name} {scope} {impl}: "
                       + (f"{median:.3f} ms" if median is not None else error))

    def measure_plain(self, ob: OpBench) -> None:
        """eager and triton at every scope: one first run each (whole op) for agreement and JIT, then timings."""
        device, deadline = self.start.device, self.start.deadline
        for impl in ("eager", "triton"):
            first = first_run(ob.scopes["kernel_only"].calls, ob.runner("kernel_only", impl, self.compiled), device)
            for scope in SCOPES:
                if not deadline.allows(MEASURE_S[device.type]):
                    self.write(ob, scope, impl, first=first,
                               error=deadline.refusal("a measurement", MEASURE_S[device.type]))
                    continue
                run = ob.runner(scope, impl, self.compiled)
                kernel_ms = None
                if impl == "triton" and scope != "end_to_end":
                    kernel_ms = device_kernel_ms(run, device, "_structured_map_kernel")
                self.write(ob, scope, impl, time_fn(run, device), first, kernel_ms=kernel_ms)

    def measure_compiled(self, ob: OpBench, scope: str) -> None:
        """torch.compile at one scope, if the graphs it has not compiled yet fit the time left."""
        device, deadline = self.start.device, self.start.deadline
        new_graphs = ob.scopes[scope].graphs - self.compiled_signatures
        cost = self.compile_estimate.cost(len(new_graphs)) + MEASURE_S[device.type]
        if not deadline.allows(cost):
            self.write(ob, scope, "compile", error=deadline.refusal(f"compiling {len(new_graphs)} graph(s)", cost))
            return
        run = ob.runner(scope, "compile", self.compiled)
        try:
            first = first_run(ob.scopes[scope].calls, run, device)
            self.compile_estimate.record(first.seconds, first.graphs)
            self.compiled_signatures |= new_graphs
            timing = time_fn(run, device)
        except Exception as err:  # torch.compile failed: recorded, and the benchmark goes on
            self.write(ob, scope, "compile", error=compile_failure("compile", err))
            return
        self.write(ob, scope, "compile", timing, first)

    def measure_case(self, case: ModelCase) -> list[OpBench]:
        """Every op of one model: eager and triton (cheap), then torch.compile of each op's shape group (one
        graph each); the model's ops are returned for ``measure_whole_ops_compiled``."""
        dtype = str(case.dtype).removeprefix("torch.")
        self.start.log(f"{case.name} {dtype}: building")
        fine = build_model(case, self.start.device)
        benches = [OpBench.of(case.name, dtype, op) for op in build_ops(fine)]
        for ob in benches:
            self.measure_plain(ob)
        for ob in benches:
            self.measure_compiled(ob, "shape_group")
        return benches

    def measure_whole_ops_compiled(self, benches: list[OpBench]) -> None:
        """torch.compile of whole ops (a graph per task shape), the ops needing fewest new graphs first."""
        for scope in ("kernel_only", "end_to_end"):
            for ob in sorted(benches, key=lambda ob: len(ob.scopes[scope].graphs - self.compiled_signatures)):
                self.measure_compiled(ob, scope)


def summary(rows: list[dict], smoke: bool) -> str:
    """The key numbers: rows written, and on a GPU Triton's kernel-only speed-up over eager and its best
    fraction of the copy ceiling."""
    text = f"{measured_count(rows)} on {len({r['model'] for r in rows})} model(s)"
    if smoke:
        return text + "; smoke: times are not kernel timings"
    ratios = speedups([r for r in rows if r["scope"] == "kernel_only"], ("model", "dtype", "op"), "triton", "eager")
    fracs = [r["frac_copy_ceiling"] for r in rows if r["impl"] == "triton" and r["frac_copy_ceiling"]]
    if ratios:
        text += f"; triton/eager kernel_only {min(ratios):.1f}-{max(ratios):.1f}x"
    if fracs:
        text += f"; triton best {100 * max(fracs):.0f}% of copy"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_benchmark_arguments(parser, "structured_map.csv")
    args = parser.parse_args(argv)
    start = start_benchmark(args, "structured_map.csv")
    bench = StructuredBench(start)
    # A graph per task shape, and the time limit decides how many: dynamo's own limits must never quietly
    # fall back to eager instead.
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096,
                                                     fail_on_recompile_limit_hit=True):
        needed = BUILD_S[start.device.type] + 4 * MEASURE_S[start.device.type]  # a model and some rows
        # Whole ops compile a graph per task shape (8 to 18): they get what every model's cheaper rows leave.
        failed = run_cases(start, SMOKE_CASES if start.smoke else CASES, needed,
                           lambda case: f"{case.name} {case.dtype}", bench.measure_case,
                           bench.measure_whole_ops_compiled)

    if not start.smoke:
        columns = ("model", "dtype", "op", "scope", "impl", "median_ms", "gbps", "frac_copy_ceiling",
                   "max_abs_diff_vs_eager", "error")
        print_table(bench.rows, list(columns))
    start.log(f"wrote {start.csv_path}")
    print_key(summary(bench.rows, start.smoke))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
