"""Compile every kernel at every launch configuration growlib chooses, for A100 (sm_80) and Hopper (sm_90),
without a GPU, and report what ptxas gave each: registers, spill bytes, shared memory, and the matrix
instructions in its PTX and SASS.

    python -m tests.kernels.compile_targets              # one JSON line per (configuration, target)
    python -m tests.kernels.compile_targets --markdown   # the same as a markdown table (perf/results/ptxas-*.md)

Run from the repository root WITHOUT ``TRITON_INTERPRET`` (compiling needs the compiled jit functions);
tests/kernels/test_launch_configs.py runs it and checks every row.

Each launcher is called on CPU tensors with its kernel's ``run`` replaced by a recorder, so the exact arguments,
constexprs and launch options it chose are captured; the kron GEMMs choose as they would on the target GPU
(its capability and SM count).  Triton's own binder then specialises the arguments as the JIT would on a GPU
(16-byte alignment, unit strides), launches that specialise identically are merged, and ``triton.compile``
builds each once for the target, ptxas included.  Registers and spills come from the log of that ptxas run,
the SASS from Triton's bundled cuobjdump.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

from growlib.kernels import kron_expand, launch, structured_map
from growlib.kernels.frozen import activation as fused_activation
from growlib.kernels.frozen import add_norm as fused_norm
from growlib.kernels.frozen import rope_split_qkv as rope

CAPABILITIES = ((8, 0), (9, 0))
# SMs of the parts each target stands for (A100; H100 and H200), which set how far a summed GEMM splits K.
SM_COUNT = {(8, 0): 108, (9, 0): 132}

# LiGO growths, stack (L1, O1, I1) -> (L2, O2, I2) and the steps whose width map is one per output layer:
# perf/bench_kron_expand.py's BERT-Base -> BERT-Large and GPT-2 small -> medium tensors with shared maps (tie="shared"),
# the per-layer row or column maps of tie="paper" (query, FFN), biases (the 1-D form), and depth growths 6 -> 12
# and 24 -> 48 whose depth mixes (M = L2 or L1) get the other short-M tiles.  Forward and backward (gradients of
# W, E, F and D), in every dtype the kernel supports.
KRON_GROWTHS = (
    ("bert attention", (12, 768, 768), (24, 1024, 1024), ()),
    ("bert ffn in", (12, 3072, 768), (24, 4096, 1024), ()),
    ("bert ffn out", (12, 768, 3072), (24, 1024, 4096), ()),
    ("gpt2 qkv", (12, 768, 2304), (24, 1024, 3072), ()),
    ("bert query, per-layer E", (12, 768, 768), (24, 1024, 1024), ("rows",)),
    ("bert ffn out, per-layer F", (12, 768, 3072), (24, 1024, 4096), ("cols",)),
    ("bert bias", (12, 768), (24, 1024), ()),
    ("bert ffn bias, per-layer E", (12, 3072), (24, 4096), ("rows",)),
    ("6->12 layers", (6, 256, 256), (12, 384, 384), ()),
    ("24->48 layers", (24, 256, 256), (48, 384, 384), ()),
)
# The structured maps growlib's operators launch: (use, KD depth terms, K table nonzeros, blend, rms).
# Coalescing averages pairs of layers and of neurons; de-coalescing, Net2Net, stacking, MSLT and the ODE
# multilevel maps copy one; interpolate_ blends; optimizer second moments go through either in rms mode.
STRUCTURED_MAPS = (
    ("coalesce", 2, 2, False, False),
    ("coalesce second moments", 2, 2, False, True),
    ("decoalesce / copy", 1, 1, False, False),
    ("interpolate_", 1, 1, True, False),
    ("decoalesce second moments", 1, 1, False, True),
)
# growlib.frozen's norms: (use, residual, weight, bias, return_sum, rms), at BERT-Base's width and the widest.
NORMS = (
    ("post-LN (BERT)", True, True, True, False, False),
    ("first pre-LN (GPT-2, ViT)", False, True, True, False, False),
    ("pre-LN + residual (GPT-2, ViT)", True, True, True, True, False),
    ("first RMSNorm (Llama)", False, True, False, False, True),
    ("RMSNorm + residual (Llama)", True, True, False, True, True),
)
NORM_WIDTHS = (768, fused_norm.MAX_WIDTH)  # 4 x 1024 and 1 x 16384 elements a program
ROPE_SHAPES = (("llama-1b", 32, 8, 64), ("llama-7b", 32, 32, 128), ("head_dim 256", 8, 2, 256))  # heads, kv, dim


@dataclass
class Launch:
    kernel: str   # the table's name for it
    use: str      # what launches it
    jit: object   # the @triton.jit function
    args: tuple
    kwargs: dict
    estimate: int | None = None  # growlib's own bound on its shared memory, where it has one


@contextlib.contextmanager
def captured(kernel):
    """Record each launch of ``kernel`` (positional args, keyword args) instead of running it."""
    launches = []
    kernel.run = lambda *args, grid, warmup, **kwargs: launches.append((args, kwargs))
    try:
        yield launches
    finally:
        del kernel.run


@contextlib.contextmanager
def on_target(capability):
    """Make the kron launcher choose for ``capability`` (and its SM count) on CPU tensors."""
    query, programs = launch.device_capability, kron_expand._target_programs
    launch.device_capability = lambda device: capability
    kron_expand._target_programs = lambda device: 2 * SM_COUNT[capability]  # two programs per SM, as on the GPU
    try:
        yield
    finally:
        launch.device_capability, kron_expand._target_programs = query, programs


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def kron_launches() -> list[Launch]:
    """The GEMMs of LiGO's forward and backward (gradients of W, E, F and D) for each of KRON_GROWTHS, as
    chosen for the capability ``on_target`` sets."""
    found = []
    for dtype in kron_expand.SUPPORTED_DTYPES:
        for use, small, large, per_layer in KRON_GROWTHS:
            stack = torch.empty(small + (1,) * (3 - len(small)), dtype=dtype)  # the 1-D form is (L1, O1, 1)
            maps = {"depth": torch.empty(large[0], small[0], dtype=dtype)}
            for axis, step in enumerate(("rows", "cols")[:len(small) - 1], start=1):
                layers = (large[0],) if step in per_layer else ()
                maps[step] = torch.empty(layers + (large[axis], small[axis]), dtype=dtype)
            order = kron_expand.cheapest_order(stack.shape, maps)  # the chain growlib.kron_expand runs
            with captured(kron_expand._batched_matmul_kernel) as launches:
                out, stages = kron_expand.expand(stack, maps, order)
                kron_expand.expand_backward(torch.empty_like(out), stages, maps, order, set(maps), True)
            for args, kwargs in launches:
                a, b, c, m, n, k = args[:6]
                config = kron_expand.gemm_config(m, n, k, dtype, launch.device_capability(a.device),
                                                 sum_batch=kwargs["SUM_BATCH"])
                found.append(Launch("kron_gemm", f"{use} {dtype_name(dtype)} {m}x{n}x{k}",
                                    kron_expand._batched_matmul_kernel, args, kwargs,
                                    config.shared_bytes(a.element_size())))
    return found


def structured_launches() -> list[Launch]:
    found = []
    for dtype in structured_map.SUPPORTED_DTYPES:
        for use, kd, k, blend, rms in STRUCTURED_MAPS:
            rows, cols, fine = 70, 65, 140
            with captured(structured_map._structured_map_kernel) as launches:
                structured_map.structured_map_triton(
                    [torch.empty(rows, cols, dtype=dtype)], [[torch.empty(fine, fine, dtype=dtype)] * kd],
                    torch.ones(1, kd), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                    torch.zeros(fine, k, dtype=torch.int32), torch.ones(fine, k),
                    alpha=0.5 if blend else None, rms=rms)
            found += [Launch("structured_map", f"{use} {dtype_name(dtype)}", structured_map._structured_map_kernel,
                             *launch) for launch in launches]
    return found


def norm_launches() -> list[Launch]:
    found = []
    for dtype in fused_norm.SUPPORTED_DTYPES:
        for width in NORM_WIDTHS:
            for use, residual, weight, bias, return_sum, rms in NORMS:
                x = torch.empty(8, width, dtype=dtype)
                vector = torch.empty(width, dtype=dtype)
                with captured(fused_norm._add_norm_kernel) as launches:
                    fused_norm.add_norm_triton(x, torch.empty_like(x) if residual else None, vector if weight else None,
                                        vector.clone() if bias else None, 1e-5, rms, return_sum)
                found += [Launch("add_norm", f"{use} {dtype_name(dtype)} width {width}", fused_norm._add_norm_kernel,
                                 *launch) for launch in launches]
    return found


def activation_launches() -> list[Launch]:
    found = []
    for dtype in fused_activation.SUPPORTED_DTYPES:
        for activation in fused_activation.ACTIVATIONS:
            # BERT, GPT-2 and ViT MLPs add a bias; Llama's are gated, without one.
            for gated, bias in ((False, True), (True, False)):
                x = torch.empty(33, 2 * 600, dtype=dtype)
                with captured(fused_activation._activation_kernel) as launches:
                    (fused_activation.gated_activation_triton if gated else fused_activation.bias_activation_triton)(
                        x, torch.empty(x.shape[1], dtype=dtype) if bias else None, activation)
                found += [Launch("activation", f"{'gated ' if gated else ''}{activation}{' + bias' if bias else ''} "
                                 f"{dtype_name(dtype)}", fused_activation._activation_kernel, *launch)
                          for launch in launches]
    return found


def rope_launches() -> list[Launch]:
    found = []
    for dtype in rope.SUPPORTED_DTYPES:
        for use, heads, kv_heads, head_dim in ROPE_SHAPES:
            cos = torch.empty(1, 5, head_dim)
            with captured(rope._rope_split_kernel) as launches:
                rope.rope_split_qkv_triton(torch.empty(2, 5, (heads + 2 * kv_heads) * head_dim, dtype=dtype), cos,
                                    cos.clone(), heads, kv_heads)
            found += [Launch("rope_split", f"{use} {dtype_name(dtype)}", rope._rope_split_kernel, *launch)
                      for launch in launches]
    return found


# Each kernel's launches, by the name the table gives it.
LAUNCHES = {"kron_gemm": kron_launches, "structured_map": structured_launches, "add_norm": norm_launches,
            "activation": activation_launches, "rope_split": rope_launches}


def specialised(launch_: Launch, capability):
    """(ASTSource, options, target) of one captured launch for ``capability``, specialised as the JIT would."""
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    backend = make_backend(target)
    kernel = launch_.jit
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch_.args, **launch_.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch_.kwargs, bound_args, specialization,
                                                              options)
    return ASTSource(kernel, signature, constexprs, attrs), options, target


def config_label(launch_: Launch) -> str:
    """The constexprs and launch options that tell one compiled configuration from another."""
    hidden = {"INTERPRETER", "INPUT_PRECISION"}  # the same in every compiled launch
    dtypes = []  # of the data, in argument order (kron: inputs, then an fp32 output of partial sums)
    if not any(key.endswith("_DTYPE") for key in launch_.kwargs):  # else the constexprs name them
        for arg in launch_.args:
            if isinstance(arg, torch.Tensor) and arg.is_floating_point() and dtype_name(arg.dtype) not in dtypes:
                dtypes.append(dtype_name(arg.dtype))
    parts = ["/".join(dtypes)] if dtypes else []
    parts += [f"{key}={int(value) if isinstance(value, bool) else value}" for key, value in launch_.kwargs.items()
              if key not in hidden and key not in ("num_warps", "num_stages") and value is not None]
    parts.append(f"w={launch_.kwargs.get('num_warps', 4)}")
    if "num_stages" in launch_.kwargs:
        parts.append(f"s={launch_.kwargs['num_stages']}")
    return " ".join(parts)


PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
SASS_OPCODE = re.compile(r"\b(HGMMA|HMMA|FFMA)\b")


def resources(compiled, ptxas_log: str) -> dict:
    """Registers and spills from ptxas's log; matrix and FMA instructions counted in the PTX and the SASS."""
    registers = PTXAS_REGISTERS.findall(ptxas_log)
    spills = PTXAS_SPILLS.findall(ptxas_log)
    if len(registers) != 1 or len(spills) != 1:
        raise RuntimeError(f"expected one kernel's resources in the ptxas log, got:\n{ptxas_log}")
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:  # cuobjdump reads a file (Triton's own sass helper is slower)
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as file:
            file.write(compiled.asm["cubin"])
        sass = SASS_OPCODE.findall(subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin], check=True,
                                                  capture_output=True, text=True).stdout)
    return {"registers": int(registers[0]), "spill_stores": int(spills[0][0]), "spill_loads": int(spills[0][1]),
            "shared": compiled.metadata.shared,
            "ptx_wgmma": len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
            "ptx_mma": len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
            "sass_hgmma": sass.count("HGMMA"), "sass_hmma": sass.count("HMMA"), "sass_ffma": sass.count("FFMA")}


