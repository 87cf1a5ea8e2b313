"""perf/bench_end_to_end.py: the --smoke run (a tiny GPT-2 on the CPU, the GPU run's code path) writes a row for
every schedule's stages and every transition, with positive finite numbers; without a GPU and without --smoke it
refuses, printing no number; a time limit already spent measures nothing, writes every measurement as skipped
and says so.

The numbers are never checked against anything: tests do not time, and smoke rows are no speed claims."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from growlib.schedules import SCHEDULES

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "perf" / "bench_end_to_end.py"
TRANSITIONS = {("vcycle", "coalesce"), ("vcycle", "decoalesce_interpolate"), ("ode_multilevel", "restrict"),
               ("ode_multilevel", "prolong"), ("mslt", "grow_copy_top"), ("stack", "grow_stack"),
               ("msg", "grow_stack"), ("ligo", "ligo_fit_step")}
#: Columns every row of its kind must hold as a positive finite number.
MEASURED = {
    "stage": ("layers", "hidden", "parameters", "trainable_parameters", "warmup", "repeats", "median_ms", "p20_ms",
              "p80_ms", "tokens_per_s", "flops", "tflops"),
    "transition": ("layers", "hidden", "parameters", "repeats", "median_ms", "p20_ms", "p80_ms", "first_call_ms",
                   "flops", "tflops"),
}


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("end_to_end")
    result = run_bench("--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out / "end_to_end.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.subprocess
def test_smoke_has_every_schedules_stages_and_every_transition(smoke_rows):
    assert {row["measurement"] for row in smoke_rows} == {"stage", "transition"}
    stages = {(row["schedule"], row["name"]) for row in smoke_rows if row["measurement"] == "stage"}
    assert {schedule for schedule, _ in stages} == set(SCHEDULES)
    assert {("vcycle", "level0-down"), ("vcycle", "level1-coarsest"), ("mslt", "joint"), ("ligo", "large")} <= stages
    transitions = {(row["schedule"], row["name"]) for row in smoke_rows if row["measurement"] == "transition"}
    assert transitions == TRANSITIONS


@pytest.mark.subprocess
def test_smoke_rows_hold_positive_finite_numbers_and_no_error(smoke_rows):
    for row in smoke_rows:
        assert row["error"] == "", row
        for column in MEASURED[row["measurement"]]:
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (row["schedule"], row["name"], column, row[column])


@pytest.mark.subprocess
def test_smoke_rows_are_labelled_smoke_and_carry_the_environment(smoke_rows):
    assert all(row["mode"].startswith("smoke") for row in smoke_rows)
    assert all(row["torch"] and row["triton"] and row["timestamp_utc"] for row in smoke_rows)
    frozen = [row for row in smoke_rows if row["schedule"] == "mslt" and "frozen" in row["detail"]]
    assert frozen and all(int(row["trainable_parameters"]) < int(row["parameters"]) for row in frozen)
    assert any("masked" in row["detail"] for row in smoke_rows if row["schedule"] == "msg")


@pytest.mark.subprocess
def test_without_a_gpu_it_exits_2_and_prints_no_number(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the no-GPU refusal itself, not the interpreter's
    result = run_bench("--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 2
    assert "CUDA GPU" in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_a_spent_time_limit_measures_nothing_writes_it_as_skipped_and_says_so(tmp_path):
    result = run_bench("--smoke", "--out", str(tmp_path), "--time-limit", "0.000001")
    assert result.returncode == 1
    assert "no measurement finished" in result.stderr and result.stdout == ""
    with open(tmp_path / "end_to_end.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["schedule"] for row in rows} == set(SCHEDULES)
    assert all(row["error"].startswith("skipped") and row["median_ms"] == "" for row in rows)
