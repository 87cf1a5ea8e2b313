"""GPU benchmark of the Kronecker-factored (LiGO) expansion: Triton vs the eager reference vs torch.compile.

Usage (from the repository root, on a machine with a CUDA GPU)::

    python perf/bench_kron.py            # BERT-Base -> BERT-Large and GPT-2 small -> medium tensor names, bf16
    python perf/bench_kron.py --quick    # the BERT attention tensor only
    python perf/bench_kron.py --out DIR  # write DIR/kron.csv (appended)

Each case is one tensor name stacked over the small model's 12 layers, grown to the large model's 24 with
dense LiGO maps, as in LiGO's training phase: E, F and D learn, W is frozen.  Every case runs four ways:

* ``triton``     ``growlib.ops.kron_expand`` on the Triton backend (forward and backward kernels);
* ``eager``      ``growlib.reference.kron_expand``, the torch backend (fp32 compute of bf16 inputs);
* ``compile``    that reference under ``torch.compile``;
* ``eager_bf16`` the same einsum chain in bf16 (cuBLAS bf16 GEMMs), what one would write without growlib;

in three phases: ``forward``, ``backward`` (gradients of E, F, D from a kept graph) and ``fwd+bwd``.  FLOP/s
count the work of the cheapest contraction order (the one the Triton path runs), the same count for every
implementation, against the GPU's measured bf16 matmul ceiling; peak memory is what the phase allocates above
what was live before it.  Without a CUDA GPU it exits with status 2 and times nothing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import growlib
import growlib.ops
import growlib.reference
from growlib.kernels import kron_expand as kernel
from growlib.kernels.launch import recorded as launch_records
from growlib.kernels.launch import summarize as summarize_launches

from common import REPO_ROOT, append_csv, print_table, start_benchmark, time_fn

DTYPE = torch.bfloat16
IMPLS = ("eager", "eager_bf16", "compile", "triton")  # eager first: the others are checked against it
PHASES = ("forward", "backward", "fwd+bwd")
LEARNED = ("E", "F", "D")  # LiGO trains the maps; the small model's weights stay frozen


@dataclass(frozen=True)
class Case:
    growth: str
    tensor: str
    small: tuple[int, int, int]  # (L1, O1, I1)
    large: tuple[int, int, int]  # (L2, O2, I2)


BERT = "bert-base->bert-large"
GPT2 = "gpt2-small->gpt2-medium"
CASES = (
    Case(BERT, "attention.{query,key,value,output}", (12, 768, 768), (24, 1024, 1024)),
    Case(BERT, "intermediate.dense (ffn in)", (12, 3072, 768), (24, 4096, 1024)),
    Case(BERT, "output.dense (ffn out)", (12, 768, 3072), (24, 1024, 4096)),
    Case(GPT2, "attn.c_attn (fused qkv, Conv1D in x out)", (12, 768, 2304), (24, 1024, 3072)),
    Case(GPT2, "mlp.c_fc (Conv1D in x out)", (12, 768, 3072), (24, 1024, 4096)),
)
QUICK_CASES = CASES[:1]


def make_inputs(case: Case, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random W, E, F, D (scaled to keep values of order one) and an output gradient; E, F, D require grad."""
    (l1, o1, i1), (l2, o2, i2) = case.small, case.large
    inputs = {
        "W": torch.randn(l1, o1, i1, device=device),
        "E": torch.randn(o2, o1, device=device) / o1 ** 0.5,
        "F": torch.randn(i2, i1, device=device) / i1 ** 0.5,
        "D": torch.randn(l2, l1, device=device) / l1 ** 0.5,
    }
    inputs = {name: t.to(DTYPE).requires_grad_(name in LEARNED) for name, t in inputs.items()}
    return inputs, torch.randn(l2, o2, i2, device=device, dtype=DTYPE)


def bf16_einsum_chain(W, E, F, D):
    """The reference's chain without its fp32 upcast: bf16 in, bf16 out, cuBLAS doing the GEMMs."""
    return torch.einsum("lob,ib->loi", torch.einsum("oa,lab->lob", E, torch.einsum("lj,jab->lab", D, W)), F)


def triton_expand(W, E, F, D):
    with growlib.use_backend("triton"):
        return growlib.ops.kron_expand(W, E, F, D)


def implementations() -> dict[str, Callable]:
    """Each implementation as a function of (W, E, F, D).  The compiled one is built once; dynamo compiles a
    graph per case (static shapes, as LiGO uses one shape per tensor name)."""
    return {"eager": growlib.reference.kron_expand, "eager_bf16": bf16_einsum_chain,
            "compile": torch.compile(growlib.reference.kron_expand, dynamic=False), "triton": triton_expand}


