"""Why do some schedules save nothing at small scale, and which recipe does?  Each candidate recipe of the
multilevel and layerwise schedules (stage shares, cycles, LR restarts, freezing) trains on the same FLOPs as
the baseline, on the same seeds and data, and is scored like the evidence table: the FLOPs it needs to reach
the baseline's final validation loss.  The defaults in growlib/schedules/ were chosen from these tables.

    python perf/experiments/tune_schedules.py --schedules ode_multilevel,mslt,vcycle [--size tiny]
        [--steps 400] [--seeds 0,1] [--out perf/results/tuning/gpt2-4x128]   (a folder per schedule)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from growlib.train.compare import summarize, write_summary
from growlib.train.experiment import Experiment, prepare_data, run, schedule_flops
from growlib.train.config import TrainConfig

# The defaults before tuning, spelled out so that these recipes keep meaning what they say now that the
# defaults have changed.  "quarters" / "half" layer counts resolve for the model's depth (see ``resolve``).
OLD_ODE = {"cycles": 2, "pre_share": 0.1, "coarse_share": 0.6}
OLD_MSLT = {"layer_counts": "quarters", "joint_fraction": 0.1, "freeze_embeddings": True, "frozen_forward": True}
OLD_VCYCLE = {"coarsest_fraction": 0.5, "alpha": 0.25}
EMBEDDINGS_TRAINABLE = {"freeze_embeddings": False, "frozen_forward": False}
CYCLE_1_COARSE_08 = {"cycles": 1, "coarse_share": 0.8, "pre_share": 0.05}

# (label, schedule options, lr_schedule); each schedule's first recipe is its old default.  A first look
# varied one thing at a time (LR restarts, cycles, stage shares, freezing); these keep the variations that
# mattered and combine them.
RECIPES = {
    "ode_multilevel": [
        ("old default (cycles=2 coarse_share=0.6 pre_share=0.1)", OLD_ODE, "restart"),
        ("cycles=1", {**OLD_ODE, "cycles": 1}, "restart"),
        ("cycles=1, continue LR", {**OLD_ODE, "cycles": 1}, "continue"),
        ("coarse_share=0.8 pre_share=0.05, continue LR", {**OLD_ODE, "coarse_share": 0.8, "pre_share": 0.05},
         "continue"),
        ("cycles=1 coarse_share=0.8 pre_share=0.05", CYCLE_1_COARSE_08, "restart"),
        ("cycles=1 coarse_share=0.8 pre_share=0.05, continue LR", CYCLE_1_COARSE_08, "continue"),
        ("cycles=1 coarse_share=0.9 pre_share=0.05, continue LR",
         {"cycles": 1, "coarse_share": 0.9, "pre_share": 0.05}, "continue"),
    ],
    "mslt": [
        ("old default (embeddings frozen, joint_fraction=0.1)", OLD_MSLT, "restart"),
        ("joint_fraction=0.4", {**OLD_MSLT, "joint_fraction": 0.4}, "restart"),
        ("embeddings trainable, joint_fraction=0.4", {**OLD_MSLT, **EMBEDDINGS_TRAINABLE, "joint_fraction": 0.4},
         "restart"),
        ("embeddings trainable, joint_fraction=0.6", {**OLD_MSLT, **EMBEDDINGS_TRAINABLE, "joint_fraction": 0.6},
         "restart"),
        ("embeddings trainable, layer_counts=half,full joint_fraction=0.4",
         {**OLD_MSLT, **EMBEDDINGS_TRAINABLE, "layer_counts": "half", "joint_fraction": 0.4}, "restart"),
    ],
    "vcycle": [
        ("old default (coarsest_fraction=0.5 alpha=0.25)", OLD_VCYCLE, "restart"),
        ("continue LR", OLD_VCYCLE, "continue"),
        ("coarsest_fraction=0.7", {**OLD_VCYCLE, "coarsest_fraction": 0.7}, "restart"),
        ("alpha=0.5", {**OLD_VCYCLE, "alpha": 0.5}, "restart"),
        ("coarsest_fraction=0.7 alpha=0.5", {"coarsest_fraction": 0.7, "alpha": 0.5}, "restart"),
        ("coarsest_fraction=0.8 alpha=0.5", {"coarsest_fraction": 0.8, "alpha": 0.5}, "restart"),
    ],
}


def resolve(options: dict, layers: int) -> dict:
    """Recipes are written for any depth: ``layer_counts`` "quarters" means [L/4, L/2, 3L/4, L] (the old MSLT
    default) and "half" means [L/2, L]."""
    counts = {"quarters": sorted({max(1, layers * k // 4) for k in range(1, 5)}), "half": [layers // 2, layers]}
    if options.get("layer_counts") in counts:
        return {**options, "layer_counts": counts[options["layer_counts"]]}
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", default=",".join(RECIPES))
    parser.add_argument("--size", default="tiny", help="tiny or a JSON of layers/hidden/heads/intermediate")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=None, help="default perf/results/tuning/<size label>")
    args = parser.parse_args(argv)
    schedules = args.schedules.split(",")
    unknown = [s for s in schedules if s not in RECIPES]
    if unknown:
        raise SystemExit(f"--schedules: no recipes for {unknown}; known: {sorted(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    size = json.loads(args.size) if args.size.startswith("{") else args.size
    label = "gpt2-4x128" if size == "tiny" else f"gpt2-{size['layers']}x{size['hidden']}"
    root = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "results" / "tuning" / label
    exp = Experiment(family="gpt2", size=size, total_steps=args.steps,
                     config=TrainConfig(eval_every=25, eval_batches=8))
    prepared = prepare_data(exp)
    layers = 4 if size == "tiny" else size["layers"]
    baseline_flops = schedule_flops(exp, "baseline", exp.total_steps, None, prepared.vocab_size)
    baseline = [run(exp, "baseline", seed, None, prepared) for seed in seeds]
    for schedule in schedules:
        results, lines = {"baseline": baseline}, []
        for name, options, lr_schedule in RECIPES[schedule]:
            options = resolve(options, layers)
            own = schedule_flops(exp, schedule, exp.total_steps, options, prepared.vocab_size)
            stretched = replace(exp, total_steps=round(exp.total_steps * baseline_flops / own),
                                config=replace(exp.config, lr_schedule=lr_schedule))
            started = time.perf_counter()
            results[name] = [run(stretched, schedule, seed, options, prepared) for seed in seeds]
            lines.append(f"- {name}: `{json.dumps(options)}`, lr_schedule={lr_schedule}")
            print(f"{schedule}: {name}: val loss {[round(r.final_val_loss, 3) for r in results[name]]} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        header = (f"{schedule} recipes on gpt2 {label}, baseline {exp.total_steps} steps x {exp.config.batch_size} "
                  f"x {exp.config.seq_len} tokens, same FLOPs, seeds {seeds}, data python stdlib.  Options:\n\n"
                  + "\n".join(lines))
        print(write_summary(summarize(results), str(root / schedule), header=header), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
