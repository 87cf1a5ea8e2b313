"""`growlib schedules` lists every option of every schedule from its builder, and --schedule-args values are
read as the types the builders declare, in the spellings people write."""

from __future__ import annotations

import inspect

import pytest

from growlib import cli
from growlib.schedules import SCHEDULES, parse_options, schedule_options


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_option_of_every_schedule_is_listed_with_its_meaning(name):
    declared = [p for p in inspect.signature(SCHEDULES[name]).parameters if p not in ("total_steps", "final_layers")]
    options = schedule_options(name)
    assert [o.name for o in options] == declared
    assert all(o.meaning for o in options), [o.name for o in options if not o.meaning]
    listing = cli.describe_schedules(name)
    for option in options:
        assert f"  {option.name} ({option.type}, default {option.default!r}): {option.meaning}" in listing


def test_the_listing_has_every_schedule(capsys):
    assert cli.main(["schedules"]) == 0
    out = capsys.readouterr().out
    assert all(out.count(f"\n{name}: ") + out.startswith(f"{name}: ") == 1 for name in SCHEDULES)
    assert "baseline: Training from scratch" in out and "(no options)" in out


@pytest.mark.parametrize("pair,expected", [
    ("frozen_forward=True", {"frozen_forward": True}),
    ("frozen_forward=false", {"frozen_forward": False}),
    ("frozen_forward=1", {"frozen_forward": True}),
    ("frozen_forward=none", {"frozen_forward": None}),
    ("layer_counts=1,2,4", {"layer_counts": [1, 2, 4]}),
    ("layer_counts=[1,2,4]", {"layer_counts": [1, 2, 4]}),
    ("stage_fractions=0.2,0.4", {"stage_fractions": [0.2, 0.4]}),
    ("joint_fraction=0.5", {"joint_fraction": 0.5}),
])
def test_values_take_the_declared_type(pair, expected):
    assert parse_options("mslt", [pair]) == expected


def test_ints_strings_and_optional_floats():
    assert parse_options("vcycle", ["levels=3", "optimizer_policy=keep", "up_fraction=null", "alpha=1"]) == {
        "levels": 3, "optimizer_policy": "keep", "up_fraction": None, "alpha": 1.0}
    assert parse_options("ode_multilevel", ["coherence=yes"]) == {"coherence": True}


@pytest.mark.parametrize("name,pair,match", [
    ("vcycle", "levels=2.5", "levels (int) expects an integer"),
    ("vcycle", "alpha=half", "alpha (float) expects a finite number"),
    ("vcycle", "alpha=nan", "alpha (float) expects a finite number"),
    ("mslt", "stage_fractions=0.5,inf", "expects a list of floats"),
    ("vcycle", "levels=none", "levels (int) expects an integer"),  # levels has no None
    ("mslt", "frozen_forward=maybe", "expects true or false"),
    ("stack", "layer_counts=1,two", "expects a list of ints"),
    ("baseline", "alpha=1", "takes options none"),
])
def test_bad_values_name_the_option_and_what_it_accepts(name, pair, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        parse_options(name, [pair])


def test_an_option_given_twice_is_refused():
    with pytest.raises(ValueError, match="levels given twice"):
        parse_options("vcycle", ["levels=2", "levels=3"])
