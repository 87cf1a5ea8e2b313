"""What importing growlib costs: ``import growlib`` and the first use of its main entry points, each in a fresh
process, against importing what they stand on, torch and transformers -- the target is at most 1.2x that.
(``import transformers`` alone is lazy and loads no torch; the first growlib name a user touches needs torch.)

growlib names Hugging Face classes in its adapters instead of importing them, so no ``transformers.models.*``
modeling module loads until a model is built; each row also lists the modeling modules its import loaded.

Usage (from the repository root)::

    python perf/bench_import.py --out perf/results/import_time.md [--repeats 7]

Writes a markdown table of the median and the spread (min-max) of the wall time of each import over the
repeats, run interleaved so that a change of machine load hits every row alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from markdown_table import write_table

BASELINE = "import torch, transformers"
IMPORTS = {
    "import torch": "import torch",
    "import transformers": "import transformers",
    BASELINE: "import torch, transformers",
    "import growlib": "import growlib",
    "from growlib import coalesce": "from growlib import coalesce; coalesce",
    "from growlib import widen, grow_depth": "from growlib import widen, grow_depth; widen, grow_depth",
    "from growlib import LiGO": "from growlib import LiGO; LiGO",
    "from growlib import freeze_forward": "from growlib import freeze_forward; freeze_forward",
    "from growlib import kron_expand": "from growlib import kron_expand; kron_expand",
}
TARGET_RATIO = 1.2
#: printed by each child process: the HF modeling modules its import loaded
REPORT = "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('transformers.models.')" \
         " and '.modeling_' in m)))"


def timed_import(statement: str) -> tuple[float, list[str]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", f"{statement}\n{REPORT}"], check=True, capture_output=True,
                          text=True)
    return time.perf_counter() - started, json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per import")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    times: dict[str, list[float]] = {label: [] for label in IMPORTS}
    modeling: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for label, statement in IMPORTS.items():
            seconds, loaded = timed_import(statement)
            times[label].append(seconds)
            modeling[label] = loaded
    baseline = statistics.median(times[BASELINE])
    lines = [f"Wall time of each import in a fresh process (interpreter start-up included), median (min-max) of "
             f"{args.repeats}, interleaved; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}.  Target: growlib's rows at most {TARGET_RATIO}x "
             f"`{BASELINE}`.", "",
             f"| import | median (s) | min-max (s) | vs `{BASELINE}` | HF modeling modules loaded |",
             "|---|---|---|---|---|"]
    over = []
    for label, values in times.items():
        ratio = statistics.median(values) / baseline
        if "growlib" in label and ratio > TARGET_RATIO:
            over.append(label)
        loaded = ", ".join(m.removeprefix("transformers.models.") for m in modeling[label]) or "none"
        lines.append(f"| `{label}` | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} | "
                     f"{ratio:.2f}x | {loaded} |")
    lines += ["", f"Over the target: {', '.join(over)}." if over else "Every growlib row is within the target."]
    write_table(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
