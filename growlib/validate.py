"""The checks public entry points make of their scalar arguments, spelled once.

Each names the parameter, says what was expected and shows what it got: a value of the wrong type is a
TypeError ("steps must be an int, got float"), a value out of range a ValueError ("steps must be an int >= 1,
got 0").  bool is refused wherever a number is expected (True is an int to Python, never a step count)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence, TypeVar

Choice = TypeVar("Choice")


def is_int(value) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is not a bool (ints, floats, numpy scalars)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_int(name: str, value, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum] (None: unbounded on that side)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    low_ok = minimum is None or value >= minimum
    high_ok = maximum is None or value <= maximum
    if not (low_ok and high_ok):
        if maximum is None:
            expected = f"an int >= {minimum}"
        elif minimum is None:
            expected = f"an int <= {maximum}"
        else:
            expected = f"an int in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def require_number(name: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite float, >= ``minimum`` if given, > 0 if ``positive``."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    return float(value)


def require_fraction(name: str, value, allow_zero: bool = False) -> float:
    """``value`` as a float in (0, 1], or [0, 1] with ``allow_zero``."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0 <= value <= 1 if allow_zero else 0 < value <= 1):
        raise ValueError(f"{name} must lie in {'[0' if allow_zero else '(0'}, 1], got {value}")
    return float(value)


def require_choice(name: str, value: Choice, choices: Sequence[Choice]) -> Choice:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
