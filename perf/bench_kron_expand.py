"""Benchmark of LiGO's Kronecker-factored expansion: Triton vs the eager reference vs torch.compile.

Usage (from the repository root)::

    python perf/bench_kron_expand.py --out DIR                    # on a CUDA GPU: DIR/kron_expand.csv
    python perf/bench_kron_expand.py --out DIR --time-limit 60    # stop starting measurements after ~60 s
    TRITON_INTERPRET=1 python perf/bench_kron_expand.py --out DIR --smoke   # CPU rehearsal, tiny models

Each case is a whole LiGO operator, ``growlib.LiGO(small, target_config, tie=...)``, from a bf16 BERT-Base to
BERT-Large or from GPT-2 small to medium, with ``tie="paper"`` (LiGO's default: per-layer Q / K / V / FFN maps)
or ``tie="shared"`` (one map per role).  What is timed is what LiGO's fitting runs every step:
``expanded()`` (every large parameter from the learned maps E, F, D; the small weights frozen) and its backward
to the maps, run three ways:

* ``triton``  under ``growlib.use_backend("triton")`` (growlib's kron_expand kernels);
* ``eager``   under ``growlib.use_backend("torch")`` (the einsum reference);
* ``compile`` ``torch.compile(dynamic=False)`` of ``expanded`` under the torch backend;

in two phases: ``forward`` and ``fwd+bwd`` (the gradients of every map from a random output gradient).  LiGO
keeps its maps and frozen weights in fp32 whatever the model's dtype, and casts the large parameters to the
model's dtype; that fp32 path (3xTF32 tensor-core dots in the kernels) is timed, and so is the same operator
cast to bf16 (``ligo.to(torch.bfloat16)``), which runs the kernels' bf16 tensor-core path (``map_dtype`` says
which).  FLOP/s count ``LiGO.flops_per_expansion`` (the torch path's contraction order, the same count for
every implementation) against the GPU's measured bf16 matmul ceiling; peak memory is what the phase allocates
above what was live before it; ``gpu_busy_ms`` is the GPU time of all the phase's kernels (the profiler's),
which against ``median_ms`` says whether the GPU or the host bounds it.  One CSV row is written per measurement; the
torch.compile rows come after every case's eager and Triton rows, as far as the time limit leaves room.
Without a CUDA GPU (and without --smoke) it exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

import growlib

from common import (BenchmarkStart, CompileEstimate, add_benchmark_arguments, append_csv, compile_failure,
                    device_kernel_ms, first_call, fraction, measured_count, print_key, print_table, run_cases,
                    speedups, start_benchmark, time_fn)

MODEL_DTYPE = torch.bfloat16
PHASES = ("forward", "fwd+bwd")
# Seconds assumed for building a case (small model, LiGO, output gradients) and for one timed measurement.
BUILD_S = {"cuda": 10.0, "cpu": 2.0}
MEASURE_S = {"cuda": 3.0, "cpu": 2.0}


@dataclass(frozen=True)
class Growth:
    name: str
    model_class: type
    small: Callable[[], object]
    large: Callable[[], object]


BERT = Growth("bert-base->bert-large", BertForMaskedLM,
              functools.partial(BertConfig, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072),
              functools.partial(BertConfig, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096))
GPT2 = Growth("gpt2-small->gpt2-medium", GPT2LMHeadModel,
              functools.partial(GPT2Config, n_embd=768, n_layer=12, n_head=12),
              functools.partial(GPT2Config, n_embd=1024, n_layer=24, n_head=16))
# --smoke: the same code at sizes the interpreter runs in seconds (2 -> 3 layers, widths 16 -> 24)
BERT_TINY = Growth("bert-tiny->bert-tiny-grown", BertForMaskedLM,
                   functools.partial(BertConfig, vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16),
                   functools.partial(BertConfig, vocab_size=32, hidden_size=24, num_hidden_layers=3,
                                     num_attention_heads=3, intermediate_size=48, max_position_embeddings=16))
GPT2_TINY = Growth("gpt2-tiny->gpt2-tiny-grown", GPT2LMHeadModel,
                   functools.partial(GPT2Config, vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2),
                   functools.partial(GPT2Config, vocab_size=32, n_positions=16, n_embd=24, n_layer=3, n_head=3))

BF16, FP32 = torch.bfloat16, torch.float32
# (growth, tie, map dtype), in order of value: the default tying on the tensor cores first, then LiGO as it fits
# by default (fp32 maps), then the other shapes and the shared tying.
CASES = ((BERT, "paper", BF16), (BERT, "paper", FP32), (GPT2, "paper", BF16), (BERT, "shared", BF16),
         (GPT2, "shared", BF16), (GPT2, "paper", FP32))
SMOKE_CASES = ((BERT_TINY, "paper", BF16), (GPT2_TINY, "shared", FP32))


def build_ligo(growth: Growth, tie: str, map_dtype: torch.dtype, device: torch.device) -> growlib.LiGO:
    """LiGO from a randomly initialised small model (the values do not matter for timing), its maps and frozen
    weights in ``map_dtype``."""
    with torch.device(device):
        small = growth.model_class(growth.small()).to(MODEL_DTYPE)
    return growlib.LiGO(small, growth.large(), tie=tie).to(map_dtype)


def expansion(ligo: growlib.LiGO, impl: str, compiled: Callable | None) -> Callable[[], dict[str, torch.Tensor]]:
    """``ligo.expanded`` as one implementation runs it."""
    backend, expand = ("triton", ligo.expanded) if impl == "triton" else ("torch", compiled or ligo.expanded)

    def run() -> dict[str, torch.Tensor]:
        with growlib.use_backend(backend):
            return expand()
    return run


@dataclass
class Case:
    """One LiGO operator with what every implementation is measured on: random output gradients, eager's
    results to compare with, and each implementation's first run."""

    growth: Growth
    tie: str
    ligo: growlib.LiGO
    grads: dict[str, torch.Tensor]
    expected: dict[str, list[torch.Tensor]]

    @classmethod
    def build(cls, growth: Growth, tie: str, map_dtype: torch.dtype, device: torch.device) -> Case:
        ligo = build_ligo(growth, tie, map_dtype, device)
        with growlib.use_backend("torch"):
            out = ligo.expanded()
        grads = {name: torch.randn_like(t) for name, t in out.items() if t.requires_grad}
        return cls(growth, tie, ligo, grads, {})

    def runners(self, expand: Callable[[], dict[str, torch.Tensor]]) -> dict[str, Callable[[], list[torch.Tensor]]]:
        """Each phase as a callable returning what is compared: the expanded tensors, or the maps' gradients."""
        params = list(self.ligo.parameters())
        names = list(self.grads)

        def forward() -> list[torch.Tensor]:
            out = expand()
            return [out[name] for name in names]

        def fwd_bwd() -> list[torch.Tensor]:
            out = expand()
            grads = torch.autograd.grad([out[name] for name in names], params, [self.grads[n] for n in names],
                                        allow_unused=True)
            return [g for g in grads if g is not None]

        return {"forward": forward, "fwd+bwd": fwd_bwd}


