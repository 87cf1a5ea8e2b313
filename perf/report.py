"""Regenerate perf/results/PERFORMANCE.md from the latest run recorded in each benchmark's CSV.

Usage (from the repository root)::

    python perf/report.py                       # read perf/results/*.csv, write perf/results/PERFORMANCE.md
    python perf/report.py --results DIR         # the CSVs of a perf/gpu_run.sh run, DIR/PERFORMANCE.md
    python perf/report.py --results DIR --out FILE

Per kernel benchmark, one table of growlib's kernel against the eager PyTorch reference and torch.compile
(speed-up = baseline time / kernel time, so above 1 means the kernel is faster) and the kernel's fraction of
the ceiling that bounds it (copy bandwidth or bf16 matmul throughput, measured on the same GPU in the same
run), with the run's device, versions, commit and the Triton launch configurations that ran; then the
end-to-end rows (every schedule's stages and transitions) as measured.  Only rows measured on a GPU are read:
rows that name no device, and smoke rehearsals (``mode`` smoke-cpu-interpreter), are ignored; a benchmark
with none is reported as not yet measured on a GPU, and the script still exits 0.  It computes nothing but
ratios of the recorded numbers.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NOT_MEASURED = "not yet measured on a GPU"
RUN_KEYS = ("timestamp_utc", "git_commit", "device_name")  # one benchmark run (its rows share one environment)
GPU_MODE = "gpu"  # perf/common.py's ``mode`` of a real measurement (CSVs from before that column have none)


@dataclass(frozen=True)
class Table:
    """How to read one benchmark's rows: what identifies a measured case, which implementation is growlib's,
    which ones it is compared with, and which ceiling column applies."""

    title: str
    csv: str
    keys: tuple[str, ...]
    kernel: str
    baselines: tuple[str, ...]
    ceiling_column: str
    ceiling: str
    where: dict = field(default_factory=dict)
    kernel_alone_column: str | None = None  # the kernel's fraction of the ceiling in GPU time alone, if recorded


TABLES = (
    Table("Structured growth maps", "structured_map.csv", ("model", "dtype", "op", "scope"), "triton",
          ("eager", "compile"), "frac_copy_ceiling", "copy bandwidth",
          kernel_alone_column="kernel_frac_copy_ceiling"),
    Table("LiGO expansion (Kronecker-factored maps) of a bf16 model", "kron_expand.csv",
          ("growth", "tie", "map_dtype", "phase"), "triton", ("eager", "compile"), "frac_matmul_ceiling",
          "bf16 matmul"),
    Table("Frozen stack forward (freeze_forward)", "frozen.csv", ("model", "layers", "tokens"), "freeze_forward",
          ("eager", "compile"), "frac_matmul_ceiling", "bf16 matmul", {"bench": "stack_forward"}),
    Table("MSLT training step with a frozen bottom", "frozen.csv", ("model", "layers", "tokens"),
          "mslt_freeze_forward", ("full_backprop", "mslt_no_grad"), "frac_matmul_ceiling", "bf16 matmul",
          {"bench": "mslt_step"}),
)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


END_TO_END = "end_to_end.csv"
END_TO_END_COLUMNS = ("measurement", "schedule", "name", "detail", "median_ms", "tokens_per_s", "tflops",
                      "frac_matmul_ceiling")


def latest_run(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of the most recent run that was measured on a GPU (rows naming no device, and smoke
    rehearsals, are ignored)."""
    measured = [row for row in rows if row.get("device_name") and row.get("mode", GPU_MODE) == GPU_MODE]
    if not measured:
        return []
    newest = max(tuple(row.get(key, "") for key in RUN_KEYS) for row in measured)
    return [row for row in measured if tuple(row.get(key, "") for key in RUN_KEYS) == newest]


def number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN counts as missing


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def environment(row: dict[str, str]) -> str:
    capability = row.get("compute_capability", "")
    dirty = " (with uncommitted changes)" if row.get("git_dirty") == "yes" else ""
    parts = [f"{row.get('device_name')}" + (f" (compute capability {capability})" if capability else ""),
             f"driver {row.get('driver') or '?'}", f"CUDA {row.get('cuda_runtime') or '?'}",
             f"torch {row.get('torch') or '?'}", f"triton {row.get('triton') or '?'}",
             f"commit {row.get('git_commit') or '?'}{dirty}"]
    if row.get("compile_backend"):
        parts.append(f"torch.compile backend {row['compile_backend']}")
    ceilings = []
    if number(row.get("copy_ceiling_gbps")) is not None:
        ceilings.append(f"copy {number(row['copy_ceiling_gbps']):.0f} GB/s")
    if number(row.get("matmul_ceiling_tflops")) is not None:
        ceilings.append(f"bf16 matmul {number(row['matmul_ceiling_tflops']):.0f} TFLOP/s")
    text = f"Measured {row.get('timestamp_utc')} on " + ", ".join(parts) + "."
    return text + (f" Ceilings measured in the same run: {', '.join(ceilings)}." if ceilings else "")


