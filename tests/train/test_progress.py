"""Progress off a terminal: plain lines (step, stage, loss, tokens/s, ETA) at most every interval; a
comparison says which run of how many it finished and how long the rest should take."""

from __future__ import annotations

import io

import pytest

from growlib.train.progress import RunPlan, StepProgress, duration


def record(step, total=10, wall=None):
    return {"step": step, "total_steps": total, "stage": "coarse", "loss": 4.5 + step / 100,
            "tokens": step * 1000, "wall": step * 0.5 if wall is None else wall, "flops": 1e9 * step}


def test_every_step_is_a_line_when_the_interval_is_zero():
    stream = io.StringIO()
    progress = StepProgress("vcycle seed 2", interval_s=0, stream=stream, terminal=False)
    for step in range(1, 11):
        progress(record(step))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[3] == "vcycle seed 2: step 4/10, stage coarse, loss 4.540, 2000 tok/s, ETA 3s"
    assert lines[-1].endswith("ETA 0s")


def test_a_long_interval_keeps_the_first_and_the_last_step():
    stream = io.StringIO()
    progress = StepProgress(interval_s=3600, stream=stream, terminal=False)
    for step in range(1, 11):
        progress(record(step))
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == ["step 1/10", "step 10/10"]


def test_a_negative_interval_is_refused():
    with pytest.raises(ValueError, match="interval_s must be a number of seconds >= 0"):
        StepProgress(interval_s=-1)


def test_durations_read_as_a_person_would():
    assert [duration(s) for s in (0.4, 45, 725, 10920)] == ["0s", "45s", "12m05s", "3h02m"]


def test_the_plan_counts_runs_and_projects_from_trained_steps_only():
    plan = RunPlan()
    plan.add("baseline", 100, runs=2)
    plan.add("vcycle", 300, runs=1)
    assert plan.position() == "run 1 of 3" and plan.done() == "0 of 3 runs done"
    plan.finished("baseline", 100, 0.0, trained=False)  # read back from a cache: free, not a pace
    assert plan.done() == "1 of 3 runs done"
    plan.finished("baseline", 100, 50.0, trained=True)  # 0.5 s a step; 300 steps left
    assert plan.position() == "run 3 of 3" and plan.done() == "2 of 3 runs done, about 2m30s left"


def test_a_failed_schedule_gives_up_the_runs_it_had_left():
    plan = RunPlan()
    plan.add("baseline", 100, runs=2)
    plan.add("vcycle", 200, runs=3)
    plan.finished("vcycle", 200, 100.0, trained=True)
    plan.abandon("vcycle")  # its other two runs will not happen
    assert plan.done() == "1 of 3 runs done, about 1m40s left"
    plan.finished("baseline", 100, 50.0, trained=True)
    plan.finished("baseline", 100, 50.0, trained=True)
    assert plan.done() == "3 of 3 runs done, about 0s left"
