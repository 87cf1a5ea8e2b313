"""perf/gpu_run.sh, the one command a GPU machine runs, rehearsed here with ``--smoke`` (the same steps on the
CPU through Triton's interpreter, tiny shapes), so that the script and the benchmarks it drives cannot rot
between the rare GPU sessions: the files it returns, their columns, the summary table, every step ok.

The smoke run takes ~1.5 minutes on two cores.  Nothing here reads a time: smoke rows carry none worth reading,
and the test checks that they say so."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "perf" / "gpu_run.sh"
HAS_END_TO_END = (REPO_ROOT / "perf" / "bench_end_to_end.py").exists()
STEPS = ("import", "environment", "check-kernels", "kernel-tests", "structured_map", "tile-sweep", "kron_expand",
         "frozen", "end-to-end", "report")
FILES = {"environment.txt", "check_kernels.txt", "kernel_tests.txt", "structured_map.csv", "kron_expand.csv", "frozen.csv",
         "gpu_run.log"} | ({"end_to_end.csv"} if HAS_END_TO_END else set())
SMOKE = "smoke-cpu-interpreter"
# Per CSV: the columns a row must have, the columns that would make a speed claim (empty in a smoke run), how
# a row names its implementation, the implementations that must have been measured, and the agreement column.
CSVS = {
    "structured_map.csv": ({"model", "dtype", "op", "scope", "impl", "median_ms", "bytes_moved", "gbps",
                        "frac_copy_ceiling", "max_abs_diff_vs_eager", "compile_graphs", "error", "triton_launches"},
                       ("gbps", "frac_copy_ceiling", "copy_ceiling_gbps"), {"eager", "triton", "compile"},
                       "max_abs_diff_vs_eager"),
    "kron_expand.csv": ({"growth", "tie", "model_dtype", "map_dtype", "impl", "phase", "median_ms", "flops", "tflops",
                  "frac_matmul_ceiling", "max_rel_diff_vs_eager", "compile_graphs", "error", "triton_launches"},
                 ("tflops", "frac_matmul_ceiling", "matmul_ceiling_tflops"), {"eager", "triton", "compile"},
                 "max_rel_diff_vs_eager"),
    "frozen.csv": ({"model", "layers", "tokens", "bench", "impl", "median_ms", "tokens_per_s", "tflops",
                    "frac_matmul_ceiling", "peak_mem_gib", "rel_diff_vs_eager", "error", "triton_launches"},
                   ("tokens_per_s", "tflops", "frac_matmul_ceiling", "matmul_ceiling_tflops"),
                   {"eager", "freeze_forward", "compile", "full_backprop", "mslt_no_grad", "mslt_freeze_forward"},
                   "rel_diff_vs_eager"),
}
ENVIRONMENT_COLUMNS = {"mode", "device_name", "torch", "triton", "compile_backend", "git_commit", "timestamp_utc"}


def run_script(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-run") / "out"
    result = run_script("--smoke", str(out), timeout=400)
    return result, out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def summary_rows(text: str) -> dict[str, tuple[str, str]]:
    """{step: (status, key)} from the summary table, which must be the last thing printed."""
    lines = text.rstrip("\n").splitlines()
    header = max(i for i, line in enumerate(lines) if re.match(r"step\s+status\s+seconds\s+key$", line))
    rows = {}
    for line in lines[header + 1:]:
        step, status, seconds, key = re.match(r"(\S+)\s+(\S+)\s+(\d+)\s*(.*)$", line).groups()
        rows[step] = (status, key)
    return rows


@pytest.mark.subprocess
def test_smoke_run_passes_every_step_and_prints_the_summary_last(smoke_run):
    result, _ = smoke_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = summary_rows(result.stdout)
    assert list(rows) == list(STEPS)
    for step, (status, key) in rows.items():
        expected = "ok" if step != "end-to-end" or HAS_END_TO_END else "missing"
        assert status == expected, (step, status, key)
    assert re.match(r"(\d+) of \1 cases passed, quick subset", rows["check-kernels"][1])
    assert re.match(r"\d+ passed, \d+ deselected, -k subset", rows["kernel-tests"][1])
    for bench in ("structured_map", "kron_expand", "frozen"):
        assert "smoke: times are not kernel timings" in rows[bench][1]
    assert re.match(r"(\d+)/\1 tile shapes measured, 0 differing from the default", rows["tile-sweep"][1])
    assert rows["report"][1].startswith("0 of ")  # smoke rows never reach the report


@pytest.mark.subprocess
def test_smoke_run_writes_at_most_eight_flat_files_with_plain_names(smoke_run):
    _, out = smoke_run
    names = {path.name for path in out.iterdir()}
    assert names == FILES and len(names) <= 8
    for path in out.iterdir():
        assert path.is_file() and not path.is_symlink() and path.stat().st_size > 0
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name)
    log = (out / "gpu_run.log").read_text()
    assert re.search(r"step\s+status\s+seconds\s+key\n", log) and "report" in log.rsplit("step", 1)[1]
    assert "TRITON_INTERPRET 1" in (out / "environment.txt").read_text()
    checked = (out / "check_kernels.txt").read_text()
    assert re.search(r"(\d+) of \1 cases passed on the CPU through Triton's interpreter", checked)
    assert "FAIL" not in checked
    tests = (out / "kernel_tests.txt").read_text()
    assert re.search(r"\d+ passed", tests) and "failed" not in tests


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(CSVS))
def test_smoke_csvs_have_the_columns_and_mark_every_row_as_smoke(smoke_run, name):
    """Every row says smoke and fills no throughput column; eager and Triton were measured and agree; every
    row is measured or skipped by the time limit, never failed."""
    _, out = smoke_run
    columns, speed_columns, impls, agreement = CSVS[name]
    rows = read_csv(out / name)
    assert rows and columns | ENVIRONMENT_COLUMNS <= set(rows[0])
    measured = [row for row in rows if row["median_ms"]]
    assert {"eager", "triton" if name != "frozen.csv" else "freeze_forward"} <= {row["impl"] for row in measured}
    for row in rows:
        assert row["impl"] in impls
        assert row["mode"] == SMOKE and row["device_name"] == "" and row["compile_backend"] == "aot_eager"
        assert all(row[column] == "" for column in speed_columns), row
        assert bool(row["median_ms"]) != row["error"].startswith("skipped:"), row
        if row["median_ms"] and row[agreement]:
            assert float(row[agreement]) < 0.05, row  # bf16 rounding at most, as the kernel tests allow
        if row["median_ms"] and row["impl"] in ("triton", "freeze_forward", "mslt_freeze_forward"):
            assert row["triton_launches"], row  # the Triton kernels ran, not a fallback


def test_refuses_bad_arguments_and_a_used_folder(tmp_path):
    assert run_script(timeout=30).returncode == 2
    (tmp_path / "old.csv").write_text("x\n")
    result = run_script("--smoke", str(tmp_path), timeout=30)
    assert result.returncode == 2 and "not empty" in result.stderr


@pytest.mark.subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_mode_without_a_gpu_stops_before_timing_anything(tmp_path):
    result = run_script(str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr
    assert not list((tmp_path / "out").glob("*.csv"))
