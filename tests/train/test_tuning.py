"""The comparison protocol: every arm's learning rate tuned the same way on unreported seeds, tuning runs cached,
evaluation noise measured, and a method reaching the baseline only on every seed."""

from __future__ import annotations

import csv
import inspect
import json
import math
import re

import pytest

from growlib import cli
from growlib.train import experiment as E
from growlib.train.compare import summarize
from growlib.train.config import TrainConfig
from growlib.train.tuning import Tuning, best_multiplier
from tests.train.test_compare import result

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}


@pytest.fixture
def experiment(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))
    config = TrainConfig(batch_size=4, seq_len=32, eval_every=5, eval_batches=2, warmup_steps=4, lr=2e-3)
    return E.Experiment(family="gpt2", size=SIZE, total_steps=20, config=config, data=str(corpus), vocab_size=300,
                        cache_dir=str(tmp_path / "cache"), device="cpu")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_arm_runs_at_the_best_lr_of_the_same_sweep_and_the_sweep_is_reused(experiment, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "out"
    tuning = Tuning(lr_grid=(0.25, 4.0), seeds=(7,), fraction=0.5, extend=0)
    E.compare(experiment, ["stack"], [0], str(out), log=lambda message: None, tuning=tuning)

    sweep = read_csv(out / "tuning.csv")
    assert {(r["schedule"], float(r["multiplier"])) for r in sweep} == {
        (name, m) for name in ("baseline", "stack") for m in (0.25, 4.0)}
    summary = {r["schedule"]: r for r in read_csv(out / "summary.csv")}
    for name in ("baseline", "stack"):
        losses = {float(r["multiplier"]): float(r["mean_final_val_loss"]) for r in sweep if r["schedule"] == name}
        chosen = [float(r["multiplier"]) for r in sweep if r["schedule"] == name and r["chosen"] == "True"]
        assert chosen == [min(losses, key=losses.get)]
        assert float(summary[name]["lr"]) == pytest.approx(2e-3 * chosen[0])
    # a tuning run trains half the arm's steps (fraction 0.5), on the tuning seed, and is cached by fingerprint
    cached = sorted((out / "tuning" / "baseline").glob("*.json"))
    assert len(cached) == 2 and all("-seed7-" in path.name for path in cached)
    payload = json.loads(cached[0].read_text())
    assert payload["steps"] == 10 and payload["settings"]["config"]["warmup_steps"] == 2
    header = (out / "summary.md").read_text().splitlines()[0]
    assert "LR tuned per arm, the same way for each: x{0.25, 4} of 0.002 on seed(s) [7], 50% of each" in header
    assert "eval noise: std" in header and "disjoint validation subsets" in header

    tuning_runs = []
    monkeypatch.setattr(E, "run", lambda *args, **kwargs: tuning_runs.append(args))
    E.compare(experiment, ["stack"], [0], str(out), log=lambda message: None, tuning=tuning)
    assert tuning_runs == []  # every tuning run came from the cache
    assert read_csv(out / "tuning.csv") == sweep


@pytest.mark.slow
def test_untuned_comparisons_say_so(experiment, tmp_path):
    out = tmp_path / "out"
    E.compare(experiment, ["stack"], [0], str(out), log=lambda message: None, tuning=None)
    assert "UNTUNED: every arm at lr 0.002 (--no-tune)" in (out / "summary.md").read_text().splitlines()[0]
    assert not (out / "tuning.csv").exists()
    assert {float(r["lr"]) for r in read_csv(out / "summary.csv")} == {2e-3}


@pytest.mark.slow
def test_a_cached_run_of_other_settings_is_refused(experiment, tmp_path):
    out = tmp_path / "out"
    tuning = Tuning(lr_grid=(1.0,), seeds=(7,), fraction=0.25)
    E.compare(experiment, ["baseline"], [0], str(out), log=lambda message: None, tuning=tuning)
    (cached,) = (out / "tuning" / "baseline").glob("*.json")
    payload = json.loads(cached.read_text())
    payload["settings"]["seed"] = 8
    cached.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="other settings than its name says"):
        E.compare(experiment, ["baseline"], [0], str(out), log=lambda message: None, tuning=tuning)


def test_tuning_on_a_reported_seed_is_refused(experiment, tmp_path):
    with pytest.raises(ValueError, match=r"must not include a reported seed \(\[0, 1\]\); both hold \[1\]"):
        E.compare(experiment, ["stack"], [0, 1], str(tmp_path), tuning=Tuning(seeds=(1, 5)))


