"""GPU benchmark of forward-only frozen stacks: growlib.freeze_forward vs the HF layers, eager and compiled.

Usage (from the repository root, on a machine with a CUDA GPU)::

    python perf/bench_frozen.py                # BERT-Base, GPT-2 small, Llama-1B layer shapes, 8 layers, 16k tokens
    python perf/bench_frozen.py --quick        # BERT-Base only, 4 layers, 8k tokens
    python perf/bench_frozen.py --out DIR      # write DIR/frozen.csv (appended)

Two benchmarks per model, on randomly initialised layers at the real sizes (the values do not matter):

* ``stack_forward``: a stack of L layers forward (bf16 weights and activations), three ways on the same input:
  ``eager`` the HF layers under ``torch.no_grad``, ``compile`` the same loop under ``torch.compile``, and
  ``freeze_forward`` growlib's packed stack with fused kernels.  Reported as tokens/s and as model TFLOP/s
  against the GPU's bf16 matmul ceiling, since the stack is matmul-bound.
* ``mslt_step``: one training step at MSLT's stage shape, L layers of which the bottom 3/4 are frozen
  (fp32 weights, bf16 autocast, fused AdamW, as growlib's trainer runs): ``full_backprop`` trains all L
  layers, ``mslt_no_grad`` runs the frozen layers as HF layers under no_grad, ``mslt_freeze_forward`` runs
  them with ``freeze_forward(dtype=bfloat16)``.  Peak memory is reported for every row.

Without a CUDA GPU (or under TRITON_INTERPRET) it exits with status 2 and times nothing.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

import growlib
from growlib.kernels.launch import recorded as launch_records
from growlib.kernels.launch import summarize as summarize_launches

from common import REPO_ROOT, append_csv, print_table, start_benchmark, time_fn

STACK_IMPLS = ("eager", "compile", "freeze_forward")  # eager first: the others are checked against it
STEP_IMPLS = ("full_backprop", "mslt_no_grad", "mslt_freeze_forward")
FROZEN_FRACTION = 0.75


@dataclass(frozen=True)
class StackCase:
    name: str
    family: str
    model_class: type
    config: Callable[..., object]
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

CASES = (
    StackCase("bert-base", "bert", BertModel, BERT_BASE, batch=32, seq=512),
    StackCase("gpt2-small", "gpt2", GPT2Model, GPT2_SMALL, batch=16, seq=1024),
    StackCase("llama-1b", "llama", LlamaModel, LLAMA_1B, batch=8, seq=2048),
)
QUICK_CASES = (StackCase("bert-base", "bert", BertModel, BERT_BASE, batch=16, seq=512),)
LAYERS, QUICK_LAYERS = 8, 4


# ----------------------------------------------------------------------------------------------------------
# Models and the HF way of running their layers
# ----------------------------------------------------------------------------------------------------------

def build_model(case: StackCase, layers: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    config = case.config(**{"n_layer" if case.family == "gpt2" else "num_hidden_layers": layers})
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


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------

def compile_failure(impl: str, err: Exception) -> str:
    """The one-line message recorded when torch.compile fails; any other failure is a bug and is raised."""
    if impl != "compile":
        raise err
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(peak GiB allocated during one call, of which above what was allocated before it)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2 ** 30, (peak - before) / 2 ** 30


def empty_row(frozen_layers: int, trainable_layers: int) -> dict:
    return {"frozen_layers": frozen_layers, "trainable_layers": trainable_layers, "median_ms": None,
            "p20_ms": None, "p80_ms": None, "tokens_per_s": None, "tflops": None, "frac_matmul_ceiling": None,
            "baseline": "", "speedup_vs_baseline": None, "speedup_vs_compile": None, "peak_mem_gib": None,
            "peak_mem_above_start_gib": None, "peak_mem_vs_baseline": None, "rel_diff_vs_eager": None,
            "first_call_s": None, "error": "", "triton_launches": ""}


def finish_rows(rows: dict[str, dict], flops: dict[str, float], tokens: int, ceiling_tflops: float,
                baseline: str) -> None:
    """Throughput, TFLOP/s, speed-ups and memory ratios from each row's measurements (in place)."""
    base, compiled = rows[baseline], rows.get("compile")
    for impl, row in rows.items():
        row["baseline"] = baseline
        if row["median_ms"] is None:
            continue
        seconds = row["median_ms"] / 1e3
        row["tokens_per_s"] = tokens / seconds
        row["tflops"] = flops[impl] / seconds / 1e12
        row["frac_matmul_ceiling"] = row["tflops"] / ceiling_tflops
        if base["median_ms"]:
            row["speedup_vs_baseline"] = base["median_ms"] / row["median_ms"]
        if compiled is not None and compiled["median_ms"]:
            row["speedup_vs_compile"] = compiled["median_ms"] / row["median_ms"]
        if base["peak_mem_above_start_gib"]:
            row["peak_mem_vs_baseline"] = row["peak_mem_above_start_gib"] / base["peak_mem_above_start_gib"]


