"""Benchmark of forward-only frozen stacks: growlib.freeze_forward vs the HF layers, eager and compiled.

Usage (from the repository root)::

    python perf/bench_frozen.py --out DIR                    # on a CUDA GPU: DIR/frozen.csv
    python perf/bench_frozen.py --out DIR --time-limit 50    # stop starting measurements after ~50 s
    TRITON_INTERPRET=1 python perf/bench_frozen.py --out DIR --smoke   # CPU rehearsal, tiny models

Two benchmarks per model (BERT-Base, then GPT-2 small, then Llama-1B layer shapes, 8 layers, 16k tokens, as far
as the time limit reaches), on randomly initialised layers at the real sizes (the values do not matter):

* ``stack_forward``: a stack of L layers forward (bf16 weights and activations), three ways on the same input:
  ``eager`` the HF layers under ``torch.no_grad``, ``compile`` the same loop under ``torch.compile``, and
  ``freeze_forward`` growlib's packed stack with fused kernels.  Reported as tokens/s and as model TFLOP/s
  against the GPU's bf16 matmul ceiling, since the stack is matmul-bound.
* ``mslt_step``: one training step at MSLT's stage shape, L layers of which the bottom 3/4 are frozen
  (fp32 weights, bf16 autocast, fused AdamW, as growlib's trainer runs): ``full_backprop`` trains all L
  layers, ``mslt_no_grad`` runs the frozen layers as HF layers under no_grad, ``mslt_freeze_forward`` runs
  them with ``freeze_forward(dtype=bfloat16)``.  Peak memory is reported for every row.

``gpu_busy_ms`` is the GPU time of all of a call's kernels (the profiler's), which against ``median_ms`` says
whether the GPU or the host bounds it.  One CSV row is written per measurement.  torch.compile (one graph per
model) is measured after every model's other rows, as far as the time limit leaves room.  Without a CUDA GPU
(and without --smoke) it exits with status 2 and times nothing.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

import growlib

from common import (BenchmarkStart, CompileEstimate, add_benchmark_arguments, append_csv, compile_failure,
                    device_kernel_ms, first_call, fraction, measured_count, print_key, print_table, run_cases,
                    speedups, start_benchmark, time_fn)

STEP_IMPLS = ("full_backprop", "mslt_no_grad", "mslt_freeze_forward")
FROZEN_FRACTION = 0.75
# Seconds assumed for building a model and for one timed measurement (GPU / smoke).
BUILD_S = {"cuda": 5.0, "cpu": 1.0}
MEASURE_S = {"cuda": 3.0, "cpu": 1.0}


@dataclass(frozen=True)
class StackCase:
    name: str
    family: str
    model_class: type
    config: Callable[..., object]
    layers: int
    batch: int
    seq: int


# Small vocabularies: only the layers are timed, and a 128k-token embedding would only take memory.
BERT_BASE = functools.partial(BertConfig, vocab_size=1024, hidden_size=768, num_attention_heads=12,
                              intermediate_size=3072, max_position_embeddings=512, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
GPT2_SMALL = functools.partial(GPT2Config, vocab_size=1024, n_positions=1024, n_embd=768, n_head=12,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
LLAMA_1B = functools.partial(LlamaConfig, vocab_size=1024, hidden_size=2048, intermediate_size=8192,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                             max_position_embeddings=8192)

CASES = (  # in order of value: a time limit cuts the later ones
    StackCase("bert-base", "bert", BertModel, BERT_BASE, layers=8, batch=32, seq=512),
    StackCase("gpt2-small", "gpt2", GPT2Model, GPT2_SMALL, layers=8, batch=16, seq=1024),
    StackCase("llama-1b", "llama", LlamaModel, LLAMA_1B, layers=8, batch=8, seq=2048),
)
# --smoke: every family (each has its own fused-kernel path) at sizes the interpreter runs in a blink
SMOKE_CASES = (
    StackCase("bert-tiny", "bert", BertModel, functools.partial(
        BERT_BASE, vocab_size=32, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16), layers=4, batch=2, seq=8),
    StackCase("gpt2-tiny", "gpt2", GPT2Model, functools.partial(
        GPT2_SMALL, vocab_size=32, n_positions=16, n_embd=32, n_head=2), layers=4, batch=2, seq=8),
    StackCase("llama-tiny", "llama", LlamaModel, functools.partial(
        LLAMA_1B, vocab_size=32, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=16), layers=4, batch=2, seq=8),
)


# ----------------------------------------------------------------------------------------------------------
# Models and the HF way of running their layers
# ----------------------------------------------------------------------------------------------------------

def build_model(case: StackCase, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    config = case.config(**{"n_layer" if case.family == "gpt2" else "num_hidden_layers": case.layers})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = case.model_class(config)
    return model.to(dtype).eval()


def layer_list(model: torch.nn.Module, family: str) -> torch.nn.ModuleList:
    return {"bert": lambda: model.encoder.layer, "gpt2": lambda: model.h, "llama": lambda: model.layers}[family]()


def hf_stack(model: torch.nn.Module, family: str, layers) -> Callable[[torch.Tensor], torch.Tensor]:
    """The HF layers called as their model calls them without padding: no mask (SDPA's own causal path for
    GPT-2 and Llama) and, for Llama, the model's rotary embedding computed once per forward."""
    layers = list(layers)

    def run(hidden: torch.Tensor) -> torch.Tensor:
        if family == "llama":
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            rotary = model.rotary_emb(hidden, position_ids)
            for layer in layers:
                hidden = layer(hidden, position_ids=position_ids, position_embeddings=rotary)
            return hidden
        for layer in layers:
            hidden = layer(hidden)
        return hidden
    return run


