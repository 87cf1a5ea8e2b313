"""Writing a benchmark's markdown table, for the light benchmarks that must not import torch or triton through
perf/common.py (the command line's and import's timings, the CPU path's, the distributed memory)."""

from __future__ import annotations


def write_table(path: str, lines: list[str]) -> None:
    """Write ``lines`` to ``path`` as one markdown file (ending in a newline) and print them."""
    table = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(table)
    print(table)
