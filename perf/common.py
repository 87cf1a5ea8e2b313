"""Helpers shared by the kernel benchmarks: the device gate, timing, hardware ceilings, time budgets, run
metadata, CSV output.

On a CUDA GPU every number is measured with ``triton.testing.do_bench`` (L2 flushed before each run) and put
next to what the same GPU can do at best, so a row reads as a fraction of a ceiling rather than as a bare time.
``--smoke`` runs the same code on the CPU through Triton's interpreter at tiny shapes, so that the benchmarks
(and perf/gpu_run.sh) are rehearsed where there is no GPU; every smoke row says so in its ``mode`` column,
and its times say nothing about the kernels."""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
import triton
import triton.testing

REPO_ROOT = Path(__file__).resolve().parent.parent
GPU, SMOKE = "gpu", "smoke-cpu-interpreter"  # the ``mode`` column
# Seconds one torch.compile graph is assumed to take until this process has compiled one: 20-60 s were seen on
# the H200 machine for a cold inductor (the first graph pays its warm-up), so the low end, after which the
# measured time takes over; aot_eager only traces.
COMPILE_PRIOR_S = {"inductor": 20.0, "aot_eager": 2.0}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_cuda() -> None:
    """Exit with status 2, printing no numbers, unless real kernels can run on a CUDA GPU.

    Times taken on the CPU, or under Triton's interpreter, say nothing about the kernels and must never end up
    next to real measurements."""
    if interpreting():
        print("kernel timings cannot be taken under TRITON_INTERPRET (Triton's CPU interpreter); unset it, or "
              "pass --smoke for a rehearsal that times nothing worth reading", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("kernel timings need a CUDA GPU; this machine has none (--smoke rehearses the benchmark on the "
              "CPU)", file=sys.stderr)
        sys.exit(2)


def require_device(smoke: bool) -> torch.device:
    """CUDA for a real run (exit 2 without one); the CPU for ``--smoke``, which needs TRITON_INTERPRET=1 in the
    environment before Python starts (Triton decides at import time whether its functions are interpreted)."""
    if not smoke:
        require_cuda()
        return torch.device("cuda")
    if not interpreting():
        print("--smoke runs the Triton kernels through Triton's interpreter: start Python with TRITON_INTERPRET=1 "
              "in the environment (perf/gpu_run.sh --smoke does)", file=sys.stderr)
        sys.exit(2)
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, min_runs: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` over at least ``min_runs`` timed runs.

    On CUDA, ``do_bench``'s 100 ms budget is stretched so that a slow baseline still gets several runs, and
    the first call (JIT compilation, torch.compile tracing) is a warm-up, never timed.  On the CPU (smoke
    runs, where the benchmarks have already made that first call) one ``perf_counter`` run: only the code
    path is rehearsed there."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        once_ms = (time.perf_counter() - start) * 1e3
        return once_ms, once_ms, once_ms
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    median, p20, p80 = triton.testing.do_bench(fn, rep=max(100.0, min_runs * once_ms), quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def device_kernel_ms(fn: Callable[[], object], device: torch.device, kernel_name: str, runs: int = 5) -> float | None:
    """Milliseconds a call of ``fn`` keeps the GPU busy in kernels whose name contains ``kernel_name``, as the
    profiler (CUPTI) records them: the kernels alone (``kernel_name=""``: every GPU activity, copies and fills
    included).  do_bench's times also hold the host's work between launches whenever the host is the slower
    side, and the two together say which side bounds a call.  None on the CPU, or if the profiler is
    unavailable or records no such kernel."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(runs):
                fn()
            torch.cuda.synchronize(device)
        busy_us = sum(event.self_device_time_total for event in profile.key_averages() if kernel_name in event.key)
    except Exception as err:  # a machine without CUPTI: the column stays empty, the benchmark goes on
        print(f"profiler unavailable: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    return busy_us / runs / 1e3 if busy_us else None


def measure_ceilings(device: torch.device) -> dict[str, float | None]:
    """What this GPU does at best: device-to-device copy bandwidth (GB/s, read + write bytes of a 1 GiB copy)
    and dense bf16 matmul throughput (TFLOP/s, 8192^3).  Not measured on the CPU (None: n/a)."""
    if device.type != "cuda":
        return {"copy_ceiling_gbps": None, "matmul_ceiling_tflops": None}
    src = torch.randn(2 ** 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms, _, _ = time_fn(lambda: dst.copy_(src), device)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst

    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    matmul_ms, _, _ = time_fn(lambda: torch.mm(a, b, out=c), device)
    return {"copy_ceiling_gbps": copy_bytes / (copy_ms * 1e6),
            "matmul_ceiling_tflops": 2 * n ** 3 / (matmul_ms * 1e9)}


def fraction(value: float | None, ceiling: float | None) -> float | None:
    return value / ceiling if value is not None and ceiling else None


# ----------------------------------------------------------------------------------------------------------
# Time budgets
# ----------------------------------------------------------------------------------------------------------

def seconds_since_process_start() -> float:
    """How long this process has run, imports included (Linux's /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Deadline:
    """What is left of a benchmark's ``--time-limit``, counted from the start of the process (the imports of
    torch and transformers take 5-10 s).  A benchmark starts a measurement only when its estimated cost fits,
    so it stops in time with everything measured so far already written."""

    def __init__(self, seconds: float | None):
        self._end = None if seconds is None else time.monotonic() + seconds - seconds_since_process_start()

    def left(self) -> float:
        return math.inf if self._end is None else self._end - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s

    def refusal(self, what: str, estimate_s: float) -> str:
        """The ``error`` cell of a measurement the time limit left out."""
        return f"skipped: {what} needs ~{estimate_s:.0f} s, {max(self.left(), 0):.0f} s of --time-limit left"


class CompileEstimate:
    """Seconds per torch.compile graph on this machine: a prior (``COMPILE_PRIOR_S``) until this process has
    compiled something, then the latest measured time per graph (the first one includes the compiler's
    warm-up, so the estimate starts pessimistic)."""

    def __init__(self, backend: str):
        self.per_graph_s = COMPILE_PRIOR_S[backend]

    def cost(self, graphs: int) -> float:
        return graphs * self.per_graph_s

    def record(self, seconds: float, graphs: int) -> None:
        if graphs > 0:
            self.per_graph_s = seconds / graphs


def graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class FirstCall(NamedTuple):
    result: object
    seconds: float
    triton_launches: str  # the Triton launch configurations it used (growlib.kernels.launch.summarize)
    compile_graphs: int   # graphs torch.compile built during it


def first_call(fn: Callable[[], object], device: torch.device) -> FirstCall:
    """The first, untimed-by-do_bench run of ``fn``, where Triton's JIT and torch.compile do their work: its
    result and wall seconds, what it launched and how many graphs it compiled.  Exceptions propagate (the
    caller decides whether it is a compile failure or a bug)."""
    from growlib.kernels.launch import recorded, summarize
    graphs_before = graphs_compiled()
    synchronize(device)
    started = time.perf_counter()
    with recorded() as records:
        result = fn()
    synchronize(device)
    return FirstCall(result, time.perf_counter() - started, summarize(records), graphs_compiled() - graphs_before)


def compile_failure(impl: str, err: Exception) -> str:
    """The one-line message recorded when torch.compile fails; a failure of any other implementation is a
    bug and is raised again."""
    if impl != "compile":
        raise err
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


# ----------------------------------------------------------------------------------------------------------
# Run metadata and output
# ----------------------------------------------------------------------------------------------------------

def _command_output(args: list[str]) -> str:
    """First line of a command's output, or "" when the command is missing or fails."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if lines else ""


def environment_row(device: torch.device, compile_backend: str) -> dict[str, str]:
    """The facts a timing depends on (mode, GPU, driver, library versions, compile backend, commit and whether
    the working tree had uncommitted changes, time), one value each, for every CSV row; anything that cannot
    be found is left empty.  Each benchmark adds the Triton launch configurations that ran."""
    on_gpu = device.type == "cuda"
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"])
    return {
        "mode": GPU if on_gpu else SMOKE,
        "device_name": torch.cuda.get_device_name(device) if on_gpu else "",
        "compute_capability": "%d.%d" % torch.cuda.get_device_capability(device) if on_gpu else "",
        "cuda_runtime": torch.version.cuda or "",
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "compile_backend": compile_backend,
        "git_commit": commit,
        "git_dirty": ("yes" if _command_output(["git", "status", "--porcelain", "--untracked-files=no"]) else "no")
        if commit else "",
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def append_csv(path: str | Path, rows: Iterable[dict]) -> None:
    """Append dict rows to a CSV file, writing the header first when the file is new.  Benchmarks call it
    once per measurement, so a run cut short keeps every row it finished.

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


def elapsed_logger() -> Callable[[str], None]:
    """A progress log to stderr, each line stamped with the seconds since the logger was made (numbers a
    benchmark reports go to stdout and its CSV, never here)."""
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def add_benchmark_arguments(parser: argparse.ArgumentParser, csv_name: str) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--out", type=Path, required=True,
                        help=f"directory for {csv_name} (appended, one row per measurement)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU through Triton's interpreter (needs TRITON_INTERPRET=1): "
                             "rehearses the code, times nothing worth reading")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no measurement that would not finish within SECONDS of the process's start "
                             "(imports included); what is left out is logged and written as skipped "
                             "(default: no limit)")


class BenchmarkStart(NamedTuple):
    log: Callable[[str], None]
    csv_path: Path
    device: torch.device
    environment: dict[str, str]
    ceilings: dict[str, float | None]
    deadline: Deadline
    compile_backend: str

    @property
    def smoke(self) -> bool:
        return self.device.type != "cuda"


def start_benchmark(args: argparse.Namespace, csv_name: str) -> BenchmarkStart:
    """What every benchmark does before it times anything: check the device (exit 2 without a CUDA GPU unless
    ``--smoke``), start the time budget, make the output folder, record the environment, measure this GPU's
    copy and matmul ceilings and log them.  Smoke runs compile with ``aot_eager``: a cold inductor spends
    40-60 s building its C++ kernels on a 2-core CPU, which the rehearsal cannot afford."""
    device = require_device(args.smoke)
    deadline = Deadline(args.time_limit)
    log = elapsed_logger()
    args.out.mkdir(parents=True, exist_ok=True)
    compile_backend = "aot_eager" if args.smoke else "inductor"
    environment = environment_row(device, compile_backend)
    ceilings = measure_ceilings(device)
    if args.smoke:
        log("smoke run on the CPU through Triton's interpreter: rows are marked mode=smoke-cpu-interpreter and "
            "their times are not kernel timings")
    else:
        log(f"{environment['device_name']}: copy {ceilings['copy_ceiling_gbps']:.0f} GB/s, "
            f"bf16 matmul {ceilings['matmul_ceiling_tflops']:.0f} TFLOP/s")
    return BenchmarkStart(log, args.out / csv_name, device, environment, ceilings, deadline, compile_backend)


def print_table(rows: list[dict], columns: list[str], number_format: str = ".3f") -> None:
    """Rows as a tab-separated table on stdout: floats in ``number_format``, missing values as '-'."""
    def cell(value) -> str:
        return "-" if value is None else format(value, number_format) if isinstance(value, float) else str(value)

    print("\t".join(columns))
    for row in rows:
        print("\t".join(cell(row.get(c)) for c in columns))


def print_key(text: str) -> None:
    """The benchmark's one-line result, last on stdout: perf/gpu_run.sh puts it in its summary table."""
    print(f"key: {text}", flush=True)


def run_cases(start: BenchmarkStart, cases: Iterable, needed_s: float, label: Callable[[object], str],
              measure_plain: Callable[[object], object], measure_compiled: Callable[[object], None]) -> bool:
    """Every case's eager and Triton rows first, in the cases' order of value, then the torch.compile rows of the
    cases that were measured: compiled graphs are large and of uncertain compile time, so they get what the
    cheaper rows leave.  A case is started only when ``needed_s`` fits the time limit; ``measure_plain(case)``
    returns what ``measure_compiled`` takes.  A case that raises is logged and the others still run; returns
    whether any raised (the benchmark's exit status says so)."""
    measured, failed = [], False
    for case in cases:
        if not start.deadline.allows(needed_s):
            start.log(f"{label(case)}: not started, " + start.deadline.refusal("a case", needed_s))
            continue
        try:
            measured.append(measure_plain(case))
        except Exception:
            traceback.print_exc()
            failed = True
    for item in measured:
        try:
            measure_compiled(item)
        except Exception:
            traceback.print_exc()
            failed = True
    return failed


def measured_count(rows: list[dict]) -> str:
    """'M/N measured (C compile)': the start of every benchmark's key line."""
    measured = [r for r in rows if r["median_ms"] is not None]
    compiled = sum(1 for r in measured if r["impl"] == "compile")
    return f"{len(measured)}/{len(rows)} measured ({compiled} compile)"


def speedups(rows: list[dict], case_columns: tuple[str, ...], faster: str, baseline: str) -> list[float]:
    """``baseline``'s median time over ``faster``'s, for every case (rows equal in ``case_columns``) where both
    were measured."""
    ms = {(tuple(r[c] for c in case_columns), r["impl"]): r["median_ms"] for r in rows if r["median_ms"] is not None}
    return [ms[(case, baseline)] / value for (case, impl), value in ms.items()
            if impl == faster and (case, baseline) in ms]
