"""The structured-map kernel's tile shape against its GPU time alone, on BERT-Large's coalesce and de-coalesce.

Usage (from the repository root)::

    python perf/sweep_structured_map.py --out DIR                   # on a CUDA GPU: DIR/structured_map_tiles.csv
    python perf/sweep_structured_map.py --out DIR --time-limit 30   # start no configuration after ~30 s
    TRITON_INTERPRET=1 python perf/sweep_structured_map.py --out DIR --smoke   # CPU rehearsal, a tiny BERT

On an H200 the kernel moved 7-19% of the copy bandwidth, and its fraction followed the bytes a program moves
(docs/performance.md#results): coalesce, 13 KB a program, 19%; de-coalesce, 2.2 KB a program, 7%.  If each
program's chain of dependent loads (schedule, task, table rows, data) is what bounds it, larger tiles (more
bytes a chain) or fewer warps a program (more programs an SM) raise the fraction; if bandwidth bounds it,
no tile does.  This sweep measures which, before the kernel is redesigned.

Every tile shape runs the same recorded whole-model call of ``structured_map_triton``, with
``launch_config`` patched to return that shape; its output must equal the default shape's bit for bit (a tile
only decides which program writes which elements).  The time is the kernel's own GPU time (the profiler's),
so the launcher's host work is left out.  One CSV row per (op, tile); the table is printed last.
"""

from __future__ import annotations

import argparse
import sys

import torch

from growlib.kernels import structured_map as kernel

from bench_structured_map import (CASES, SMOKE_CASES, KernelCall, ModelCase, _patched, build_model, build_ops,
                                  bytes_moved, record_kernel_calls, run_calls, triton_programs)
from common import (BenchmarkStart, add_benchmark_arguments, append_csv, device_kernel_ms, fraction, print_key,
                    print_table, start_benchmark)

# (BLOCK_R, BLOCK_C, num_warps): the default first, then more bytes a program, then fewer warps a program.
TILES = ((16, 64, 8), (32, 64, 8), (16, 128, 8), (64, 64, 8), (8, 64, 4), (16, 64, 4))
SMOKE_TILES = ((16, 64, 8), (32, 64, 8))
OPS = ("coalesce", "decoalesce")
MEASURE_S = {"cuda": 2.5, "cpu": 2.0}  # a tile shape's JIT compile and profiled runs
BUILD_S = {"cuda": 8.0, "cpu": 3.0}


def outputs(calls: list[KernelCall]) -> list[torch.Tensor]:
    return [out.clone() for call in calls for out in call.dst]


def measure_tile(start: BenchmarkStart, case: ModelCase, name: str, calls: list[KernelCall], moved: int,
                 expected: list[torch.Tensor], tile: tuple[int, int, int]) -> dict:
    """One (op, tile shape) row: the output checked against the default shape's, then the kernel's GPU time."""
    device, deadline = start.device, start.deadline
    block_r, block_c, num_warps = tile
    ms = None
    with _patched(kernel, "launch_config", lambda capability: tile):
        row = {"model": case.name, "dtype": str(case.dtype).removeprefix("torch."), "op": name,
               "block_r": block_r, "block_c": block_c, "num_warps": num_warps,
               "programs": triton_programs(calls), "bytes_moved": moved,
               "kernel_device_ms": None, "frac_copy_ceiling": None, "same_as_default": None, "error": ""}
        if not deadline.allows(MEASURE_S[device.type]):
            row["error"] = deadline.refusal("a tile shape", MEASURE_S[device.type])
        else:
            run_calls(calls, kernel.structured_map_triton)
            row["same_as_default"] = all(torch.equal(got, want) for got, want in zip(outputs(calls), expected))
            ms = device_kernel_ms(lambda: run_calls(calls, kernel.structured_map_triton), device,
                                  "_structured_map_kernel")
            row["kernel_device_ms"] = ms
            row["frac_copy_ceiling"] = fraction(moved / (ms * 1e6) if ms else None,
                                                start.ceilings["copy_ceiling_gbps"])
    row.update(start.ceilings, **start.environment)
    append_csv(start.csv_path, [row])
    outcome = row["error"] or (f"{ms:.3f} ms" if ms else "ran (no GPU time off CUDA)")
    start.log(f"  {name} {block_r}x{block_c} w={num_warps}: {outcome}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_benchmark_arguments(parser, "structured_map_tiles.csv")
    args = parser.parse_args(argv)
    start = start_benchmark(args, "structured_map_tiles.csv")
    device, deadline = start.device, start.deadline
    case = (SMOKE_CASES if start.smoke else CASES)[0]
    tiles = SMOKE_TILES if start.smoke else TILES
    rows = []
    if not deadline.allows(BUILD_S[device.type]):
        start.log(deadline.refusal("building the model", BUILD_S[device.type]))
        print_key("0 tile shapes measured: no time left to build the model")
        return 0
    with torch.no_grad():
        fine = build_model(case, device)
        ops = {op.name: op for op in build_ops(fine)}
        recorded = {}  # op name: (its calls, bytes moved, the default tile shape's outputs)
        for name in OPS:
            calls = record_kernel_calls(ops[name])
            run_calls(calls, kernel.structured_map_triton)
            recorded[name] = (calls, bytes_moved(calls), outputs(calls))
        # Tile shapes outside, ops inside: a time limit cuts shapes, never one op's whole column.
        for block_r, block_c, num_warps in tiles:
            for name, (calls, moved, expected) in recorded.items():
                rows.append(measure_tile(start, case, name, calls, moved, expected, (block_r, block_c, num_warps)))
    print_table(rows, ["op", "block_r", "block_c", "num_warps", "programs", "kernel_device_ms",
                       "frac_copy_ceiling", "same_as_default", "error"])
    measured = [r for r in rows if r["same_as_default"] is not None]
    differ = [r for r in measured if not r["same_as_default"]]
    best = max((r for r in measured if r["frac_copy_ceiling"]), key=lambda r: r["frac_copy_ceiling"], default=None)
    key = f"{len(measured)}/{len(rows)} tile shapes measured, {len(differ)} differing from the default"
    if best:
        key += (f"; best {best['op']} {best['block_r']}x{best['block_c']} w={best['num_warps']}: "
                f"{100 * best['frac_copy_ceiling']:.0f}% of copy")
    print_key(key)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
