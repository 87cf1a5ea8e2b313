"""perf/report.py: the Markdown table from the latest benchmark run, and the honest answer when there is none;
and ``make bench``, which refuses to time anything without a GPU.

The CSV here is synthetic and lives in a temporary directory: it only checks that the report reads the right
rows and computes the right ratios."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "perf" / "report.py"


@pytest.fixture(scope="module")
def report():
    """perf/report.py as a module (perf/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("perf_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


ENVIRONMENT = {"device_name": "Test GPU", "compute_capability": "9.0", "cuda_runtime": "13.0", "driver": "580.1",
               "torch": "2.11.0", "triton": "3.6.0", "git_commit": "abc1234", "git_dirty": "no",
               "copy_ceiling_gbps": "4000", "matmul_ceiling_tflops": "800"}


def structured_rows(timestamp, triton_ms, eager_ms, compile_ms, frac, **environment):
    case = {"model": "bert-base", "dtype": "bfloat16", "op": "coalesce", "scope": "kernel_only"}
    rows = []
    for impl, ms in (("triton", triton_ms), ("eager", eager_ms), ("compile", compile_ms)):
        rows.append({**case, "impl": impl, "median_ms": ms, "frac_copy_ceiling": frac if impl == "triton" else "",
                     "error": "" if ms != "" else "TorchDynamo: failed",
                     "triton_launches": "structured_map(BLOCK_R=64,BLOCK_C=64,num_warps=4) x1" if impl == "triton" else "",
                     **ENVIRONMENT, "timestamp_utc": timestamp, **environment})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_report_uses_the_latest_run_and_computes_ratios(report, tmp_path):
    older = structured_rows("2030-01-01T00:00:00+00:00", "9.0", "10.0", "11.0", "0.1")
    newer = structured_rows("2030-02-01T00:00:00+00:00", "1.5", "3.0", "", "0.4567")
    cpu_row = structured_rows("2031-01-01T00:00:00+00:00", "0.001", "0.001", "0.001", "0.9", device_name="")
    write_csv(tmp_path / "structured_map.csv", older + newer + cpu_row)
    out = tmp_path / "PERFORMANCE.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    structured = text.split("## Structured growth maps")[1].split("## ")[0]
    assert "2030-02-01T00:00:00+00:00" in structured and "2030-01-01" not in structured and "2031" not in structured
    assert "| bert-base | bfloat16 | coalesce | kernel_only | 1.5 | 3 | - | 2.00x | - | 46% |" in structured
    assert "Test GPU (compute capability 9.0)" in structured and "triton 3.6.0" in structured
    assert "commit abc1234" in structured and "copy 4000 GB/s" in structured
    assert "compile: TorchDynamo: failed" in structured
    assert "`structured_map(BLOCK_R=64,BLOCK_C=64,num_warps=4) x1`" in structured
    # the benchmarks with no CSV say so rather than showing anything
    for title in ("LiGO expansion", "Frozen stack forward", "MSLT training step", "End to end"):
        assert "not yet measured on a GPU" in text.split(f"## {title}")[1].split("## ")[0]


def test_report_without_any_csv_says_not_yet_measured_and_succeeds(report, tmp_path, capsys):
    out = tmp_path / "PERFORMANCE.md"
    assert report.main(["--results", str(tmp_path / "missing"), "--out", str(out)]) == 0
    assert "not yet measured on a GPU" in capsys.readouterr().out
    text = out.read_text()
    assert text.count("not yet measured on a GPU") == len(report.TABLES) + 1  # and the end-to-end section
    assert "|" not in text  # no table, no number


def test_report_ignores_smoke_rows_and_reads_the_kron_and_end_to_end_csvs(report, tmp_path):
    """A smoke rehearsal's rows never reach the report, even with a device name; the LiGO table is keyed by
    growth, tie, map dtype and phase; end-to-end rows are listed as recorded."""
    gpu = {**ENVIRONMENT, "mode": "gpu", "timestamp_utc": "2030-03-01T00:00:00+00:00"}
    smoke = {**gpu, "mode": "smoke-cpu-interpreter", "timestamp_utc": "2031-01-01T00:00:00+00:00"}
    kron_case = {"growth": "bert-base->bert-large", "tie": "paper", "map_dtype": "float32", "phase": "fwd+bwd",
                 "error": "", "triton_launches": ""}
    kron = [{**kron_case, "impl": impl, "median_ms": ms, "frac_matmul_ceiling": frac, **env}
            for env in (gpu, smoke)
            for impl, ms, frac in (("eager", "8.0", ""), ("compile", "", ""), ("triton", "2.0", "0.25"))]
    kron[1]["error"] = "skipped: compiling needs ~32 s, 10 s of --time-limit left"
    write_csv(tmp_path / "kron_expand.csv", kron)
    write_csv(tmp_path / "structured_map.csv", structured_rows("2031-01-01T00:00:00+00:00", "1", "1", "1", "0.9",
                                                           mode="smoke-cpu-interpreter"))
    end_to_end = {"measurement": "stage", "schedule": "vcycle", "name": "coarse", "detail": "6x384",
                  "median_ms": "12.5", "tokens_per_s": "327680", "tflops": "", "frac_matmul_ceiling": "0.125",
                  "error": ""}
    write_csv(tmp_path / "end_to_end.csv", [{**end_to_end, **gpu}, {**end_to_end, "schedule": "smoke-only", **smoke}])
    out = tmp_path / "PERFORMANCE.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    kron_text = text.split("## LiGO expansion")[1].split("## ")[0]
    assert "| bert-base->bert-large | paper | float32 | fwd+bwd | 2 | 8 | - | 4.00x | - | 25% |" in kron_text
    assert "2031" not in text and "smoke-only" not in text
    assert "compile: skipped: compiling needs ~32 s" in kron_text
    assert "not yet measured on a GPU" in text.split("## Structured growth maps")[1].split("## ")[0]
    end_to_end_text = text.split("## End to end")[1]
    assert "| stage | vcycle | coarse | 6x384 | 12.5 | 3.28e+05 | - | 12% |  |" in end_to_end_text


def test_make_bench_runs_the_one_gpu_script_into_a_new_folder():
    """``make bench`` is perf/gpu_run.sh (which refuses without a GPU: tests/test_gpu_run.py), never into a folder
    an earlier run filled: the script refuses a non-empty one, so the target names a new one each time."""
    makefile = (REPORT.parent.parent / "Makefile").read_text()
    recipe = makefile.split("\nbench:")[1].split("\n\n")[0]
    commands = [line.strip() for line in recipe.splitlines()[1:] if line.startswith("\t")]
    assert commands == ["PYTHON=$(PY) bash perf/gpu_run.sh out/gpu-run-$$(date -u +%Y%m%dT%H%M%SZ)"]


@pytest.fixture(scope="module")
def common():
    """perf/common.py as a module, under its own name (the benchmarks import it as ``common``)."""
    spec = importlib.util.spec_from_file_location("perf_common", REPORT.parent / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speedups_pair_each_case_with_its_own_baseline(common):
    rows = [{"model": m, "impl": impl, "median_ms": ms} for m, impl, ms in
            (("a", "eager", 8.0), ("a", "triton", 2.0), ("b", "eager", 3.0), ("b", "triton", None),
             ("c", "triton", 1.0), ("d", "eager", 6.0), ("d", "triton", 3.0))]
    assert sorted(common.speedups(rows, ("model",), "triton", "eager")) == [2.0, 4.0]  # b unmeasured, c alone
    assert common.measured_count(rows) == "6/7 measured (0 compile)"


def test_run_cases_measures_compiled_rows_last_and_survives_a_failing_case(common, capsys):
    order, logged = [], []
    start = type("Start", (), {"deadline": common.Deadline(None), "log": logged.append})()

    def plain(case):
        order.append(("plain", case))
        if case == "broken":
            raise RuntimeError("a bug in one case")
        return case

    failed = common.run_cases(start, ["x", "broken", "y"], 1.0, str, plain,
                              lambda case: order.append(("compile", case)))
    assert failed and "a bug in one case" in capsys.readouterr().err
    assert order == [("plain", "x"), ("plain", "broken"), ("plain", "y"), ("compile", "x"), ("compile", "y")]
    start.deadline = common.Deadline(0)
    assert not common.run_cases(start, ["z"], 1.0, str, plain, plain)
    assert logged[-1].startswith("z: not started, skipped: a case needs ~1 s")