def forward_flops(model: torch.nn.Module, family: str, layers, batch: int, seq: int) -> float:
    """Matmul FLOPs of a stack forward: 2 per weight per token, plus QK^T and PV (half of them when causal)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    causal = family in ("gpt2", "llama")
    weights = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)
    attention = 4 * batch * seq * seq * heads * head_dim * len(layers) * (0.5 if causal else 1.0)
    return 2.0 * batch * seq * weights + attention


def random_hidden(case: StackCase, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(case.batch, case.seq, model.config.hidden_size, generator=generator, device=device,
                       dtype=dtype)


def step_runner(impl: str, model: torch.nn.Module, family: str, split: int,
                target: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """One optimizer step of ``impl``: the layers below ``split`` frozen, the others trained."""
    layers = layer_list(model, family)
    below, above = layers[:split], layers[split:]
    for i, layer in enumerate(layers):
        layer.requires_grad_(i >= split)
    optimizer = torch.optim.AdamW([p for layer in above for p in layer.parameters()], lr=1e-5, fused=True)
    trainable = hf_stack(model, family, above)
    if impl == "mslt_freeze_forward":
        frozen = growlib.freeze_forward(below, model, dtype=torch.bfloat16)
    elif impl == "mslt_no_grad":
        hf_below = hf_stack(model, family, below)

        def frozen(hidden):
            with torch.no_grad():
                return hf_below(hidden)
    else:
        frozen = None

    def step(hidden: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
            out = trainable(hidden if frozen is None else frozen(hidden))
            loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    return step


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float | None]:
    """(peak GiB allocated during one call, of which above what was allocated before it); CUDA only."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2 ** 30, (peak - before) / 2 ** 30


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Stack:
    """One model's bf16 stack, its input, the HF loop that runs it and that loop's output (what the others are
    compared with)."""

    case: StackCase
    model: torch.nn.Module
    hidden: torch.Tensor
    eager: Callable[[torch.Tensor], torch.Tensor]
    flops: float
    expected: torch.Tensor | None = None