@pytest.mark.parametrize("kwargs,match", [
    ({"lr_grid": ()}, "lr_grid must be a non-empty list"),
    ({"lr_grid": (1.0, -2.0)}, "positive learning-rate multipliers"),
    ({"lr_grid": (1.0, float("nan"))}, "positive learning-rate multipliers"),
    ({"lr_grid": (1.0, 1.0)}, "must not repeat a multiplier"),
    ({"seeds": ()}, "tuning seeds must be a non-empty list"),
    ({"seeds": (1, 1)}, "tuning seeds must not repeat"),
    ({"seeds": ("1",)}, "ints >= 0"),
    ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
    ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
])
def test_a_bad_protocol_is_refused_naming_its_part(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Tuning(**kwargs)


def test_a_winning_edge_extends_the_sweep_at_the_grids_ratio_up_to_extend_times():
    tuning = Tuning(lr_grid=(1.0, 2.0, 4.0), extend=2)
    assert tuning.next_multiplier({1.0: 4.0, 2.0: 4.1, 4.0: 4.5}) == 0.5
    assert tuning.next_multiplier({0.5: 3.9, 1.0: 4.0, 2.0: 4.1, 4.0: 4.5}) == 0.25
    assert tuning.next_multiplier({0.25: 3.8, 0.5: 3.9, 1.0: 4.0, 2.0: 4.1, 4.0: 4.5}) is None  # extended twice
    assert tuning.next_multiplier({0.5: 4.2, 1.0: 4.0, 2.0: 4.1, 4.0: 4.5}) is None  # the winner is inside
    assert tuning.next_multiplier({1.0: 4.5, 2.0: 4.1, 4.0: 4.0}) == 8.0
    assert tuning.next_multiplier({1.0: 4.5, 2.0: 4.1, 4.0: math.nan}) is None  # 4 diverged: 2 is inside
    assert Tuning(lr_grid=(1.0,), extend=1).next_multiplier({1.0: 4.0}) is None  # one multiplier: a fixed choice
    assert Tuning(extend=0).next_multiplier({0.5: 1.0, 1.0: 2.0, 2.0: 3.0, 4.0: 4.0}) is None
    assert "extended past a winning edge up to 2 times" in tuning.describe(1e-3)


@pytest.mark.slow
def test_compare_extends_every_arms_sweep_by_the_same_rule(experiment, tmp_path, monkeypatch):
    """Losses that fall towards small learning rates: every arm's sweep goes on below the grid, twice."""
    tried = []

    def fake_tuning_run(exp, prepared, schedule, seed, options, cache_dir, log, plan, progress):
        tried.append((schedule, exp.config.lr))
        return E.RunResult(steps=1, flops=1.0, wall_seconds=1.0, final_val_loss=10 + math.log2(exp.config.lr),
                           evals=[])

    monkeypatch.setattr(E, "_tuning_run", fake_tuning_run)
    E.compare(experiment, ["stack"], [0], str(tmp_path), log=lambda message: None,
              tuning=Tuning(lr_grid=(1.0, 2.0), seeds=(7,), extend=2))
    assert sorted(tried) == sorted((name, 2e-3 * m) for name in ("baseline", "stack") for m in (0.25, 0.5, 1, 2))
    assert "x0.25 (at the edge of its sweep)" in (tmp_path / "tuning.md").read_text()
    assert {row["lr"] for row in read_csv(tmp_path / "summary.csv")} == {str(2e-3 * 0.25)}


def test_the_best_multiplier_ignores_diverged_runs_and_breaks_ties_low():
    assert best_multiplier({0.5: 4.1, 1.0: 4.0, 2.0: math.nan}) == 1.0
    assert best_multiplier({2.0: 4.0, 1.0: 4.0}) == 1.0
    with pytest.raises(ValueError, match="every learning rate of the grid diverged"):
        best_multiplier({1.0: math.nan, 2.0: math.inf})


def test_reaching_the_baseline_counts_only_on_every_seed_and_the_loss_difference_is_per_seed():
    base = [result([(1, 50.0, 5.0, 3.0), (2, 100.0, 10.0, 2.0)], 100.0, 10.0),
            result([(1, 50.0, 5.0, 3.0), (2, 100.0, 10.0, 2.5)], 100.0, 10.0)]
    once = [result([(1, 40.0, 4.0, 1.9), (2, 100.0, 10.0, 1.8)], 100.0, 10.0),   # reaches 2.0 at 40 FLOPs
            result([(1, 40.0, 4.0, 2.9), (2, 100.0, 10.0, 2.6)], 100.0, 10.0)]   # never reaches 2.5
    rows = {r.schedule: r for r in summarize({"baseline": base, "once": once}, lrs={"baseline": 1e-3})}
    assert rows["once"].reached == 1 and rows["once"].flops_ratio is None and rows["once"].wall_ratio is None
    assert rows["once"].loss_diff == pytest.approx(((1.8 - 2.0) + (2.6 - 2.5)) / 2)
    assert rows["once"].loss_diff_spread == pytest.approx((-0.2, 0.1))
    assert rows["baseline"].lr == 1e-3 and rows["once"].lr is None


def test_evaluation_noise_is_the_spread_over_disjoint_subsets(experiment):
    prepared = E.prepare_data(experiment)
    result, model = E.train(experiment, "baseline", 0, None, prepared)
    noise = E.evaluation_noise(experiment, prepared, model, subsets=4)
    assert len(noise.losses) == 4 and len(set(noise.losses)) == 4  # different text, different loss
    assert noise.losses[0] == pytest.approx(result.final_val_loss)  # the first subset is the runs' own
    assert noise.std > 0 and noise.tokens_per_subset == 2 * 4 * 32


@pytest.mark.parametrize("argv,match", [
    (("--lr-grid", "1,x"), "--lr-grid expects comma-separated numbers"),
    (("--tune-seeds", "1,a"), "--tune-seeds expects comma-separated integers"),
    (("--seeds", "0,x"), "--seeds expects comma-separated integers"),
    (("--tune-seeds", "2"), "--lr-grid / --lr-grid-extend / --tune-seeds / --tune-fraction: the tuning seeds"),
    (("--lr-grid-extend", "-1"), "tuning extend must be an int >= 0"),
    (("--tune-fraction", "0"), r"--tune-fraction: tuning fraction must be in \(0, 1\]"),
])
def test_the_command_line_refuses_a_bad_protocol_before_any_work(argv, match, tmp_path, capsys):
    assert cli.main(["compare", "--out", str(tmp_path / "out"), *argv]) == cli.EXIT_USAGE
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
