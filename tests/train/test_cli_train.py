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


@pytest.fixture
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_threads_flag_sets_torchs_threads(torch_threads):
    cli._set_threads(1)
    assert torch_threads.get_num_threads() == 1


@pytest.mark.parametrize("load,hint", [(0.1, False), (1.9, True)])
def test_a_busy_machine_gets_a_hint_not_a_silent_slowdown(torch_threads, monkeypatch, capsys, load, hint):
    torch_threads.set_num_threads(2)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
    cli._set_threads(None)
    assert torch_threads.get_num_threads() == 2  # torch's default is kept: the fastest on an idle machine
    err = capsys.readouterr().err
    assert ("the machine is busy (load 1.9 on 2 CPUs) and torch uses 2 threads; if training is slow, --threads 1 "
            "may be several times faster" in err) == hint


def test_the_command_lines_defaults_are_the_apis():
    """A run from the command line and one from TrainConfig() / Experiment() with no arguments are the same run."""
    from growlib.train.experiment import Experiment
    from growlib.train.config import TrainConfig

    flags = {"lr": "lr", "warmup_steps": "warmup", "batch_size": "batch_size", "seq_len": "seq_len",
             "eval_every": "eval_every", "eval_batches": "eval_batches", "on_nonfinite": "on_nonfinite",
             "lr_schedule": "lr_schedule"}
    config, experiment = TrainConfig(), Experiment()
    for command in ("train", "compare"):
        args = cli.build_parser().parse_args([command, "--out", "x"])
        assert {field: getattr(config, field) for field in flags} == {f: getattr(args, a) for f, a in flags.items()}
        from_flags = cli._experiment(args)
        for field in ("family", "size", "vocab_size", "bin_dtype", "data", "init_from", "tokenizer", "target_config"):
            assert getattr(from_flags, field) == getattr(experiment, field), field