class FrozenBench:
    """Measures stacks and training steps and writes one CSV row per measurement."""

    def __init__(self, start: BenchmarkStart):
        self.start = start
        self.compile_estimate = CompileEstimate(start.compile_backend)
        self.rows: list[dict] = []

    def write(self, case: StackCase, bench: str, impl: str, weights: str, frozen_layers: int, flops: float,
              **measured) -> None:
        median = measured.get("median_ms")
        seconds = median / 1e3 if median and not self.start.smoke else None
        tflops = flops / seconds / 1e12 if seconds else None
        tokens = case.batch * case.seq
        row = {"model": case.name, "layers": case.layers, "batch": case.batch, "seq": case.seq, "tokens": tokens,
               "bench": bench, "impl": impl, "weights": weights, "frozen_layers": frozen_layers,
               "trainable_layers": case.layers - frozen_layers if bench == "mslt_step" else 0,
               "median_ms": median, "p20_ms": measured.get("p20_ms"), "p80_ms": measured.get("p80_ms"),
               "tokens_per_s": tokens / seconds if seconds else None, "tflops": tflops,
               "frac_matmul_ceiling": fraction(tflops, self.start.ceilings["matmul_ceiling_tflops"]),
               "gpu_busy_ms": measured.get("gpu_busy_ms"), "peak_mem_gib": measured.get("peak_mem_gib"),
               "peak_mem_above_start_gib": measured.get("peak_mem_above_start_gib"),
               "rel_diff_vs_eager": measured.get("rel_diff"), "first_call_s": measured.get("first_call_s"),
               "compile_graphs": measured.get("compile_graphs"), "error": measured.get("error", ""),
               "triton_launches": measured.get("triton_launches", ""), **self.start.ceilings,
               **self.start.environment}
        append_csv(self.start.csv_path, [row])
        self.rows.append(row)
        self.start.log(f"  {case.name} {bench} {impl}: "
                       + (f"{median:.2f} ms" if median is not None else row["error"]))

    def build_stack(self, case: StackCase) -> Stack:
        device = self.start.device
        model = build_model(case, torch.bfloat16, device)
        layers = layer_list(model, case.family)
        return Stack(case, model, random_hidden(case, model, torch.bfloat16, device),
                     hf_stack(model, case.family, layers), forward_flops(model, case.family, layers, case.batch,
                                                                       case.seq))

    def measure_stack(self, stack: Stack, impl: str) -> None:
        """One implementation of the bf16 stack forward (eager first: the others are compared with it)."""
        device, deadline, case = self.start.device, self.start.deadline, stack.case
        estimate = MEASURE_S[device.type] + (self.compile_estimate.cost(1) if impl == "compile" else 0.0)
        if not deadline.allows(estimate):
            what = "compiling 1 graph" if impl == "compile" else "a measurement"
            self.write(case, "stack_forward", impl, "bfloat16", case.layers, stack.flops,
                       error=deadline.refusal(what, estimate))
            return
        if impl == "compile":
            runner = torch.compile(stack.eager, dynamic=False, backend=self.start.compile_backend)
        elif impl == "freeze_forward":
            runner = growlib.freeze_forward(layer_list(stack.model, case.family), stack.model)
        else:
            runner = stack.eager

        def fn() -> torch.Tensor:
            with torch.no_grad(), growlib.use_backend("triton"):  # the Triton kernels, on the CPU too (smoke)
                return runner(stack.hidden)

        try:
            first = first_call(fn, device)
        except Exception as err:  # torch.compile may fail on some HF layers; record it and go on
            self.write(case, "stack_forward", impl, "bfloat16", case.layers, stack.flops,
                       error=compile_failure(impl, err))
            return
        measured = {"first_call_s": first.seconds}
        if impl == "compile":
            measured["compile_graphs"] = first.compile_graphs
            self.compile_estimate.record(first.seconds, first.compile_graphs)
        if stack.expected is None:
            stack.expected = first.result.float()
        scale = stack.expected.abs().max().clamp_min(1e-30)
        measured["rel_diff"] = float((first.result.float() - stack.expected).abs().max() / scale)
        first = first._replace(result=None)  # its output is not kept alive while timing
        measured["peak_mem_gib"], measured["peak_mem_above_start_gib"] = peak_memory(fn, device)
        measured["median_ms"], measured["p20_ms"], measured["p80_ms"] = time_fn(fn, device)
        measured["gpu_busy_ms"] = device_kernel_ms(fn, device, kernel_name="")
        self.write(case, "stack_forward", impl, "bfloat16", case.layers, stack.flops,
                   triton_launches=first.triton_launches, **measured)

    def measure_steps(self, case: StackCase) -> None:
        """One training step at MSLT's stage shape, each way, against full backprop through the same depth."""
        device, deadline = self.start.device, self.start.deadline
        frozen_layers = int(round(FROZEN_FRACTION * case.layers))
        for impl in STEP_IMPLS:
            split = 0 if impl == "full_backprop" else frozen_layers
            model = build_model(case, torch.float32, device)
            hidden = random_hidden(case, model, torch.float32, device)
            per_layer = forward_flops(model, case.family, layer_list(model, case.family)[:1], case.batch, case.seq)
            flops = per_layer * (split + 3 * (case.layers - split))  # frozen: forward; trained: forward + 2x backward
            if not deadline.allows(MEASURE_S[device.type]):
                self.write(case, "mslt_step", impl, "float32+autocast_bf16", split, flops,
                           error=deadline.refusal("a measurement", MEASURE_S[device.type]))
                continue
            fn = functools.partial(step_runner(impl, model, case.family, split, torch.randn_like(hidden)), hidden)
            with growlib.use_backend("triton"):
                first = first_call(fn, device)  # creates the optimizer state, so the peak below is a steady step's
                measured = {"first_call_s": first.seconds, "triton_launches": first.triton_launches}
                measured["peak_mem_gib"], measured["peak_mem_above_start_gib"] = peak_memory(fn, device)
                measured["median_ms"], measured["p20_ms"], measured["p80_ms"] = time_fn(fn, device)
                measured["gpu_busy_ms"] = device_kernel_ms(fn, device, kernel_name="")
            self.write(case, "mslt_step", impl, "float32+autocast_bf16", split, flops, **measured)
            del model, hidden, fn
            if device.type == "cuda":
                torch.cuda.empty_cache()