def bench_stack_forward(case: StackCase, layers: int, device: torch.device, ceiling_tflops: float,
                        log: Callable[[str], None]) -> list[dict]:
    """A bf16 stack forward: the HF layers eager and compiled, and freeze_forward, on one input."""
    model = build_model(case, layers, torch.bfloat16, device)
    stack = layer_list(model, case.family)
    hidden = random_hidden(case, model, torch.bfloat16, device)
    eager = hf_stack(model, case.family, stack)
    runners = {"eager": eager, "compile": torch.compile(eager),
               "freeze_forward": growlib.freeze_forward(stack, model)}
    flops = forward_flops(model, case.family, stack, case.batch, case.seq)

    rows, expected = {}, None
    for impl in STACK_IMPLS:
        row = rows[impl] = empty_row(layers, 0)
        fn = functools.partial(runners[impl], hidden)
        try:
            with torch.no_grad():
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                with launch_records() as records:
                    out = fn()
                torch.cuda.synchronize(device)
                row["first_call_s"] = time.perf_counter() - start
                row["triton_launches"] = summarize_launches(records)
                if expected is None:
                    expected = out.float()
                scale = expected.abs().max().clamp_min(1e-30)
                row["rel_diff_vs_eager"] = float((out.float() - expected).abs().max() / scale)
                del out
                row["peak_mem_gib"], row["peak_mem_above_start_gib"] = peak_memory(fn, device)
                row["median_ms"], row["p20_ms"], row["p80_ms"] = time_fn(fn)
        except Exception as err:  # torch.compile may fail on some HF layers; record it and go on
            row["error"] = compile_failure(impl, err)
        log(f"  {case.name} stack_forward {impl}: "
            + (f"{row['median_ms']:.2f} ms" if row["median_ms"] is not None else row["error"]))
    finish_rows(rows, {impl: flops for impl in rows}, case.batch * case.seq, ceiling_tflops, "eager")
    return [{"bench": "stack_forward", "impl": impl, "weights": "bfloat16", **row} for impl, row in rows.items()]


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
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = trainable(hidden if frozen is None else frozen(hidden))
            loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    return step


def bench_mslt_step(case: StackCase, layers: int, device: torch.device, ceiling_tflops: float,
                    log: Callable[[str], None]) -> list[dict]:
    """One training step at MSLT's stage shape against full backprop through the same depth."""
    frozen_layers = int(round(FROZEN_FRACTION * layers))
    rows, flops = {}, {}
    for impl in STEP_IMPLS:
        split = 0 if impl == "full_backprop" else frozen_layers
        model = build_model(case, layers, torch.float32, device)
        hidden = random_hidden(case, model, torch.float32, device)
        per_layer = forward_flops(model, case.family, layer_list(model, case.family)[:1], case.batch, case.seq)
        flops[impl] = per_layer * (split + 3 * (layers - split))  # frozen: forward; trained: forward + 2x backward
        row = rows[impl] = empty_row(split, layers - split)
        fn = functools.partial(step_runner(impl, model, case.family, split, torch.randn_like(hidden)), hidden)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        with launch_records() as records:
            fn()  # creates the optimizer state, so the peak below is a steady-state step's
        torch.cuda.synchronize(device)
        row["first_call_s"] = time.perf_counter() - start
        row["triton_launches"] = summarize_launches(records)
        row["peak_mem_gib"], row["peak_mem_above_start_gib"] = peak_memory(fn, device)
        row["median_ms"], row["p20_ms"], row["p80_ms"] = time_fn(fn)
        log(f"  {case.name} mslt_step {impl}: {row['median_ms']:.2f} ms, peak {row['peak_mem_gib']:.2f} GiB")
        del model, hidden, fn
        torch.cuda.empty_cache()
    finish_rows(rows, flops, case.batch * case.seq, ceiling_tflops, "full_backprop")
    return [{"bench": "mslt_step", "impl": impl, "weights": "float32+autocast_bf16", **row}
            for impl, row in rows.items()]


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="BERT-Base only, 4 layers, 8k tokens")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results",
                        help="directory for frozen.csv (appended)")
    args = parser.parse_args(argv)
    log, csv_path, environment, ceilings = start_benchmark(args.out, "frozen.csv")
    device = torch.device("cuda")
    layers = QUICK_LAYERS if args.quick else LAYERS
    all_rows = []
    for case in QUICK_CASES if args.quick else CASES:
        log(f"{case.name}: {layers} layers, batch {case.batch} x seq {case.seq}")
        rows = (bench_stack_forward(case, layers, device, ceilings["matmul_ceiling_tflops"], log)
                + bench_mslt_step(case, layers, device, ceilings["matmul_ceiling_tflops"], log))
        shape = {"model": case.name, "layers": layers, "batch": case.batch, "seq": case.seq,
                 "tokens": case.batch * case.seq}
        rows = [{**shape, **row, **ceilings, **environment} for row in rows]
        append_csv(csv_path, rows)  # per model, so a late failure keeps the earlier results
        all_rows += rows
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    columns = ("model", "bench", "impl", "frozen_layers", "trainable_layers", "tokens", "median_ms", "tokens_per_s",
               "tflops", "frac_matmul_ceiling", "baseline", "speedup_vs_baseline", "speedup_vs_compile",
               "peak_mem_gib", "peak_mem_vs_baseline", "rel_diff_vs_eager", "error")
    print_table(all_rows, list(columns), number_format='.3g')
    log(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