def max_rel_diff(result: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest |difference| of any tensor over that tensor's largest |expected| value."""
    with torch.no_grad():
        return max(float((r.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30))
                   for r, e in zip(result, expected))


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float | None:
    """MiB a call allocates at its peak above what was live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2 ** 20


class KronBench:
    """Measures cases and writes one CSV row per measurement."""

    def __init__(self, start: BenchmarkStart):
        self.start = start
        self.compile_estimate = CompileEstimate(start.compile_backend)
        self.rows: list[dict] = []

    def write(self, case: Case, impl: str, phase: str, **measured) -> None:
        flops = case.ligo.flops_per_expansion(backward=phase == "fwd+bwd")
        median = measured.get("median_ms")
        tflops = flops / (median * 1e9) if median and not self.start.smoke else None
        map_dtype = next(case.ligo.parameters()).dtype
        row = {"growth": case.growth.name, "tie": case.tie, "model_dtype": str(MODEL_DTYPE).removeprefix("torch."),
               "map_dtype": str(map_dtype).removeprefix("torch."), "impl": impl, "phase": phase,
               "median_ms": median, "p20_ms": measured.get("p20_ms"), "p80_ms": measured.get("p80_ms"),
               "flops": flops, "tflops": tflops,
               "frac_matmul_ceiling": fraction(tflops, self.start.ceilings["matmul_ceiling_tflops"]),
               "gpu_busy_ms": measured.get("gpu_busy_ms"),
               "peak_mem_mib": measured.get("peak_mem_mib"), "max_rel_diff_vs_eager": measured.get("max_rel_diff"),
               "first_call_s": measured.get("first_call_s"), "compile_graphs": measured.get("compile_graphs"),
               "error": measured.get("error", ""), "triton_launches": measured.get("triton_launches", ""),
               **self.start.ceilings, **self.start.environment}
        append_csv(self.start.csv_path, [row])
        self.rows.append(row)
        self.start.log(f"  {case.growth.name} tie={case.tie} maps {row['map_dtype']} {impl} {phase}: "
                       + (f"{median:.3f} ms" if median is not None else row["error"]))

    def measure(self, case: Case, impl: str) -> None:
        """Both phases of one implementation: a first run of each (JIT or compile, agreement with eager), then
        the timings.  torch.compile only when its graphs fit the time left."""
        device, deadline = self.start.device, self.start.deadline
        compiled = None
        if impl == "compile":
            cost = self.compile_estimate.cost(2) + 2 * MEASURE_S[device.type]  # forward and backward graphs
            if not deadline.allows(cost):
                for phase in PHASES:
                    self.write(case, impl, phase, error=deadline.refusal("compiling", cost))
                return
            compiled = torch.compile(case.ligo.expanded, dynamic=False, backend=self.start.compile_backend)
        runners = case.runners(expansion(case.ligo, impl, compiled))
        for phase, run in runners.items():
            if not deadline.allows(MEASURE_S[device.type]):
                self.write(case, impl, phase, error=deadline.refusal("a measurement", MEASURE_S[device.type]))
                continue
            try:
                first = first_call(run, device)
            except Exception as err:  # torch.compile only: compile_failure raises anything else
                self.write(case, impl, phase, error=compile_failure(impl, err))
                continue
            if impl == "compile":
                self.compile_estimate.record(first.seconds, first.compile_graphs)
            if impl == "eager":
                case.expected[phase] = first.result
            diff = max_rel_diff(first.result, case.expected[phase])
            first = first._replace(result=None)  # its outputs are not kept alive while timing
            median, p20, p80 = time_fn(run, device)
            self.write(case, impl, phase, median_ms=median, p20_ms=p20, p80_ms=p80,
                       gpu_busy_ms=device_kernel_ms(run, device, kernel_name=""),
                       peak_mem_mib=peak_memory_mib(run, device), max_rel_diff=diff, first_call_s=first.seconds,
                       compile_graphs=first.compile_graphs if impl == "compile" else None,
                       triton_launches=first.triton_launches)

    def measure_plain(self, case: Case) -> None:
        for impl in ("eager", "triton"):
            self.measure(case, impl)


def summary(rows: list[dict], smoke: bool) -> str:
    text = measured_count(rows)
    if smoke:
        return text + "; smoke: times are not kernel timings"
    ratios = speedups([r for r in rows if r["phase"] == "fwd+bwd"], ("growth", "tie", "map_dtype"), "triton", "eager")
    fracs = [r["frac_matmul_ceiling"] for r in rows
             if r["impl"] == "triton" and r["map_dtype"] == "bfloat16" and r["frac_matmul_ceiling"]]
    if ratios:
        text += f"; triton/eager fwd+bwd {min(ratios):.2f}-{max(ratios):.2f}x"
    if fracs:
        text += f"; triton bf16 maps best {100 * max(fracs):.0f}% of bf16 matmul"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_benchmark_arguments(parser, "kron_expand.csv")
    args = parser.parse_args(argv)
    start = start_benchmark(args, "kron_expand.csv")
    bench = KronBench(start)

    def label(case: tuple) -> str:
        growth, tie, map_dtype = case
        return f"{growth.name} tie={tie} maps {str(map_dtype).removeprefix('torch.')}"

    def measure_plain(case: tuple) -> Case:
        start.log(f"{label(case)}: building")
        built = Case.build(*case, start.device)
        bench.measure_plain(built)
        return built

    needed = BUILD_S[start.device.type] + 2 * MEASURE_S[start.device.type]  # a case and some rows
    failed = run_cases(start, SMOKE_CASES if start.smoke else CASES, needed, label, measure_plain,
                       lambda built: bench.measure(built, "compile"))

    if not start.smoke:
        columns = ("growth", "tie", "map_dtype", "phase", "impl", "median_ms", "tflops", "frac_matmul_ceiling",
                   "peak_mem_mib", "max_rel_diff_vs_eager", "error")
        print_table(bench.rows, list(columns))
    start.log(f"wrote {start.csv_path}")
    print_key(summary(bench.rows, start.smoke))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
