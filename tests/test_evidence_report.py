"""perf/evidence_report.py assembles evidence.md from compare summaries (synthetic ones here, in a tmp dir)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from growlib.train.compare import MethodSummary, write_summary, write_tuning_table

SCRIPT = Path(__file__).resolve().parent.parent / "perf" / "evidence_report.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evidence_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(schedule, loss, ratio, reached=3):
    diff = loss - 5.0
    return MethodSummary(schedule=schedule, seeds=3, lr=2e-3, final_val_loss=loss,
                         final_val_loss_spread=(loss - 0.1, loss), loss_diff=diff, loss_diff_spread=(diff - 0.05, diff),
                         flops_ratio=ratio, flops_ratio_spread=None if ratio is None else (ratio - 0.1, ratio),
                         wall_ratio=ratio, wall_ratio_spread=None if ratio is None else (ratio, ratio),
                         reached=reached, total_flops_ratio=1.0)


def test_evidence_puts_each_configuration_beside_the_papers(tmp_path):
    results = tmp_path / "evidence"
    folder = results / "gpt2-small"
    write_summary([summary("baseline", 5.0, 1.0), summary("ligo", 4.8, 0.6), summary("vcycle", 5.2, None, reached=2),
                   summary("stack", 4.9, 0.8)], str(folder), header="gpt2 small, 3 seeds; LR tuned per arm")
    write_tuning_table({"baseline": {1.0: 5.2, 2.0: 5.0}, "ligo": {1.0: 4.8, 2.0: 4.9}}, 1e-3, str(folder),
                       "LR tuned per arm")
    assert load_script().main(["--results", str(results)]) == 0
    text = (tmp_path / "evidence.md").read_text()
    assert ("| ligo | LiGO: -45% FLOPs, -40% wall time | -40% FLOPs (-50% to -40%), 3/3 seeds; "
            "loss -0.200 (-0.250 to -0.200) |") in text
    assert ("| vcycle | multi-level framework" in text
            and "baseline loss not reached on every seed (2/3); loss +0.200 (+0.150 to +0.200)" in text)
    assert "| mslt | MSLT: more than 2.1x training speed | not run |" in text
    assert "| stack | (a classic operator, not one of the four source papers) | -20% FLOPs" in text
    assert "| baseline | (a classic" not in text
    assert "gpt2 small, 3 seeds; LR tuned per arm" in text
    assert ("| ligo | 0.002 | 4.800 (4.700-4.800) | -0.200 (-0.250 to -0.200) | 0.60x (0.50-0.60) | 0.60x | 3/3 |"
            in text)
    assert "| vcycle | 0.002 | 5.200 (5.100-5.200) | +0.200 (+0.150 to +0.200) | not reached (2/3 seeds) |" in text
    assert "| baseline | 5.200 | **5.000** | x2 (at the edge of its sweep) |" in text  # the sweep, its choice marked


def test_evidence_without_results_says_what_to_run(tmp_path, capsys):
    assert load_script().main(["--results", str(tmp_path / "none")]) == 1
    assert "evidence_cpu.sh" in capsys.readouterr().err
