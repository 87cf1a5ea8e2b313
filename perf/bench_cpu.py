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
* ``growlib grow --stream`` of synthetic multi-GB Llama checkpoints (random weights written straight to
  safetensors files) to twice their depth (and wider), against the same growth in memory: peak memory, the
  largest group of tensors the streamed map held at once, and wall time (it is I/O as much as CPU).

Usage (from the repository root)::

    python perf/bench_cpu.py --out perf/results/cpu.md [--repeats 3] [--threads 1] [--grow-rows 4x1.5,8x1.5,72x1]

(perf/results/cpu.md was measured with ``--grow-rows 4x1.5,8x1.5,72x1``: the 72-layer row writes 40 GB.)
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

from markdown_table import write_table

CASES = ("coalesce-growlib", "decoalesce-growlib", "decoalesce-initialised",
         "kron-attention-growlib", "kron-attention-einsum", "kron-ffn-growlib", "kron-ffn-einsum",
         "prepare-first", "prepare-second")
GROW_CASES = ("grow-streamed", "grow-in-memory")

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


#: the synthetic checkpoints of the streaming rows: a Llama of this width (GQA), its depth given per row
STREAM_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 4,
                "vocab_size": 32000, "tie_word_embeddings": False}


def _synthetic_checkpoint(folder: str, layers: int) -> int:
    """A Llama checkpoint of STREAM_SHAPE and ``layers`` layers with random weights, written tensor by tensor
    (never held whole); returns its bytes."""
    import torch
    from transformers import LlamaConfig

    from growlib.grow_stream import checkpoint_names, meta_model
    from growlib.models import adapter_of_class
    from growlib.safetensors_files import PlannedTensor, write_checkpoint

    config = LlamaConfig(num_hidden_layers=layers, architectures=["LlamaForCausalLM"], **STREAM_SHAPE)
    model = meta_model(adapter_of_class("LlamaForCausalLM"), "LlamaForCausalLM", config)
    saved = checkpoint_names(model)
    planned = [PlannedTensor(saved[name], tuple(p.shape), torch.float32) for name, p in model.named_parameters()]
    generator = torch.Generator().manual_seed(layers)
    os.makedirs(folder)
    write_checkpoint(folder, planned, lambda t: torch.randn(t.shape, generator=generator) * 0.02, 5 * 10**9)
    config.save_pretrained(folder)
    return sum(t.nbytes for t in planned)


def _grow_case(case: str, source: str, out: str, width: float) -> dict:
    """Grow ``source`` (streamed or in memory) into ``out``, twice as deep and ``width`` times as wide (net2net):
    wall and CPU seconds, peak RSS growth, the bytes written; or why growlib refused."""
    import time

    from growlib.errors import InputError
    from growlib.grow import grow_checkpoint

    layers = json.load(open(os.path.join(source, "config.json")))["num_hidden_layers"]
    before, wall, cpu = _rss_mib(), time.perf_counter(), time.process_time()
    try:
        report = grow_checkpoint(source, out, layers=2 * layers, hidden=round(STREAM_SHAPE["hidden_size"] * width),
                                 intermediate=round(STREAM_SHAPE["intermediate_size"] * width),
                                 width_method="net2net", stream=case == "grow-streamed", batch_size=1, seq_len=8)
    except InputError as refusal:
        return {"refused": str(refusal)}
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "peak_mib": max(0.0, _rss_mib() - before), "largest_group_mib": (report.largest_group_bytes or 0) / 2**20,
            "out_bytes": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                             if f.endswith(".safetensors"))}


def _stream_rows(rows: list[tuple[int, float]], threads: int) -> list[str]:
    """Measure the growth rows, (source layers, width factor) each, streamed and in memory, one fresh process per
    measurement; returns their markdown table."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    lines = ["", f"Growing a saved checkpoint (Llama, hidden {STREAM_SHAPE['hidden_size']}, GQA "
                 f"{STREAM_SHAPE['num_attention_heads']}/{STREAM_SHAPE['num_key_value_heads']} heads, vocabulary "
                 f"{STREAM_SHAPE['vocab_size']}, fp32 random weights) to twice its depth (stack), wider by net2net "
                 f"where the row says so; one fresh process per measurement, once each; machine memory "
                 f"{memory / 2**30:.1f} GiB.  Peak: RSS growth during the growth; largest group: the most tensor bytes "
                 f"the streamed map held at once (one grown parameter and the source tensors it reads).", "",
             "| source | width | source GB | grown GB | method | wall s | CPU s | peak MiB | largest group MiB | "
             "peak / (source + grown) |", "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        for layers, width in rows:
            source = os.path.join(scratch, f"llama-{layers}")
            source_bytes = _synthetic_checkpoint(source, layers)
            for case in GROW_CASES:
                out = os.path.join(scratch, "grown")
                done = subprocess.run([sys.executable, __file__, "--case", case, "--threads", str(threads),
                                       "--grow-source", source, "--grow-out", out, "--grow-width", str(width)],
                                      capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                subprocess.run(["rm", "-rf", out], check=True)
                method = "--stream" if case == "grow-streamed" else "in memory"
                if "refused" in r:
                    lines.append(f"| {layers} layers | x{width:g} | {source_bytes / 1e9:.2f} | | {method} | refused: "
                                 f"{r['refused']} | | | | |")
                    continue
                group = f"{r['largest_group_mib']:.0f}" if r["largest_group_mib"] else "-"
                lines.append(f"| {layers} layers | x{width:g} | {source_bytes / 1e9:.2f} | {r['out_bytes'] / 1e9:.2f} | "
                             f"{method} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_mib']:.0f} | {group} | "
                             f"{r['peak_mib'] * 2**20 / (source_bytes + r['out_bytes']):.3f} |")
            subprocess.run(["rm", "-rf", source], check=True)
    return lines


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
    parser.add_argument("--grow-rows", default="4x1.5,8x1.5",
                        help="synthetic checkpoints to grow, LAYERSxWIDTH comma-separated (x1: depth only)")
    parser.add_argument("--case", choices=CASES + GROW_CASES, help=argparse.SUPPRESS)  # a child's one measurement
    parser.add_argument("--grow-source", help=argparse.SUPPRESS)
    parser.add_argument("--grow-out", help=argparse.SUPPRESS)
    parser.add_argument("--grow-width", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case in GROW_CASES:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_grow_case(args.case, args.grow_source, args.grow_out, args.grow_width)))
        return 0
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
    rows = [(int(layers), float(width)) for layers, width in (row.split("x") for row in args.grow_rows.split(","))]
    lines += _stream_rows(rows, args.threads)
    write_table(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
