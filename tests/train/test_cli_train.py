"""`growlib train` / `compare` arguments: the budget in steps or tokens."""

from __future__ import annotations

import argparse

import pytest

from growlib import cli


def parsed(*argv):
    parser = argparse.ArgumentParser()
    cli._experiment_arguments(parser)
    return parser.parse_args(["--out", "x", *argv])


def test_budget_in_tokens_becomes_steps(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli._experiment(parsed("--tokens", "102400", "--batch-size", "16", "--seq-len", "64")).total_steps == 100
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli._experiment(parsed("--tokens", "102400", "--batch-size", "16", "--seq-len", "64")).total_steps == 50
    assert cli._experiment(parsed("--steps", "7")).total_steps == 7
    assert cli._experiment(parsed()).total_steps == 300


def test_budget_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="less than one step"):
        cli._experiment(parsed("--tokens", "100"))
    with pytest.raises(SystemExit):
        parsed("--tokens", "100000", "--steps", "3")  # one budget or the other
