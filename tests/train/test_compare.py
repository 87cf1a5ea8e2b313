"""The comparison against the baseline: cost to reach the baseline's final loss, ratios and spreads."""

from __future__ import annotations

import pytest

from growlib.train.compare import cost_to_reach, markdown_table, summarize, write_summary
from growlib.train.loop import Evaluation, RunResult


def result(points, flops, wall):
    """points: (step, flops, wall, val_loss[, parameters]) evaluations; 100 parameters unless given."""
    evals = [Evaluation(*p) if len(p) == 5 else Evaluation(*p, parameters=100) for p in points]
    return RunResult(steps=points[-1][0], flops=flops, wall_seconds=wall, final_val_loss=points[-1][3],
                     evals=evals)


def test_cost_to_reach_interpolates_between_evaluations():
    run = result([(1, 10.0, 1.0, 4.0), (2, 20.0, 2.0, 3.0), (3, 30.0, 3.0, 2.0)], 30.0, 3.0)
    assert cost_to_reach(run, 2.5) == pytest.approx((25.0, 2.5))
    assert cost_to_reach(run, 5.0) == (10.0, 1.0)
    assert cost_to_reach(run, 1.0) is None


def test_only_evaluations_of_the_final_models_size_reach_the_target():
    """A coarse level (fewer parameters) passes the target first; the run only reaches it later, once the
    full-size model gets there, interpolated from the full-size evaluation before it, never from the coarse."""
    run = result([(1, 10.0, 1.0, 2.0, 25), (2, 20.0, 2.0, 4.0, 100), (3, 30.0, 3.0, 2.0, 100)], 30.0, 3.0)
    assert cost_to_reach(run, 3.0) == pytest.approx((25.0, 2.5))
    assert cost_to_reach(run, 5.0) == (20.0, 2.0)
    assert cost_to_reach(run, 1.5) is None
    coarse_only = result([(1, 10.0, 1.0, 2.0, 25), (2, 20.0, 2.0, 4.0, 100)], 20.0, 2.0)
    assert cost_to_reach(coarse_only, 3.0) is None


def test_summary_ratios_against_the_baseline_of_the_same_seed(tmp_path):
    base = [result([(1, 50.0, 5.0, 3.0), (2, 100.0, 10.0, 2.0)], 100.0, 10.0),
            result([(1, 50.0, 5.0, 3.2), (2, 100.0, 10.0, 2.2)], 100.0, 10.0)]
    fast = [result([(1, 30.0, 4.0, 2.0), (2, 60.0, 8.0, 1.8)], 60.0, 8.0),
            result([(1, 30.0, 4.0, 2.6), (2, 60.0, 8.0, 2.0)], 60.0, 8.0)]
    never = [result([(1, 10.0, 1.0, 9.0)], 10.0, 1.0), result([(1, 10.0, 1.0, 9.0)], 10.0, 1.0)]
    rows = {r.schedule: r for r in summarize({"baseline": base, "fast": fast, "never": never})}
    assert rows["baseline"].flops_ratio == pytest.approx(1.0)
    # seed 0: reaches 2.0 at 30 FLOPs (0.3); seed 1: 2.2 between 2.6@30 and 2.0@60 -> 50 FLOPs (0.5)
    assert rows["fast"].flops_ratio == pytest.approx(0.4)
    assert rows["fast"].flops_ratio_spread == pytest.approx((0.3, 0.5))
    assert rows["fast"].total_flops_ratio == pytest.approx(0.6)
    assert rows["never"].flops_ratio is None and rows["never"].reached == 0
    table = write_summary(list(rows.values()), str(tmp_path))
    assert "not reached" in table and (tmp_path / "summary.csv").exists()
    assert (tmp_path / "summary.md").read_text().strip().endswith(markdown_table(list(rows.values())).splitlines()[-1])


def test_summary_needs_the_baseline_and_matching_seeds():
    run = result([(1, 1.0, 1.0, 1.0)], 1.0, 1.0)
    with pytest.raises(ValueError, match="baseline"):
        summarize({"fast": [run]})
    with pytest.raises(ValueError, match="seeds"):
        summarize({"baseline": [run], "fast": [run, run]})