def target_rows(capability, kernels: list[str]) -> list[dict]:
    """One row per distinct compiled configuration of each of ``kernels`` for ``capability``."""
    knobs.nvidia.dump_ptxas_log = True     # Triton prints ptxas -v's log: registers and spills
    knobs.compilation.always_compile = True  # a cached kernel would come without that log
    with on_target(capability):
        launches = [launch_ for kernel in kernels for launch_ in LAUNCHES[kernel]()]
    merged: dict[tuple, tuple[Launch, tuple, list[str]]] = {}
    for launch_ in launches:
        compilation = specialised(launch_, capability)
        source, options, _ = compilation
        key = (source.hash(), json.dumps(options.__dict__, sort_keys=True, default=str))
        merged.setdefault(key, (launch_, compilation, []))[2].append(launch_.use)
    rows = []
    for launch_, (source, options, target), uses in merged.values():
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = compile(source, target=target, options=options.__dict__)
        rows.append({"kernel": launch_.kernel, "config": config_label(launch_), "capability": list(capability),
                     **resources(compiled, log.getvalue()), "limit": launch.max_shared_bytes(capability),
                     "estimate": launch_.estimate, "num_warps": compiled.metadata.num_warps,
                     "num_stages": compiled.metadata.num_stages, "uses": uses})
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table, under a line naming the triton and ptxas versions that compiled them."""
    ptxas = ", ".join(f"{get_ptxas(major * 10 + minor).version} for sm_{major}{minor}" for major, minor in CAPABILITIES)
    header = ("| target | kernel | configuration | registers | spill st/ld (B) | shared (B) | PTX wgmma / mma.sync | "
              "SASS HGMMA / HMMA / FFMA | used by |")
    lines = [f"# Kernel resources on sm_80 and sm_90, triton {triton.__version__}", "",
             f"Every launch configuration growlib chooses, compiled ahead of time by triton {triton.__version__} "
             f"(ptxas {ptxas}) with `python -m tests.kernels.compile_targets --markdown`; no GPU involved.  "
             "Registers and spills are ptxas's; shared memory is the compiled kernel's; instruction counts are "
             "static (per kernel, not per run).", "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        uses = row["uses"][0] + (f" (+{len(row['uses']) - 1} more)" if len(row["uses"]) > 1 else "")
        lines.append(f"| sm_{row['capability'][0]}{row['capability'][1]} | {row['kernel']} | {row['config']} | "
                     f"{row['registers']} | {row['spill_stores']}/{row['spill_loads']} | {row['shared']} | "
                     f"{row['ptx_wgmma']} / {row['ptx_mma']} | {row['sass_hgmma']} / {row['sass_hmma']} / "
                     f"{row['sass_ffma']} | {uses} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON lines")
    parser.add_argument("--kernel", action="append", choices=list(LAUNCHES),
                        help="only this kernel (repeatable; default: all)")
    args = parser.parse_args(argv)
    kernels = args.kernel or list(LAUNCHES)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: compiling needs the compiled jit functions", file=sys.stderr)
        return 2
    # One process per target: ptxas dominates, and CI has two cores.
    with ProcessPoolExecutor(min(len(CAPABILITIES), os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [row for target in pool.map(target_rows, CAPABILITIES, [kernels] * len(CAPABILITIES))
                for row in target]
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
