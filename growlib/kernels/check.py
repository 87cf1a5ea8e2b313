"""``growlib check-kernels``: every Triton kernel against its PyTorch reference on this machine, as a table.

Runs the cases of ``growlib.kernels.cases`` (the ones tests/kernels runs) on CUDA when torch sees a GPU, and
otherwise on the CPU through Triton's interpreter, prints the worst error per kernel and dtype with the rule
it was judged by, and exits 1 if any case fails (2 on bad arguments).

Why it may re-run itself: Triton decides when a function is decorated with ``@triton.jit`` whether it is
compiled or interpreted, and that happens to Triton's own library (``tl.sum``, ``tl.cdiv`` are jit functions)
as soon as ``triton`` is imported, which torch does when its compiler stack (torch._dynamo) loads: importing
growlib already does that, long before any growlib kernel is touched.
Setting ``TRITON_INTERPRET=1`` inside a running process is therefore too late, however lazily growlib imports
its kernels.  So on a machine without a GPU, ``main`` (what ``growlib check-kernels`` calls) re-runs itself as
``python -m growlib.kernels.check`` in a fresh process started with the variable set, unless it is set
already; with a GPU, or with the variable set from the start (as tests/conftest.py does), it runs in place.
Either way it checks, before running a case, that Triton's and growlib's jit functions are the kind the device
needs, so a wrong set-up fails loudly instead of testing nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import triton
import triton.language.standard
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from growlib.kernels import cases as kernel_cases
from growlib.kernels.cases import Comparison, KernelCase, dtype_name

KERNEL_MODULES = ("structured_map", "kron_expand", "frozen.add_norm", "frozen.activation",
                  "frozen.rope_split_qkv")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_fresh_process() -> bool:
    """No GPU and no TRITON_INTERPRET=1 from the start: the kernels can only be checked in a new process."""
    return not torch.cuda.is_available() and not _interpreting()


def run_in_fresh_process(argv: Sequence[str]) -> int:
    """Run ``python -m growlib.kernels.check ARGV`` with TRITON_INTERPRET=1 and return its exit status."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.call([sys.executable, "-m", "growlib.kernels.check", *argv], env=env)


def check_device() -> torch.device:
    """CUDA when torch sees a GPU and the interpreter was not asked for, else the CPU through the interpreter.
    Raises RuntimeError unless every jit function (Triton's library and growlib's kernels) is interpreted on
    the CPU and compiled on CUDA."""
    device = torch.device("cuda" if torch.cuda.is_available() and not _interpreting() else "cpu")
    modules = [importlib.import_module(f"growlib.kernels.{name}") for name in KERNEL_MODULES]
    for module in [triton.language.standard, *modules]:
        for attr, value in vars(module).items():
            if not isinstance(value, (JITFunction, InterpretedFunction)):
                continue
            interpreted = isinstance(value, InterpretedFunction)
            if interpreted != (device.type == "cpu"):
                raise RuntimeError(
                    f"{module.__name__}.{attr} is {'interpreted' if interpreted else 'compiled'}, but the kernels "
                    f"are checked on {device.type}: TRITON_INTERPRET=1 must be set before triton is imported "
                    "(run `growlib check-kernels`, which sees to it) and only where no GPU is used")
    return device


# ----------------------------------------------------------------------------------------------------------
# Running and reporting
# ----------------------------------------------------------------------------------------------------------

@dataclass
class CaseResult:
    case: KernelCase
    comparisons: list[Comparison] = field(default_factory=list)
    error: str = ""  # the exception a case raised, if any

    @property
    def passed(self) -> bool:
        return not self.error and all(c.passed for c in self.comparisons)


