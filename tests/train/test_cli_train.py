"""`growlib train` / `compare` arguments: the budget in steps or tokens; every option documented with its default."""

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
    with pytest.raises(cli.UsageError, match="less than one step"):
        cli._experiment(parsed("--tokens", "100"))
    with pytest.raises(SystemExit):
        parsed("--tokens", "100000", "--steps", "3")  # one budget or the other


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    parser_actions = {}
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        parser_actions[name] = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    undocumented = [f"{name} {a.option_strings[0]}" for name, actions in parser_actions.items() for a in actions
                    if not a.help]
    assert undocumented == []
    text = parser._subparsers._group_actions[0].choices["compare"].format_help()
    assert "--lr-grid LR_GRID" in text and "(default: 0.5,1,2,4)" in text and "(default: None)" not in text
