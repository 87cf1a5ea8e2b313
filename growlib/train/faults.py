"""Test-only fault injection, read from the environment variable ``GROWLIB_FAULT_INJECT`` and nothing else.

The reliability tests kill or break a real ``growlib train`` process at chosen points; these hooks make those
points deterministic.  Unset (the normal case), every hook is a no-op.  The value is a comma-separated list:

* ``sleep_in_transition:<stage>``         sleep inside the transition into stage <stage> (the new model is
                                          built, nothing of it trained or saved yet);
* ``sleep_in_checkpoint_write[:<step>]``  sleep halfway through writing the temporary file of the checkpoint of
                                          global step <step> (any checkpoint when <step> is left out);
* ``fail_checkpoint_write[:<step>]``      raise OSError(ENOSPC, "No space left on device") halfway through that
                                          write, as a full disk would;
* ``sleep_at_step:<step>[:<rank>]``       sleep before optimizer step <step> (1-based), on rank <rank> only if
                                          given;
* ``exit_at_step:<step>[:<rank>]``        exit at once (``os._exit(13)``, no clean-up: a crashed rank) before
                                          optimizer step <step>, on rank <rank> only if given.

A sleeping process first prints ``growlib fault injection: <fault>`` to stderr, so a test knows where it is
before it kills it."""

from __future__ import annotations

import errno
import os
import sys
import time

ENV = "GROWLIB_FAULT_INJECT"
ACTIONS = ("sleep_in_transition", "sleep_in_checkpoint_write", "fail_checkpoint_write", "sleep_at_step",
           "exit_at_step")
SLEEP_SECONDS = 3600


def _faults() -> list[tuple[str, list[str]]]:
    value = os.environ.get(ENV, "")
    faults = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        action, *args = item.split(":")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown fault {action!r} in {value!r}; known: {ACTIONS}")
        faults.append((action, args))
    return faults


def _sleep(what: str) -> None:
    print(f"growlib fault injection: {what} (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(SLEEP_SECONDS)


def in_transition(stage: str) -> None:
    for action, args in _faults():
        if action == "sleep_in_transition" and args == [stage]:
            _sleep(f"sleep_in_transition:{stage}")


def in_checkpoint_write(step: int) -> None:
    for action, args in _faults():
        if action == "sleep_in_checkpoint_write" and args in ([], [str(step)]):
            _sleep(f"sleep_in_checkpoint_write:{step}")
        if action == "fail_checkpoint_write" and args in ([], [str(step)]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def before_step(step: int, rank: int) -> None:
    for action, args in _faults():
        if action in ("sleep_at_step", "exit_at_step") and args[:1] == [str(step)] and args[1:] in ([], [str(rank)]):
            if action == "exit_at_step":
                print(f"growlib fault injection: exit_at_step:{step} on rank {rank}", file=sys.stderr, flush=True)
                os._exit(13)
            _sleep(f"sleep_at_step:{step} on rank {rank}")
