"""Training schedules: each method as a list of stages (growlib.schedules.protocol) that the training loop's
``run_schedule`` runs."""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

from growlib.schedules.multilevel import baseline, ode_multilevel, vcycle
from growlib.schedules.progressive import ligo, msg, mslt, stack
from growlib.validate import require_int

#: in growlib.names.SCHEDULE_NAMES' order (tests/test_cli_fast.py checks it)
SCHEDULES = {"baseline": baseline, "vcycle": vcycle, "ode_multilevel": ode_multilevel, "mslt": mslt,
             "stack": stack, "msg": msg, "ligo": ligo}
#: parameters every builder gets from the run rather than from the user
_FROM_THE_RUN = ("total_steps", "final_layers")


class ScheduleOption(NamedTuple):
    """One option of a schedule, as its builder declares it: the annotation, the default and, from the
    builder's docstring (its ``Options:`` section), what it means."""

    name: str
    type: str
    default: object
    meaning: str


def schedule_options(name: str) -> list[ScheduleOption]:
    """The options schedule ``name`` takes, read from its builder's signature and docstring."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {name!r}")
    builder = SCHEDULES[name]
    doc = inspect.getdoc(builder) or ""
    meanings = {}
    if "Options:" in doc:
        for line in doc.split("Options:", 1)[1].splitlines():
            key, colon, text = line.strip().partition(": ")
            if colon:
                meanings[key] = text
    return [ScheduleOption(p.name, str(p.annotation), p.default, meanings.get(p.name, ""))
            for p in inspect.signature(builder).parameters.values() if p.name not in _FROM_THE_RUN]


_TRUE, _FALSE, _NONE = ("true", "yes", "1"), ("false", "no", "0"), ("none", "null")


def _parse_value(option: ScheduleOption, text: str):
    """``text`` as the option's type: booleans as true/false (any case), yes/no or 1/0; lists as 1,2,4 or
    [1,2,4]; None as none/null where the option allows it."""
    kinds = [kind.strip() for kind in option.type.split("|")]
    lowered = text.strip().lower()
    if "None" in kinds and lowered in _NONE:
        return None
    if "bool" in kinds:
        if lowered in _TRUE + _FALSE:
            return lowered in _TRUE
        raise ValueError(f"expects true or false, got {text!r}")
    for kind, convert in (("list[int]", int), ("list[float]", _finite)):
        if kind in kinds:
            items = text.strip().removeprefix("[").removesuffix("]").split(",")
            try:
                return [convert(item) for item in items]
            except ValueError:
                raise ValueError(f"expects a list of {kind[5:-1]}s like 1,2,4 or [1,2,4], got {text!r}") from None
    for kind, convert in (("int", int), ("float", _finite)):
        if kind in kinds:
            try:
                return convert(text)
            except ValueError:
                if kind == "int" and "float" not in kinds:
                    raise ValueError(f"expects an integer, got {text!r}") from None
                if kind == "float":
                    raise ValueError(f"expects a finite number, got {text!r}") from None
    if "str" in kinds:
        return text
    raise TypeError(f"option {option.name} is declared {option.type!r}, which --schedule-args cannot read")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def parse_options(name: str, pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings (the command line's ``--schedule-args``) as schedule ``name``'s options, each value
    converted to the type its builder declares; ValueError naming the option and what it accepts."""
    options = {option.name: option for option in schedule_options(name)}
    parsed = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals:
            raise ValueError(f"--schedule-args expects KEY=VALUE, got {pair!r}")
        if key not in options:
            raise ValueError(f"--schedule-args: schedule {name!r} takes options {sorted(options) or 'none'}, got "
                             f"unknown {key!r} (growlib schedules lists them)")
        if key in parsed:
            raise ValueError(f"--schedule-args: {key} given twice")
        try:
            parsed[key] = _parse_value(options[key], text)
        except ValueError as error:
            raise ValueError(f"--schedule-args {key} ({options[key].type}) {error}") from None
    return parsed


def build_schedule(name: str, total_steps: int, final_layers: int, **options):
    """The stages of schedule ``name`` for a budget of ``total_steps`` optimizer steps of the full model."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    for label, value in (("total_steps", total_steps), ("final_layers", final_layers)):
        require_int(label, value)
    builder = SCHEDULES[name]
    accepted = inspect.signature(builder).parameters
    unknown = set(options) - set(accepted)
    if unknown:
        raise ValueError(f"schedule {name!r} takes options {sorted(set(accepted) - {'total_steps', 'final_layers'})}, "
                         f"got unknown {sorted(unknown)}")
    if "final_layers" in accepted:
        options["final_layers"] = final_layers
    return builder(total_steps, **options)
