"""Every input error of `growlib train` / `compare` is one line naming the flag, exit status 2, before any
data is prepared or model built; --debug shows the traceback instead."""

from __future__ import annotations

import json

import pytest

from growlib import cli
from growlib.train import experiment as E

SIZE = '{"layers": 4, "hidden": 32, "heads": 2, "intermediate": 64}'


@pytest.fixture(autouse=True)
def no_data(monkeypatch):
    """Preparing the data (tens of seconds on real corpora) would mean the error came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("data prepared before the arguments were checked")

    monkeypatch.setattr(E, "prepare_data", refuse)


def deepspeed_file(tmp_path, config):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("argv,expected", [
    (["train", "--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["train", "--lr", "-1"], "--lr must be a positive number"),
    (["train", "--size", '{"layers": 4}'], "--size needs keys layers, hidden, heads, intermediate"),
    (["train", "--size", '{"layers": 4, "hidden": 30, "heads": 4, "intermediate": 8}'],
     "hidden must be a multiple of heads"),
    (["train", "--size", "{nope"], "is not valid JSON"),
    (["train", "--schedule", "vcycle", "--steps", "5", "--size", SIZE], "--schedule vcycle with --steps 5"),
    (["train", "--schedule", "vcycle", "--size", SIZE, "--schedule-args", "levels=5"],
     "levels=5 halves the depth 4 times"),
    (["train", "--schedule", "vcycle", "--schedule-args", "level=3"], "takes options"),
    (["train", "--schedule", "mslt", "--schedule-args", "frozen_forward=maybe"], "frozen_forward (bool | None) "
                                                                                  "expects true or false"),
    (["train", "--schedule", "stack", "--schedule-args", "layer_counts=1,x"], "expects a list of ints"),
    (["train", "--schedule", "vcycle", "--schedule-args", "alpha"], "expects KEY=VALUE"),
    (["train", "--threads", "0"], "--threads must be >= 1"),
    (["train", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["train", "--data", "/no/such/corpus.txt"], "--data: no such file or folder"),
    (["compare", "--seeds", "0,x"], "--seeds expects comma-separated integers"),
    (["compare", "--schedules", "baseline,vcycel"], "--schedules: unknown ['vcycel']"),
    (["compare", "--steps", "5", "--size", SIZE, "--schedules", "vcycle", "--no-tune"],
     "schedule 'vcycle' cannot run on this budget"),
])
def test_a_bad_flag_is_one_line_with_exit_status_2(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # no busy-machine hint, whatever the load
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_deepspeed_config_growlib_cannot_honour_is_refused_up_front(tmp_path, capsys):
    config = deepspeed_file(tmp_path, {"optimizer": {"type": "Adam"}})
    assert cli.main(["train", "--deepspeed", config, "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert "--deepspeed " + config + ": deepspeed config: remove 'optimizer'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,world,expected", [
    (["--fsdp"], "1", "--fsdp shards the model across processes: launch with torchrun"),
    (["--fsdp", "--deepspeed", "ZERO2"], "2", "--fsdp and --deepspeed exclude each other"),
    (["--fsdp", "--schedule", "ode_multilevel", "--schedule-args", "coherence=true"], "2",
     "--fsdp does not support ode_multilevel's coherence=true"),
    (["--deepspeed", "ZERO3", "--schedule", "ode_multilevel", "--schedule-args", "coherence=true"], "2",
     "ZeRO stage 3 does not support ode_multilevel's coherence=true"),
    (["--fsdp-transitions", "gather"], "2", "--fsdp-transitions gather chooses how FSDP2 runs make transitions: "
                                            "add --fsdp"),
])
def test_a_sharded_engine_refuses_what_it_cannot_run_before_anything_starts(argv, world, expected, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    configs = {f"ZERO{stage}": deepspeed_file(tmp_path / f"zero{stage}", {"zero_optimization": {"stage": stage}})
               for stage in (2, 3)}
    argv = [configs.get(arg, arg) for arg in argv]
    assert cli.main(["train", *argv, "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert expected in capsys.readouterr().err


def test_fsdp_on_a_torch_older_than_2_6_is_refused_naming_the_version(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.__version__", "2.5.1+cu124")
    assert cli.main(["train", "--fsdp", "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--fsdp needs torch >= 2.6" in err and "found 2.5.1+cu124" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.UsageError, match="--batch-size must be an int >= 1") as error:
        cli.main(["train", "--batch-size", "0", "--debug", "--out", str(tmp_path / "out")])
    assert "TrainConfig.batch_size" in str(error.value.__cause__)  # the API's own error, for the traceback


@pytest.mark.parametrize("argv,expected", [
    (["--schedule", "vcycle", "--schedule-args", "alpha=2"], "--schedule-args alpha=2: alpha must lie in [0, 1]"),
    (["--schedule", "vcycle", "--tokens", "2048", "--size", SIZE], "--schedule vcycle with --tokens 2048 (2 steps)"),
    (["--schedule", "vcycle", "--schedule-args", "coarse_lr_scale=inf"], "expects a finite number, got 'inf'"),
    (["--schedule", "ligo", "--schedule-args", "depth_init=stak"], "depth_init must be one of ('stack', "),
    (["--schedule", "ligo", "--schedule-args", "width_init=bert2bert_aki"], "width_init must be one of"),
])
def test_schedule_errors_name_the_flag_at_fault(argv, expected, tmp_path, capsys):
    assert cli.main(["train", *argv, "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert expected in capsys.readouterr().err


def test_schedule_args_given_twice_add_up(monkeypatch, tmp_path):
    seen = {}

    def record(schedule, pairs):
        seen["pairs"] = pairs
        raise cli.UsageError("stop here")

    monkeypatch.setattr(cli, "_schedule_options", record)
    cli.main(["train", "--schedule", "vcycle", "--schedule-args", "levels=2", "--schedule-args", "alpha=0.3",
              "--out", str(tmp_path / "out")])
    assert seen["pairs"] == ["levels=2", "alpha=0.3"]


def test_a_fault_while_training_is_not_a_usage_error(monkeypatch, tmp_path):
    """A ValueError raised once training runs is a bug or a fault, not a bad flag: its traceback is kept."""
    def broken(*args, **kwargs):
        raise ValueError("something inside the loop")

    monkeypatch.setattr(E, "run", broken)
    monkeypatch.setattr(E, "prepare_data", lambda exp: None)
    with pytest.raises(ValueError, match="something inside the loop"):
        cli.main(["train", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("fsdp,fsdp_transitions,expected", [
    (True, "local", "fsdp_transitions must be one of ('shard-local', 'gather'), got 'local'"),
    (False, "gather", "fsdp_transitions='gather' chooses how FSDP2 runs make transitions: set fsdp=True"),
])
def test_the_api_refuses_an_fsdp_transitions_it_cannot_honour_before_any_data(fsdp, fsdp_transitions, expected,
                                                                              monkeypatch, tmp_path):
    from growlib.errors import InputError

    monkeypatch.setattr(E, "rank_and_world", lambda: (0, 2))  # as under torchrun
    experiment = E.Experiment(family="gpt2", size=SIZE, cache_dir=str(tmp_path / "cache"), device="cpu")
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        E.train(experiment, "vcycle", fsdp=fsdp, fsdp_transitions=fsdp_transitions)
