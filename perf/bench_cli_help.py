"""How long the command line takes to answer: ``growlib --help`` and every subcommand's ``--help``, each in a
fresh process, against ``python -c pass`` (the interpreter's own start-up) and ``import torch`` (what the help
cost before torch was imported lazily).

Usage (from the repository root)::

    python perf/bench_cli_help.py --out perf/results/cli_help.md [--repeats 7]

Writes a markdown table of the median and the spread (min-max) of the wall time of each command over the
repeats, run interleaved so that a change of machine load hits every row alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from markdown_table import write_table

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "growlib --help": ["-m", "growlib", "--help"],
    "growlib train --help": ["-m", "growlib", "train", "--help"],
    "growlib compare --help": ["-m", "growlib", "compare", "--help"],
    "growlib check-kernels --help": ["-m", "growlib", "check-kernels", "--help"],
    "python -c 'import torch'": ["-c", "import torch"],
}


def wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per command")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    times = {label: [] for label in COMMANDS}
    for _ in range(args.repeats):
        for label, command in COMMANDS.items():
            times[label].append(wall_time(command))
    lines = [f"Wall time of each command in a fresh process, median (min-max) of {args.repeats}, interleaved; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
             "", "| command | median (s) | min-max (s) |", "|---|---|---|"]
    for label, values in times.items():
        lines.append(f"| `{label}` | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |")
    write_table(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
