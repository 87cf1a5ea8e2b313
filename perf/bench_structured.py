"""GPU benchmark of the structured growth-map kernel: Triton vs the eager PyTorch reference vs torch.compile.

Usage (from the repository root, on a machine with a CUDA GPU)::

    python perf/bench_structured.py            # BERT-Base (bf16, fp32), BERT-Large, GPT-2 small, Llama 1B
    python perf/bench_structured.py --quick    # BERT-Base bf16 only
    python perf/bench_structured.py --out DIR  # write DIR/structured.csv (appended) and DIR/structured.png

Every op is a whole-model map at real parameter sizes, run three ways on the same tensors:

* ``triton``  growlib's Triton kernel (``growlib.use_backend("triton")``);
* ``eager``   growlib's PyTorch reference (``growlib.use_backend("torch")``);
* ``compile`` the reference's per-task arithmetic under ``torch.compile`` (see ``compiled_reference``);

and at two scopes: ``end_to_end`` is ``growlib.apply_map`` as users call it (task tables built on the host,
inputs validated, the map run), ``kernel_only`` replays the arguments that apply_map passed to
``growlib.ops.structured_map_`` straight into each implementation's launcher (the Triton launcher still builds
its pointer tables and tile schedule on the host each call).  Times are compared with the
op's compulsory memory traffic and the GPU's copy bandwidth, since the map is a gather with a few flops per
element and can at best stream at copy speed.  Without a CUDA GPU it exits with status 2 and times nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import triton
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import growlib
import growlib.ops
import growlib.reference
from growlib.kernels import structured_map as kernel
from growlib.kernels.launch import recorded as launch_records
from growlib.kernels.launch import summarize as summarize_launches
from growlib.models import adapter_for
from growlib.schema import GrowthMap, Schema

from common import REPO_ROOT, append_csv, print_table, start_benchmark, time_fn

WIDTH, DEPTH = 2, 2  # coalescing factors
ALPHA = 0.25  # interpolation weight
SCOPES = ("kernel_only", "end_to_end")
IMPLS = ("eager", "compile", "triton")  # eager first: the others are checked against it


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
LLAMA_1B = functools.partial(LlamaConfig, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             tie_word_embeddings=True)

CASES = (
    ModelCase("bert-base", BertForMaskedLM, BERT_BASE, torch.bfloat16),
    ModelCase("bert-base", BertForMaskedLM, BERT_BASE, torch.float32),
    ModelCase("bert-large", BertForMaskedLM, BERT_LARGE, torch.bfloat16),
    ModelCase("gpt2-small", GPT2LMHeadModel, GPT2_SMALL, torch.bfloat16),
    ModelCase("llama-1b", LlamaForCausalLM, LLAMA_1B, torch.bfloat16),
)
QUICK_CASES = CASES[:1]


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
    """The arguments of one ``growlib.ops.structured_map_`` call (apply_map makes one per dtype group); the
    launchers ``growlib.kernels.structured_map.structured_map`` and ``growlib.reference.structured_map`` take
    the same ones."""

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


@contextlib.contextmanager
def _patched(owner, name: str, value) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def record_kernel_calls(op: MapOp) -> list[KernelCall]:
    """The calls ``op`` makes to ``growlib.ops.structured_map_``, captured without running them, so that the
    launch can be timed without apply_map's host-side task building."""
    calls = []

    def record(dst, src, depth_weight, row_start, col_start, table_index, table_weight, *, alpha=None, rms=False):
        calls.append(KernelCall(list(dst), [list(row) for row in src], depth_weight, row_start, col_start,
                                table_index, table_weight, alpha, rms))

    with _patched(growlib.ops, "structured_map_", record):
        op.run()
    return calls


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
    block_r, block_c, _ = kernel.launch_config()
    return sum(triton.cdiv(out.shape[0], block_r) * triton.cdiv(out.shape[1], block_c)
               for call in calls for out in call.dst)


# ----------------------------------------------------------------------------------------------------------
# torch.compile of the reference
# ----------------------------------------------------------------------------------------------------------

