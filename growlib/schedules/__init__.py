"""Training schedules: each method as a list of stages for growlib.train.loop.run_schedule."""

from __future__ import annotations

import inspect

from growlib.schedules.multilevel import baseline, ode_multilevel, vcycle
from growlib.schedules.progressive import ligo, msg, mslt, stack

SCHEDULES = {"baseline": baseline, "vcycle": vcycle, "ode_multilevel": ode_multilevel, "mslt": mslt,
             "stack": stack, "msg": msg, "ligo": ligo}


def build_schedule(name: str, total_steps: int, final_layers: int, **options):
    """The stages of schedule ``name`` for a budget of ``total_steps`` optimizer steps of the full model."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    for label, value in (("total_steps", total_steps), ("final_layers", final_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    builder = SCHEDULES[name]
    accepted = inspect.signature(builder).parameters
    unknown = set(options) - set(accepted)
    if unknown:
        raise ValueError(f"schedule {name!r} takes options {sorted(set(accepted) - {'total_steps', 'final_layers'})}, "
                         f"got unknown {sorted(unknown)}")
    if "final_layers" in accepted:
        options["final_layers"] = final_layers
    return builder(total_steps, **options)
