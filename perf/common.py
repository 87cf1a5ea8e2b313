"""Helpers shared by the GPU benchmarks: the no-GPU exit, timing, hardware ceilings, run metadata, CSV output.

Every number a benchmark reports is measured on a CUDA GPU with ``triton.testing.do_bench`` (L2 flushed
before each run) and put next to what the same GPU can do at best, so a row reads as a fraction of a ceiling
rather than as a bare time."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
import triton
import triton.testing

REPO_ROOT = Path(__file__).resolve().parent.parent


def require_cuda() -> None:
    """Exit with status 2, printing no numbers, unless real kernels can run on a CUDA GPU.

    Times taken on the CPU, or under Triton's interpreter, say nothing about the kernels and must never end up
    next to real measurements."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernel timings cannot be taken under TRITON_INTERPRET (Triton's CPU interpreter); unset it",
              file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("kernel timings need a CUDA GPU; this machine has none", file=sys.stderr)
        sys.exit(2)


def time_fn(fn: Callable[[], object], min_runs: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` over at least ``min_runs`` timed runs.

    ``do_bench`` sizes its run count from a 100 ms budget, which gives a single sample for a slow eager
    baseline; the budget is stretched so every quantile rests on several runs.  The first call (JIT
    compilation, torch.compile tracing) is a warm-up and never timed."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    median, p20, p80 = triton.testing.do_bench(fn, rep=max(100.0, min_runs * once_ms), quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """What this GPU does at best: device-to-device copy bandwidth (GB/s, read + write bytes of a 1 GiB copy)
    and dense bf16 matmul throughput (TFLOP/s, 8192^3)."""
    src = torch.empty(2 ** 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms, _, _ = time_fn(lambda: dst.copy_(src))
    copy_bytes = 2 * src.numel() * src.element_size()

    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    matmul_ms, _, _ = time_fn(lambda: torch.mm(a, b, out=c))
    return {"copy_ceiling_gbps": copy_bytes / (copy_ms * 1e6),
            "matmul_ceiling_tflops": 2 * n ** 3 / (matmul_ms * 1e9)}


def _command_output(args: list[str]) -> str:
    """First line of a command's output, or "" when the command is missing or fails."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if lines else ""


def environment_row() -> dict[str, str]:
    """The facts a timing depends on (GPU, driver, library versions, commit and whether the working tree had
    uncommitted changes, time), one value each, for every CSV row; anything that cannot be found is left
    empty.  Each benchmark adds the Triton launch configurations that ran (``triton_launches``)."""
    on_gpu = torch.cuda.is_available()
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"])
    return {
        "device_name": torch.cuda.get_device_name() if on_gpu else "",
        "compute_capability": "%d.%d" % torch.cuda.get_device_capability() if on_gpu else "",
        "cuda_runtime": torch.version.cuda or "",
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_commit": commit,
        "git_dirty": ("yes" if _command_output(["git", "status", "--porcelain", "--untracked-files=no"]) else "no")
        if commit else "",
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def append_csv(path: str | Path, rows: Iterable[dict]) -> None:
    """Append dict rows to a CSV file, writing the header first when the file is new.

    Refuses a file whose header differs from the rows' keys: rows of differently shaped runs never mix in one
    table (write to another --out directory instead)."""
    rows = list(rows)
    if not rows:
        return
    path = Path(path)
    fields = list(rows[0])
    is_new = not path.exists() or path.stat().st_size == 0
    if not is_new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has columns {header}, but these rows have {fields}: write elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if is_new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    # ``python perf/common.py``: the gate ``make bench`` passes before anything is timed.
    require_cuda()
    print(f"kernel timings can be taken here: {torch.cuda.get_device_name()}")


def elapsed_logger() -> Callable[[str], None]:
    """A progress log to stderr, each line stamped with the seconds since the logger was made (numbers a
    benchmark reports go to stdout and its CSV, never here)."""
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return log


class BenchmarkStart(NamedTuple):
    log: Callable[[str], None]
    csv_path: Path
    environment: dict[str, str]
    ceilings: dict[str, float]


def start_benchmark(out_dir: Path, csv_name: str) -> BenchmarkStart:
    """What every benchmark does before it times anything: exit unless on a CUDA GPU, make ``out_dir``, record
    the environment, measure this GPU's copy and matmul ceilings and log them."""
    require_cuda()
    log = elapsed_logger()
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = environment_row()
    ceilings = measure_ceilings(torch.device("cuda"))
    log(f"{environment['device_name']}: copy {ceilings['copy_ceiling_gbps']:.0f} GB/s, "
        f"bf16 matmul {ceilings['matmul_ceiling_tflops']:.0f} TFLOP/s")
    return BenchmarkStart(log, out_dir / csv_name, environment, ceilings)


def print_table(rows: list[dict], columns: list[str], number_format: str = ".3f") -> None:
    """Rows as a tab-separated table on stdout: floats in ``number_format``, missing values as '-'."""
    def cell(value) -> str:
        return "-" if value is None else format(value, number_format) if isinstance(value, float) else str(value)

    print("\t".join(columns))
    for row in rows:
        print("\t".join(cell(row[c]) for c in columns))