def compiled_reference() -> Callable:
    """``growlib.reference.structured_map`` with its per-task arithmetic (``map_task``) under torch.compile.

    Compiling the whole reference measures nothing: its task loop reads table offsets and depth weights on
    the host, which dynamo cannot trace, and a graph break inside a loop leaves the loop eager.  The task
    body is pure tensor code; dynamic shapes let a model's hundreds of tasks share a handful of graphs.  Sizes
    of 1 (vectors), source counts and the epilogue flags still specialise, so the recompile limit is raised
    well above the number of variants a model has; otherwise dynamo would quietly run the rest eagerly."""
    torch._dynamo.config.recompile_limit = 64
    return functools.partial(growlib.reference.structured_map,
                             task=torch.compile(growlib.reference.map_task, dynamic=True))


def launchers(compiled: Callable) -> dict[str, Callable]:
    """Each implementation's launcher, called with a KernelCall's arguments (the kernel_only scope)."""
    return {"eager": growlib.reference.structured_map, "compile": compiled, "triton": kernel.structured_map}


@contextlib.contextmanager
def routed_to(impl: str, compiled: Callable) -> Iterator[None]:
    """apply_map routed to one implementation (the end_to_end scope): growlib's own backends for triton and
    eager; for compile, the torch backend with its reference swapped for the compiled one, so the three
    differ only in the launcher."""
    if impl == "compile":
        with growlib.use_backend("torch"), _patched(growlib.reference, "structured_map", compiled):
            yield
    else:
        with growlib.use_backend("triton" if impl == "triton" else "torch"):
            yield


def compile_failure(impl: str, err: Exception) -> str:
    """The one-line message recorded when torch.compile fails; a failure of any other implementation is a
    bug and is raised again."""
    if impl != "compile":
        raise err
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Check:
    """One implementation's first run of an op: its wall time (JIT / torch.compile included), its largest
    deviation from the eager reference, the Triton launch configurations it used, or why it failed."""

    first_call_s: float | None = None
    max_abs_diff: float | None = None
    error: str = ""
    launches: str = ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_agreement(calls: list[KernelCall], launch_by_impl: dict[str, Callable]) -> dict[str, Check]:
    """Run each implementation once from the same destination contents and compare it with the eager one
    (which must come first); the destinations are restored afterwards."""
    dsts = [out for call in calls for out in call.dst]
    device = dsts[0].device
    saved = [t.clone() for t in dsts]
    expected, checks = None, {}
    for impl, launch in launch_by_impl.items():
        for t, s in zip(dsts, saved):
            t.copy_(s)
        _synchronize(device)
        start = time.perf_counter()
        try:
            with launch_records() as records:
                run_calls(calls, launch)
            _synchronize(device)
        except Exception as err:
            checks[impl] = Check(error=compile_failure(impl, err))
            continue
        elapsed = time.perf_counter() - start
        if expected is None:
            expected = [t.clone() for t in dsts]
        diff = max(((t.float() - e.float()).abs().max().item() for t, e in zip(dsts, expected) if t.numel()),
                   default=0.0)
        checks[impl] = Check(first_call_s=elapsed, max_abs_diff=diff, launches=summarize_launches(records))
    for t, s in zip(dsts, saved):
        t.copy_(s)
    return checks


def op_runner(scope: str, impl: str, op: MapOp, calls: list[KernelCall],
              compiled: Callable) -> Callable[[], None]:
    """The callable timed for one (scope, implementation) of ``op``."""
    if scope == "kernel_only":
        launch = launchers(compiled)[impl]
        return lambda: run_calls(calls, launch)

    def end_to_end() -> None:
        with routed_to(impl, compiled):
            op.run()
    return end_to_end


