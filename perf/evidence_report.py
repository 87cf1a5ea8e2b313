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
    return f"not reached ({row['reached']}/{row['seeds']} seeds)" if value == "" else f"{float(value):.2f}x"


def _flops_ratio(row: dict) -> str:
    if row["flops_ratio"] == "":
        return _ratio(row, "flops_ratio")
    return f"{float(row['flops_ratio']):.2f}x ({float(row['flops_ratio_min']):.2f}-{float(row['flops_ratio_max']):.2f})"


def _loss_diff(row: dict) -> str:
    return (f"{float(row['loss_diff']):+.3f} ({float(row['loss_diff_min']):+.3f} to "
            f"{float(row['loss_diff_max']):+.3f})")


def configuration_section(folder: Path) -> list[str]:
    summary_md = (folder / "summary.md").read_text().splitlines()
    header = summary_md[0] if summary_md and not summary_md[0].startswith("|") else folder.name
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [f"### {folder.name}", "", header, "",
             "| schedule | lr | final val loss (mean, min-max) | loss - baseline at equal FLOPs (mean, min to max) | "
             "FLOPs to baseline's final loss (mean, min-max) | wall time to it | seeds reaching it |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lr = f"{float(row['lr']):g}" if row["lr"] else "-"
        lines.append(f"| {row['schedule']} | {lr} | {float(row['final_val_loss']):.3f} "
                     f"({float(row['final_val_loss_min']):.3f}-{float(row['final_val_loss_max']):.3f}) | "
                     f"{_loss_diff(row)} | {_flops_ratio(row)} | {_ratio(row, 'wall_ratio')} | "
                     f"{row['reached']}/{row['seeds']} |")
    if (folder / "tuning.md").exists():
        lines += ["", "Learning-rate sweep (mean final validation loss on the tuning seeds; the chosen one in bold):",
                  ""] + (folder / "tuning.md").read_text().splitlines()[2:]
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
                    cell = (f"baseline loss not reached on every seed ({row['reached']}/{row['seeds']}); "
                            f"loss {_loss_diff(row)}")
                else:
                    low, high = (float(row[k]) - 1 for k in ("flops_ratio_min", "flops_ratio_max"))
                    cell = (f"{(float(row['flops_ratio']) - 1) * 100:+.0f}% FLOPs ({low * 100:+.0f}% to "
                            f"{high * 100:+.0f}%), {row['reached']}/{row['seeds']} seeds; loss {_loss_diff(row)}")
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
             "Python-stdlib corpus, each arm (the baseline too) at its own learning rate, chosen by the same sweep "
             "on a seed that is not reported (`growlib compare`'s default protocol; each configuration's header and "
             "sweep table say how). Ratios are the FLOPs and wall time a method needs to reach the baseline's final "
             "validation loss (same seed) with a model of the final size (a coarse level or shallow stage passing "
             "it does not count); a method reaches it only if it does on every seed, and its loss difference at "
             "equal FLOPs is given either way. The eval noise in each header is the spread of one evaluation over "
             "disjoint validation subsets. Produced by `perf/experiments/evidence_cpu.sh` and this script.", ""]
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
