"""What to do with the optimizer's momentum when a multilevel schedule changes level: measured.

The ODE multilevel paper (Lauga et al.) leaves momentum across levels open; the V-cycle paper resets it.
This trains both schedules under each of growlib's optimizer policies on the same budget, seeds and data
(tiny GPT-2 on the embedded Python-stdlib corpus, as `make demo`) and writes the final validation losses:

* ``reset``: a fresh AdamW at every transition (both papers' code);
* ``keep``:  a fine level resumes its own Adam moments after the coarse phase;
* ``map``:   keep, and each coarse level starts from the fine moments mapped like gradients.

Training losses, not kernel timings, so it runs on the CPU:
    python perf/momentum_policies.py [--steps 400] [--seeds 0,1] [--out perf/results/momentum]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

from growlib.train.experiment import Experiment, prepare_data, run
from growlib.train.config import TrainConfig

POLICIES = ("reset", "keep", "map")
SCHEDULES = ("ode_multilevel", "vcycle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "momentum"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    exp = Experiment(family="gpt2", size="tiny", total_steps=args.steps, config=TrainConfig(eval_every=50))
    prepared = prepare_data(exp)
    rows = []
    runs = [("baseline", "reset")] + [(s, p) for s in SCHEDULES for p in POLICIES]
    for schedule, policy in runs:
        options = {} if schedule == "baseline" else {"optimizer_policy": policy}
        losses = []
        started = time.perf_counter()
        for seed in seeds:
            losses.append(run(exp, schedule, seed, options, prepared).final_val_loss)
        rows.append({"schedule": schedule, "optimizer_policy": "-" if schedule == "baseline" else policy,
                     "mean_val_loss": statistics.mean(losses), "min_val_loss": min(losses),
                     "max_val_loss": max(losses), "seeds": len(seeds)})
        print(f"{schedule:>15} {rows[-1]['optimizer_policy']:>6}: val loss {rows[-1]['mean_val_loss']:.4f} "
              f"({min(losses):.4f}-{max(losses):.4f}) in {time.perf_counter() - started:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Optimizer policy across levels: gpt2 tiny, {args.steps} steps x {exp.config.batch_size} x "
             f"{exp.config.seq_len} tokens each, seeds {seeds}, data python stdlib, torch {torch.__version__}", "",
             "| schedule | optimizer policy | final val loss (mean) | min - max over seeds |", "|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['optimizer_policy']} | {r['mean_val_loss']:.4f} | "
              f"{r['min_val_loss']:.4f} - {r['max_val_loss']:.4f} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