def bench_op(op: MapOp, compiled: Callable, copy_ceiling_gbps: float,
             log: Callable[[str], None]) -> list[dict]:
    """Rows for one op: every implementation at every scope, with traffic, bandwidth and speed-ups."""
    calls = record_kernel_calls(op)
    moved = bytes_moved(calls)
    checks = check_agreement(calls, launchers(compiled))
    timings: dict[tuple[str, str], tuple[float, float, float] | None] = {}
    errors: dict[tuple[str, str], str] = {}
    for scope in SCOPES:
        for impl in IMPLS:
            timings[scope, impl], errors[scope, impl] = None, checks[impl].error
            if not checks[impl].error:
                try:
                    timings[scope, impl] = time_fn(op_runner(scope, impl, op, calls, compiled))
                except Exception as err:
                    errors[scope, impl] = compile_failure(impl, err)
            timing = timings[scope, impl]
            log(f"  {op.name} {scope} {impl}: " + (f"{timing[0]:.3f} ms" if timing else errors[scope, impl]))

    rows = []
    tasks, programs = sum(len(call.dst) for call in calls), triton_programs(calls)
    for scope in SCOPES:
        for impl in IMPLS:
            median, p20, p80 = timings[scope, impl] or (None, None, None)
            gbps = moved / (median * 1e6) if median else None
            speedups = {}
            for baseline in ("eager", "compile"):
                other = timings[scope, baseline] if impl == "triton" and median else None
                speedups[f"speedup_vs_{baseline}"] = other[0] / median if other else None
            rows.append({"op": op.name, "impl": impl, "scope": scope, "median_ms": median, "p20_ms": p20,
                         "p80_ms": p80, "bytes_moved": moved, "gbps": gbps,
                         "frac_copy_ceiling": gbps / copy_ceiling_gbps if gbps else None, **speedups,
                         "first_call_s": checks[impl].first_call_s,
                         "max_abs_diff_vs_eager": checks[impl].max_abs_diff, "error": errors[scope, impl],
                         "tasks": tasks, "triton_programs": programs, "triton_launches": checks[impl].launches})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path, copy_ceiling_gbps: float) -> None:
    """Grouped bars of achieved GB/s per (model, op), one panel per scope, against the copy ceiling."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the chart (the CSV has every number)", file=sys.stderr)
        return
    groups = list(dict.fromkeys((r["model"], r["dtype"], r["op"]) for r in rows))
    gbps = {(r["model"], r["dtype"], r["op"], r["impl"], r["scope"]): r["gbps"] for r in rows}
    x = range(len(groups))
    width = 0.8 / len(IMPLS)
    fig, axes = plt.subplots(len(SCOPES), 1, figsize=(max(8.0, 0.6 * len(groups) + 2), 8), sharex=True)
    for ax, scope in zip(axes, SCOPES):
        for i, impl in enumerate(IMPLS):
            values = [gbps.get((*g, impl, scope)) or float("nan") for g in groups]
            ax.bar([p + (i - (len(IMPLS) - 1) / 2) * width for p in x], values, width, label=impl)
        ax.axhline(copy_ceiling_gbps, color="black", linestyle="--", linewidth=1, label="copy ceiling")
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (compulsory traffic)")
        ax.set_title(scope)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize="small")
    axes[-1].set_xticks(list(x), [" ".join(g) for g in groups], rotation=45, ha="right", fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="BERT-Base bf16 only")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results",
                        help="directory for structured.csv (appended) and structured.png")
    args = parser.parse_args(argv)
    log, csv_path, environment, ceilings = start_benchmark(args.out, "structured.csv")
    device = torch.device("cuda")
    compiled = compiled_reference()
    all_rows = []
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        for case in QUICK_CASES if args.quick else CASES:
            dtype = str(case.dtype).removeprefix("torch.")
            log(f"{case.name} {dtype}: building")
            fine = build_model(case, device)
            ops = build_ops(fine)
            rows = [{"model": case.name, "dtype": dtype, **row, **ceilings, **environment}
                    for op in ops for row in bench_op(op, compiled, ceilings["copy_ceiling_gbps"], log)]
            append_csv(csv_path, rows)  # per model, so a late failure keeps the earlier results
            all_rows += rows
            del fine, ops
            torch.cuda.empty_cache()

    columns = ("model", "dtype", "op", "scope", "impl", "median_ms", "gbps", "frac_copy_ceiling",
               "speedup_vs_eager", "speedup_vs_compile", "max_abs_diff_vs_eager")
    print_table(all_rows, list(columns))
    plot(all_rows, args.out / "structured.png", ceilings["copy_ceiling_gbps"])
    log(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