def phase_runners(expand: Callable, inputs: dict[str, torch.Tensor],
                  grad_out: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The callable timed for each phase.  ``backward`` replays the gradient of one kept forward graph."""
    args = [inputs[name] for name in ("W", "E", "F", "D")]
    learned = [inputs[name] for name in LEARNED]
    kept = expand(*args)
    return {
        "forward": lambda: expand(*args),
        "backward": lambda: torch.autograd.grad(kept, learned, grad_out, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(expand(*args), learned, grad_out),
    }


def phase_flops(case: Case) -> dict[str, int]:
    """FLOPs of the cheapest order (2 per multiply-add).  The backward computes every step's matrix gradient
    and the input gradient of every step but the first (W is frozen), each costing the step's forward."""
    (l1, o1, i1), (l2, o2, i2) = case.small, case.large
    maps = {"depth": torch.empty(l2, l1), "rows": torch.empty(o2, o1), "cols": torch.empty(i2, i1)}
    costs = kernel.step_costs(case.small, maps, kernel.cheapest_order(case.small, maps))
    forward, backward = 2 * sum(costs), 2 * (sum(costs) + sum(costs[1:]))
    return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}


def peak_memory_mib(run: Callable[[], object]) -> float:
    """MiB a call allocates at its peak above what was live before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2 ** 20


def max_rel_diff(result, expected) -> float:
    """Largest |difference| of the output (or each gradient) over that tensor's largest |expected| value."""
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    return max(float((r.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30))
               for r, e in zip(results, expecteds))


def compile_failure(impl: str, err: Exception) -> str:
    """The one-line message recorded when torch.compile fails; a failure of any other implementation is a
    bug and is raised again."""
    if impl != "compile":
        raise err
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def bench_case(case: Case, impls: dict[str, Callable], ceiling_tflops: float,
               log: Callable[[str], None]) -> list[dict]:
    """Rows for one case: every implementation in every phase, with FLOP/s, peak memory and agreement."""
    device = torch.device("cuda")
    inputs, grad_out = make_inputs(case, device)
    flops = phase_flops(case)
    measured: dict[tuple[str, str], dict] = {}
    expected: dict[str, object] = {}
    for impl, expand in impls.items():
        try:
            start = time.perf_counter()
            runners = phase_runners(expand, inputs, grad_out)
            first, launches = {}, {}
            for phase, run in runners.items():  # each phase's first call, with the Triton launches it makes
                with launch_records() as records:
                    first[phase] = run()
                launches[phase] = summarize_launches(records)
            torch.cuda.synchronize()
            first_call_s = time.perf_counter() - start
        except Exception as err:  # torch.compile only: compile_failure raises anything else
            message = compile_failure(impl, err)
            measured.update({(impl, phase): {"error": message} for phase in PHASES})
            log(f"  {case.tensor} {impl}: {message}")
            continue
        if impl == "eager":
            expected = first
        for phase, run in runners.items():
            median, p20, p80 = time_fn(run)
            measured[impl, phase] = {
                "median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_mib": peak_memory_mib(run),
                "max_rel_diff_vs_eager": max_rel_diff(first[phase], expected[phase]),
                "first_call_s": first_call_s, "error": "", "triton_launches": launches[phase],
            }
            log(f"  {case.tensor} {impl} {phase}: {median:.3f} ms")
        del runners, first
        torch.cuda.empty_cache()

    rows = []
    order = "-".join(kernel.cheapest_order(case.small, {"depth": inputs["D"], "rows": inputs["E"],
                                                        "cols": inputs["F"]}))
    for impl in impls:
        for phase in PHASES:
            m = measured[impl, phase]
            median = m.get("median_ms")
            tflops = flops[phase] / (median * 1e9) if median else None
            speedups = {}
            for baseline in ("eager", "eager_bf16", "compile"):
                other = measured[baseline, phase].get("median_ms") if impl == "triton" and median else None
                speedups[f"speedup_vs_{baseline}"] = other / median if other else None
            rows.append({
                "growth": case.growth, "tensor": case.tensor, "small": "x".join(map(str, case.small)),
                "large": "x".join(map(str, case.large)), "dtype": str(DTYPE).removeprefix("torch."),
                "triton_order": order, "impl": impl, "phase": phase,
                "median_ms": median, "p20_ms": m.get("p20_ms"), "p80_ms": m.get("p80_ms"),
                "flops": flops[phase], "tflops": tflops,
                "frac_matmul_ceiling": tflops / ceiling_tflops if tflops else None, **speedups,
                "peak_mem_mib": m.get("peak_mem_mib"), "max_rel_diff_vs_eager": m.get("max_rel_diff_vs_eager"),
                "first_call_s": m.get("first_call_s"), "error": m["error"],
                "triton_launches": m.get("triton_launches", ""),
            })
    return rows



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the BERT attention tensor only")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results",
                        help="directory for kron.csv (appended)")
    args = parser.parse_args(argv)
    log, csv_path, environment, ceilings = start_benchmark(args.out, "kron.csv")
    impls = implementations()
    all_rows = []
    with torch._dynamo.config.patch(recompile_limit=64):
        for case in QUICK_CASES if args.quick else CASES:
            log(f"{case.growth} {case.tensor}: {case.small} -> {case.large}")
            rows = [{**row, **ceilings, **environment}
                    for row in bench_case(case, impls, ceilings["matmul_ceiling_tflops"], log)]
            append_csv(csv_path, rows)  # per case, so a late failure keeps the earlier results
            all_rows += rows

    columns = ("growth", "tensor", "phase", "impl", "median_ms", "tflops", "frac_matmul_ceiling",
               "speedup_vs_eager", "speedup_vs_eager_bf16", "speedup_vs_compile", "peak_mem_mib",
               "max_rel_diff_vs_eager")
    print_table(all_rows, list(columns))
    log(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