def run_cases(cases: Sequence[KernelCase], device: torch.device) -> list[CaseResult]:
    """Run every case; an exception fails its case (and is recorded) rather than stopping the check."""
    results = []
    for case in cases:
        try:
            with warnings.catch_warnings():  # exp(-x) overflowing to inf is how activations reach their limits
                warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
                results.append(CaseResult(case, case.run(device)))
        except Exception as err:  # a crashing kernel is a failed check, reported with the others
            last = traceback.extract_tb(err.__traceback__)[-1]
            results.append(CaseResult(case, error=f"{type(err).__name__}: {err} ({last.filename}:{last.lineno})"))
    return results


@dataclass
class Row:
    """One line of the table: a kernel (forward or backward) in one dtype."""

    kernel: str
    dtype: torch.dtype
    rule: str
    cases: set = field(default_factory=set)
    failed: set = field(default_factory=set)
    worst_error: float | None = None
    worst_ratio: float | None = None


def table_rows(results: Sequence[CaseResult]) -> list[Row]:
    rows: dict[tuple[str, torch.dtype], Row] = {}

    def row(kernel: str, case: KernelCase) -> Row:
        key = (kernel, case.dtype)
        if key not in rows:
            rows[key] = Row(kernel, case.dtype, case.tolerance.describe(case.dtype))
        return rows[key]

    for result in results:
        case = result.case
        if result.error:
            r = row(case.kernel, case)
            r.cases.add(case.id)
            r.failed.add(case.id)
        for c in result.comparisons:
            r = row(f"{case.kernel} backward" if c.backward else case.kernel, case)
            r.cases.add(case.id)
            if not c.passed:
                r.failed.add(case.id)
            if c.worst_ratio is not None:
                r.worst_error = max(r.worst_error or 0.0, c.worst_error)
                r.worst_ratio = max(r.worst_ratio or 0.0, c.worst_ratio)
    return list(rows.values())


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def format_report(results: Sequence[CaseResult], device: torch.device) -> str:
    """The pass/fail table, the rule's legend and every failure."""
    columns = ("kernel", "dtype", "cases", "worst |err|/s", "worst err/allowed", "allowed |kernel - ref64|",
               "result")
    lines = [[r.kernel, dtype_name(r.dtype), str(len(r.cases)), _number(r.worst_error), _number(r.worst_ratio),
              r.rule, "FAIL" if r.failed else "PASS"] for r in table_rows(results)]
    widths = [max(len(text) for text in column) for column in zip(columns, *lines)]
    out = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
           for line in [columns, ["-" * w for w in widths], *lines]]
    out += ["",
            "ref64: the op's PyTorch reference in float64 on the kernel's own inputs; torch: the",
            "same reference in the inputs' dtype; s = max(1, |ref64|) per element (per tensor where written",
            "max(1,max|ref64|)); err/allowed <= 1 passes.  Property checks (bit-exact copies, shapes, signs) must",
            "hold too but have no error to show."]
    failed = [result for result in results if not result.passed]
    if failed:
        out += ["", "Failures:"]
        for result in failed:
            reasons = [result.error] if result.error else kernel_cases.failures(result.comparisons)
            out += [f"  {result.case.id}: {reason}" for reason in reasons]
    out += ["", f"{len(results) - len(failed)} of {len(results)} cases passed on {describe_device(device)}"
                + ("" if not failed else f"; {len(failed)} FAILED")]
    return "\n".join(out)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return "the CPU through Triton's interpreter (TRITON_INTERPRET=1)"


def parser() -> argparse.ArgumentParser:
    from growlib.cli import check_kernels_arguments

    p = argparse.ArgumentParser(prog="growlib check-kernels", description=__doc__.split("\n")[0])
    check_kernels_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if needs_fresh_process():
        return run_in_fresh_process(argv)
    device = check_device()
    cases = kernel_cases.quick_cases() if args.quick else kernel_cases.all_cases()
    if args.kernel:
        cases = [case for case in cases if case.op in args.kernel]
    print(f"growlib check-kernels: {len(cases)} cases on {describe_device(device)}; torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    results = run_cases(cases, device)
    print(format_report(results, device), flush=True)
    return 0 if all(result.passed for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
