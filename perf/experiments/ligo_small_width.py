"""How wide should LiGO's small model be?  The `ligo` schedule on GPT-2 4x128 (the demo's model, 400 baseline
steps, same FLOPs, seeds 0-2) with the small model at 1/2, 3/4 and the full width (half depth in every case),
against the same baseline runs.  Writes perf/results/ligo_small_width/summary.{md,csv}.

    python perf/experiments/ligo_small_width.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from growlib.train.compare import summarize, write_summary
from growlib.train.experiment import Experiment, prepare_data, run, schedule_flops
from growlib.train.config import TrainConfig

WIDTHS = (0.5, 0.75, 1.0)
SEEDS = (0, 1, 2)


def main() -> int:
    out = Path(__file__).resolve().parent.parent / "results" / "ligo_small_width"
    exp = Experiment(family="gpt2", size="tiny", total_steps=400, config=TrainConfig(eval_every=25, eval_batches=8))
    prepared = prepare_data(exp)
    baseline_flops = schedule_flops(exp, "baseline", exp.total_steps, None, prepared.vocab_size)
    results = {"baseline": [run(exp, "baseline", seed, None, prepared) for seed in SEEDS]}
    for width in WIDTHS:
        options = {"small_width": width}
        steps = round(exp.total_steps * baseline_flops / schedule_flops(exp, "ligo", exp.total_steps, options,
                                                                         prepared.vocab_size))
        stretched = Experiment(**{**exp.__dict__, "total_steps": steps})
        results[f"ligo small_width={width}"] = [run(stretched, "ligo", seed, options, prepared) for seed in SEEDS]
        print(f"small_width {width}: done", flush=True)
    table = write_summary(summarize(results), str(out), header=(
        f"ligo's small model width on gpt2 tiny (4x128), baseline {exp.total_steps} steps x 16 x 64 tokens, same "
        f"FLOPs, seeds {list(SEEDS)}, data python stdlib"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