def summary(rows: list[dict], smoke: bool) -> str:
    text = f"{measured_count(rows)} on {len({r['model'] for r in rows})} model(s)"
    if smoke:
        return text + "; smoke: times are not kernel timings"
    for bench, kernel, baseline in (("stack_forward", "freeze_forward", "eager"),
                                    ("mslt_step", "mslt_freeze_forward", "mslt_no_grad")):
        ratios = speedups([r for r in rows if r["bench"] == bench], ("model",), kernel, baseline)
        if ratios:
            text += f"; {kernel}/{baseline} {min(ratios):.2f}-{max(ratios):.2f}x"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_benchmark_arguments(parser, "frozen.csv")
    args = parser.parse_args(argv)
    start = start_benchmark(args, "frozen.csv")
    bench = FrozenBench(start)

    def measure_plain(case: StackCase):
        start.log(f"{case.name}: {case.layers} layers, batch {case.batch} x seq {case.seq}")
        stack = bench.build_stack(case)
        for impl in ("eager", "freeze_forward"):
            bench.measure_stack(stack, impl)
        bench.measure_steps(case)
        return stack

    needed = BUILD_S[start.device.type] + 5 * MEASURE_S[start.device.type]  # a model and some rows
    failed = run_cases(start, SMOKE_CASES if start.smoke else CASES, needed, lambda case: case.name, measure_plain,
                       lambda stack: bench.measure_stack(stack, "compile"))

    if not start.smoke:
        columns = ("model", "bench", "impl", "frozen_layers", "tokens", "median_ms", "tokens_per_s", "tflops",
                   "frac_matmul_ceiling", "peak_mem_gib", "rel_diff_vs_eager", "error")
        print_table(bench.rows, list(columns), number_format=".3g")
    start.log(f"wrote {start.csv_path}")
    print_key(summary(bench.rows, start.smoke))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
