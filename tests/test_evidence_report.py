"""perf/evidence_report.py assembles evidence.md from compare summaries (synthetic ones here, in a tmp dir)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from growlib.train.compare import MethodSummary, write_summary

SCRIPT = Path(__file__).resolve().parent.parent / "perf" / "evidence_report.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evidence_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(schedule, loss, ratio):
    return MethodSummary(schedule=schedule, seeds=3, final_val_loss=loss, final_val_loss_spread=(loss - 0.1, loss),
                         flops_ratio=ratio, flops_ratio_spread=None if ratio is None else (ratio, ratio),
                         wall_ratio=ratio, wall_ratio_spread=None if ratio is None else (ratio, ratio),
                         reached=0 if ratio is None else 3, total_flops_ratio=1.0)


def test_evidence_puts_each_configuration_beside_the_papers(tmp_path):
    results = tmp_path / "evidence"
    write_summary([summary("baseline", 5.0, 1.0), summary("ligo", 4.8, 0.6), summary("vcycle", 5.2, None),
                   summary("stack", 4.9, 0.8)],
                  str(results / "gpt2-small"), header="gpt2 small, 3 seeds")
    assert load_script().main(["--results", str(results)]) == 0
    text = (tmp_path / "evidence.md").read_text()
    assert "| ligo | LiGO: -45% FLOPs, -40% wall time | -40% FLOPs, 3/3 seeds |" in text
    assert "| vcycle | multi-level framework" in text and "baseline loss not reached (final 5.200)" in text
    assert "| mslt | MSLT: more than 2.1x training speed | not run |" in text
    assert "| stack | (a classic operator, not one of the four source papers) | -20% FLOPs, 3/3 seeds |" in text
    assert "| baseline | (a classic" not in text
    assert "gpt2 small, 3 seeds" in text and "| ligo | 4.800 (4.700-4.800) | 0.60x | 0.60x | 3/3 |" in text


def test_evidence_without_results_says_what_to_run(tmp_path, capsys):
    assert load_script().main(["--results", str(tmp_path / "none")]) == 1
    assert "evidence_cpu.sh" in capsys.readouterr().err
