"""The CPU path, side by side in one run: memory and time of growlib's operations against a plain PyTorch
computation of the same thing, each measured in a fresh process (peak RSS above the state after set-up, CPU
time of the operation alone), on GPT-2 small / BERT-Base shapes.

* ``coalesce`` of GPT-2 small (the PyTorch reference of the structured map, one axis gathered at a time): its
  peak memory against the coarse model's own size, the least any mapper needs to hold its output.
* ``decoalesce`` of GPT-2 small, its target built without random initialisation, against the same map into a
  target HF first initialises (what growlib did before).
* LiGO's ``kron_expand`` forward + backward on the CPU: growlib (the reference chain in the cheapest order)
  against one ``torch.einsum`` in the best order for those shapes.
* the embedded corpus prepared twice (``prepare_data``): the second run reads the cached token ids.

Usage (from the repository root)::

    python perf/bench_cpu.py --out perf/results/cpu.md [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

CASES = ("coalesce-growlib", "decoalesce-growlib", "decoalesce-initialised",
         "kron-attention-growlib", "kron-attention-einsum", "kron-ffn-growlib", "kron-ffn-einsum",
         "prepare-first", "prepare-second")

#: (small layers, small width, large layers, large width) of LiGO's expansions: BERT-Small -> Base shapes
KRON_SHAPES = {"attention": (6, 512, 12, 768, 512, 768), "ffn": (6, 2048, 12, 3072, 512, 768)}


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpt2_small():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def _decoalesce_with_init(coarse, model):
    """``decoalesce`` as growlib ran it before targets were built uninitialised: the same map into a target that
    HF first fills with random values."""
    import growlib
    from growlib.apply import apply_map
    from growlib.operators.multilevel import decoalesce_map

    adapter = growlib.models.adapter_for(coarse)
    gmap = decoalesce_map(adapter.dims(coarse.config), adapter.dims(model.config))
    target = adapter.new_model(coarse, gmap.target_dims, initialise=True)
    apply_map(gmap, adapter.schema(coarse), adapter.schema(target))
    return target


def _run_case(case: str, threads: int) -> dict:
    """Set up, then time one operation; returns CPU seconds and peak RSS growth (MiB) of the operation."""
    import time

    import torch

    torch.set_num_threads(threads)
    import growlib

    if case.startswith(("coalesce", "decoalesce")):
        model = _gpt2_small()
        coarse = growlib.coalesce(model) if case.startswith("decoalesce") else None
        operation = {"coalesce-growlib": lambda: growlib.coalesce(model),
                     "decoalesce-growlib": lambda: growlib.decoalesce(coarse, like=model),
                     "decoalesce-initialised": lambda: _decoalesce_with_init(coarse, model)}[case]
    elif case.startswith("kron"):
        _, shape, impl = case.split("-")
        l1, o1, l2, o2, i1, i2 = KRON_SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        W = torch.randn(l1, o1, i1, generator=g)
        E, F, D = (torch.randn(o2, o1, generator=g).requires_grad_(), torch.randn(i2, i1, generator=g).requires_grad_(),
                   torch.randn(l2, l1, generator=g).requires_grad_())
        from growlib.kernels.kron_expand import cheapest_order

        order = cheapest_order(W.shape, {"depth": D, "rows": E, "cols": F})

        def einsum_best():  # the same chain as one einsum per step, in the cheapest order
            x = W
            for step in order:
                x = {"depth": lambda y: torch.einsum("lj,jab->lab", D, y),
                     "rows": lambda y: torch.einsum("oa,lab->lob", E, y),
                     "cols": lambda y: torch.einsum("lab,ib->lai", y, F)}[step](x)
            return x

        expand = (lambda: growlib.kron_expand(W, E, F, D)) if impl == "growlib" else einsum_best

        def operation():
            expand().square().sum().backward()
    else:
        from growlib.train.experiment import Experiment, prepare_data

        cache = os.environ["GROWLIB_BENCH_CACHE"]
        operation = lambda: prepare_data(Experiment(cache_dir=cache, device="cpu"))  # noqa: E731
    before = _rss_mib()
    started = time.process_time()
    result = operation()
    measured = {"cpu_s": time.process_time() - started, "peak_mib": max(0.0, _rss_mib() - before)}
    if case == "coalesce-growlib":
        measured["output_mib"] = sum(p.numel() * p.element_size() for p in result.parameters()) / 2 ** 20
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="markdown file to write (omit with --case)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each measured process")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child process's one measurement
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(_run_case(args.case, args.threads)))
        return 0
    if not args.out or args.repeats < 1:
        parser.error("--out and --repeats >= 1 are required")
    results: dict[str, list[dict]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GROWLIB_BENCH_CACHE": cache}
        for _ in range(args.repeats):
            for case in CASES:
                if case == "prepare-second" and not results["prepare-first"]:
                    continue
                done = subprocess.run([sys.executable, __file__, "--case", case, "--threads", str(args.threads)],
                                      capture_output=True, text=True, env=env, check=True)
                results[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
            subprocess.run(["rm", "-rf", os.path.join(cache, "tokens")], check=True)  # next prepare-first: cold

    def median(case, key):
        return statistics.median(r[key] for r in results[case])

    lines = [f"CPU path, one operation per fresh process, median of {args.repeats} interleaved runs, "
             f"{args.threads} torch thread(s); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}.  Peak memory: RSS growth during the operation.", "",
             "| operation | growlib CPU s | growlib peak MiB | alternative | alt CPU s | alt peak MiB | time ratio | "
             "memory ratio |", "|---|---|---|---|---|---|---|---|"]
    results["coalesce-output"] = [{"cpu_s": 1.0, "peak_mib": r["output_mib"]} for r in results["coalesce-growlib"]]
    pairs = [("coalesce, GPT-2 small", "coalesce-growlib", "coalesce-output", "the coarse model's own size"),
             ("decoalesce, GPT-2 small", "decoalesce-growlib", "decoalesce-initialised", "target HF-initialised"),
             ("kron_expand fwd+bwd, attention 6x512 -> 12x768", "kron-attention-growlib", "kron-attention-einsum",
              "einsum, best order"),
             ("kron_expand fwd+bwd, FFN 6x2048 -> 12x3072", "kron-ffn-growlib", "kron-ffn-einsum",
              "einsum, best order"),
             ("prepare_data, embedded corpus", "prepare-second", "prepare-first", "first run (tokenizing)")]
    for label, ours, other, name in pairs:
        t, m, mo = median(ours, "cpu_s"), median(ours, "peak_mib"), median(other, "peak_mib")
        memory_only = other == "coalesce-output"
        to = None if memory_only else median(other, "cpu_s")
        lines.append(f"| {label} | {t:.2f} | {m:.0f} | {name} | {'-' if memory_only else f'{to:.2f}'} | {mo:.0f} | "
                     f"{'-' if memory_only else f'{t / to:.2f}x'} | {f'{m / mo:.2f}x' if mo else 'n/a'} |")
    table = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