def section(table: Table, rows: list[dict[str, str]]) -> list[str]:
    """The Markdown of one benchmark: its run, then one line per measured case."""
    lines = [f"## {table.title}", "", f"Source: `{table.csv}`" + (f" ({', '.join(f'{k}={v}' for k, v in table.where.items())})"
                                                             if table.where else ""), ""]
    rows = [row for row in latest_run(rows) if all(row.get(k) == v for k, v in table.where.items())]
    if not rows:
        return lines + [f"Status: {NOT_MEASURED}.", ""]
    lines += [environment(rows[0]), ""]
    by_case: dict[tuple, dict[str, dict[str, str]]] = {}
    for row in rows:
        by_case.setdefault(tuple(row.get(k, "") for k in table.keys), {})[row.get("impl", "")] = row
    header = [*table.keys, f"{table.kernel} ms", *(f"{b} ms" for b in table.baselines),
              *(f"speed-up vs {b}" for b in table.baselines), f"{table.kernel}, fraction of {table.ceiling}"]
    if table.kernel_alone_column:
        header.append(f"{table.kernel} kernel alone (GPU time), fraction of {table.ceiling}")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    launches, failures = [], []
    for case, impls in by_case.items():
        kernel = impls.get(table.kernel, {})
        kernel_ms = number(kernel.get("median_ms"))
        baseline_ms = [number(impls.get(b, {}).get("median_ms")) for b in table.baselines]
        speedups = [b / kernel_ms if b is not None and kernel_ms else None for b in baseline_ms]
        cells = [*case, _ms(kernel_ms), *map(_ms, baseline_ms), *map(_ratio, speedups),
                 _percent(number(kernel.get(table.ceiling_column)))]
        if table.kernel_alone_column:
            cells.append(_percent(number(kernel.get(table.kernel_alone_column))))
        lines.append("| " + " | ".join(cells) + " |")
        for impl, row in impls.items():
            if row.get("error"):
                failures.append(f"- {' / '.join(case)}, {impl}: {row['error']}")
        if kernel.get("triton_launches"):
            launches.append(kernel["triton_launches"])
    if failures:
        lines += ["", "Failed or skipped measurements (shown as -):", "", *failures]
    if launches:
        lines += ["", "Triton launch configurations that ran:", "", *(f"- `{text}`" for text in dict.fromkeys(launches))]
    return lines + [""]


def end_to_end_section(rows: list[dict[str, str]]) -> list[str]:
    """The end-to-end rows of the latest GPU run as recorded (perf/bench_end_to_end.py): one line each."""
    lines = ["## End to end: schedules' stages and transitions", "", f"Source: `{END_TO_END}`", ""]
    rows = latest_run(rows)
    if not rows:
        return lines + [f"Status: {NOT_MEASURED}.", ""]
    lines += [environment(rows[0]), "", "| " + " | ".join(END_TO_END_COLUMNS) + " | error |",
              "|" + "|".join("---" for _ in range(len(END_TO_END_COLUMNS) + 1)) + "|"]
    for row in rows:
        cells = [row.get(column, "") or "-" for column in END_TO_END_COLUMNS[:4]]
        cells += [_ms(number(row.get("median_ms"))), _ms(number(row.get("tokens_per_s"))),
                  _ms(number(row.get("tflops"))), _percent(number(row.get("frac_matmul_ceiling")))]
        lines.append("| " + " | ".join(cells) + f" | {row.get('error') or ''} |")
    return lines + [""]


def render(results: Path) -> tuple[str, int, int]:
    """The whole document, how many of its sections have GPU rows, and how many sections there are."""
    lines = ["# Performance", "",
             "Generated by `python perf/report.py` from the latest GPU run in each benchmark's CSV; "
             "`bash perf/gpu_run.sh DIR` on a GPU machine measures a new run.  "
             "Speed-up = baseline time / kernel time.", ""]
    measured = 0
    for table in TABLES:
        rows = read_rows(results / table.csv)
        measured += any(all(row.get(k) == v for k, v in table.where.items()) for row in latest_run(rows))
        lines += section(table, rows)
    end_to_end = read_rows(results / END_TO_END)
    measured += bool(latest_run(end_to_end))
    lines += end_to_end_section(end_to_end)
    return "\n".join(lines), measured, len(TABLES) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory holding the benchmarks' CSVs")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write (default RESULTS/PERFORMANCE.md)")
    args = parser.parse_args(argv)
    out = args.out or args.results / "PERFORMANCE.md"
    text, measured, sections = render(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if not measured:
        print(f"{NOT_MEASURED}: no benchmark CSV under {args.results} has rows from a GPU run "
              "(run `bash perf/gpu_run.sh DIR` on a machine with a CUDA GPU)")
    print(f"wrote {out}")
    print(f"key: {measured} of {sections} sections have GPU rows (smoke rows are never reported)")  # gpu_run.sh
    return 0


if __name__ == "__main__":
    sys.exit(main())
