"""Assemble perf/results/evidence.md from the `growlib compare` runs under perf/results/evidence/.

Each run folder (written by perf/experiments/evidence_*.sh) holds summary.csv / summary.md and the loss curves;
this puts them side by side with the source papers' headline claims, so every number in evidence.md comes from a
committed run.  Usage:  python perf/evidence_report.py [--results perf/results/evidence]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

#: The four source papers' headline claims, as the papers state them (full-scale runs, not reproduced here).
PAPER_CLAIMS = {
    "vcycle": "multi-level framework: -19% to -24% FLOPs on BERT/GPT base models; -51.6% on BERT-Large (3 levels)",
    "ode_multilevel": "ODE multilevel: -44% FLOPs",
    "mslt": "MSLT: more than 2.1x training speed",
    "ligo": "LiGO: -45% FLOPs, -40% wall time",
}


def _ratio(row: dict, key: str) -> str:
    value = row[key]
    return "not reached" if value == "" else f"{float(value):.2f}x"


def configuration_section(folder: Path) -> list[str]:
    summary_md = (folder / "summary.md").read_text().splitlines()
    header = summary_md[0] if summary_md and not summary_md[0].startswith("|") else folder.name
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [f"### {folder.name}", "", header, "",
             "| schedule | final val loss (mean, min-max) | FLOPs to baseline's final loss | wall time to it | "
             "seeds reaching it |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['schedule']} | {float(row['final_val_loss']):.3f} "
                     f"({float(row['final_val_loss_min']):.3f}-{float(row['final_val_loss_max']):.3f}) | "
                     f"{_ratio(row, 'flops_ratio')} | {_ratio(row, 'wall_ratio')} | {row['reached']}/{row['seeds']} |")
    lines += ["", f"![loss against FLOPs]({folder.name}/loss_vs_flops.png)", ""]
    return lines


def claims_section(folders: list[Path]) -> list[str]:
    lines = ["## Beside the papers' claims", "",
             "| method | paper's claim (full scale) | " + " | ".join(f"growlib, {f.name}" for f in folders) + " |",
             "|---|---|" + "---|" * len(folders)]
    measured = {}
    for folder in folders:
        with open(folder / "summary.csv") as f:
            for row in csv.DictReader(f):
                if row["flops_ratio"] == "":
                    cell = f"baseline loss not reached (final {float(row['final_val_loss']):.3f})"
                else:
                    cell = f"{(float(row['flops_ratio']) - 1) * 100:+.0f}% FLOPs, {row['reached']}/{row['seeds']} seeds"
                measured.setdefault(row["schedule"], []).append(cell)
    others = [name for name in measured if name not in PAPER_CLAIMS and name != "baseline"]
    for schedule in list(PAPER_CLAIMS) + others:
        claim = PAPER_CLAIMS.get(schedule, "(a classic operator, not one of the four source papers)")
        cells = measured.get(schedule, ["not run"] * len(folders))
        lines.append(f"| {schedule} | {claim} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "evidence"))
    args = parser.parse_args(argv)
    root = Path(args.results)
    folders = sorted(p for p in root.iterdir() if (p / "summary.csv").exists()) if root.exists() else []
    if not folders:
        print(f"no compare results under {root}: run perf/experiments/evidence_cpu.sh first", file=sys.stderr)
        return 1
    lines = ["# Evidence: compute saved against training from scratch", "",
             "Every schedule on the same FLOPs as the baseline (cheaper schedules get more steps), on the embedded "
             "Python-stdlib corpus; ratios are the FLOPs and wall time a method needs to reach the baseline's final "
             "validation loss (same seed) with a model of the final size (a coarse level or shallow stage passing "
             "it does not count), averaged over the seeds that reach it. Produced by "
             "`perf/experiments/evidence_cpu.sh` and this script.", ""]
    lines += claims_section(folders)
    lines += ["## Per configuration", ""]
    for folder in folders:
        lines += configuration_section(folder)
    out = root.parent / "evidence.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
