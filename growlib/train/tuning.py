"""Equal tuning for every arm of a comparison: each schedule, the baseline included, gets the same learning-rate
sweep on seeds that are never reported, and is then compared at its own best learning rate.

Without it a comparison measures the recipes' tuning as much as the methods: at GPT-2 4x128 the baseline at
twice the default learning rate ended below four of the six tuned methods.  Tuning runs are cached as JSON
files named by a fingerprint of everything that decides their result, so re-running ``compare`` reuses them
and a changed setting can never pick up a stale one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from growlib.validate import is_int, is_number

if TYPE_CHECKING:  # loop imports torch, which the command line's argument checks do without
    from growlib.train.metrics import RunResult

DEFAULT_LR_GRID = (0.5, 1.0, 2.0, 4.0)
#: Far from the seeds people report (0, 1, 2, ...), so that ``--seeds`` rarely has to avoid it.
DEFAULT_TUNE_SEEDS = (1000,)
#: How many multipliers a sweep may add past an edge of the grid that wins.
DEFAULT_EXTEND = 2
#: Bumped whenever what a cached tuning run holds, or what its fingerprint covers, changes.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Tuning:
    """How every arm's learning rate is chosen, the same way for each: each multiplier in ``lr_grid`` of the
    base learning rate, trained on each of ``seeds`` for ``fraction`` of the arm's own budget (its steps and
    the warmup scaled alike, so every arm's warmup stays the same share of its run); the multiplier with the
    lowest mean final validation loss wins.  A winner at an edge of the grid says the optimum may lie beyond
    it, so the sweep goes on past that edge, one multiplier at a time at the grid's own ratio, up to
    ``extend`` more; the same rule for every arm.  A one-multiplier grid is a fixed choice and never extends."""

    lr_grid: tuple[float, ...] = DEFAULT_LR_GRID
    seeds: tuple[int, ...] = DEFAULT_TUNE_SEEDS
    fraction: float = 1.0
    extend: int = DEFAULT_EXTEND

    def __post_init__(self):
        grid, seeds = tuple(self.lr_grid), tuple(self.seeds)
        if not grid or any(not is_number(m) or not math.isfinite(m) or m <= 0 for m in grid):
            raise ValueError(f"lr_grid must be a non-empty list of positive learning-rate multipliers, got "
                             f"{list(self.lr_grid)!r}")
        if len(set(grid)) != len(grid):
            raise ValueError(f"lr_grid must not repeat a multiplier, got {list(grid)!r}")
        if not seeds or any(not is_int(s) or s < 0 for s in seeds):
            raise ValueError(f"tuning seeds must be a non-empty list of ints >= 0, got {list(self.seeds)!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"tuning seeds must not repeat, got {list(seeds)!r}")
        if not is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"tuning fraction must be in (0, 1] (the share of each arm's budget a tuning run "
                             f"trains), got {self.fraction!r}")
        if isinstance(self.extend, bool) or not isinstance(self.extend, int) or self.extend < 0:
            raise ValueError(f"tuning extend must be an int >= 0 (multipliers a sweep may add past a winning edge), "
                             f"got {self.extend!r}")
        object.__setattr__(self, "lr_grid", tuple(float(m) for m in grid))
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "fraction", float(self.fraction))

    def check_disjoint(self, reported_seeds: list[int]) -> None:
        """Choosing on the seeds that are reported would flatter every arm by its luckiest seed."""
        shared = sorted(set(self.seeds) & set(reported_seeds))
        if shared:
            raise ValueError(f"the tuning seeds {list(self.seeds)} must not include a reported seed "
                             f"({reported_seeds}); both hold {shared}: choose other tuning seeds")

    def scaled(self, steps: int, warmup_steps: int) -> tuple[int, int]:
        """(steps, warmup steps) of a tuning run for an arm of ``steps`` steps."""
        return max(1, round(steps * self.fraction)), round(warmup_steps * self.fraction)

    def next_multiplier(self, tried: dict[float, float]) -> float | None:
        """The next multiplier to try past the edge that wins ``tried`` (multiplier -> mean final loss), at the
        grid's ratio there; None when the winner is inside the swept range, the sweep has already added
        ``extend`` multipliers, or the grid is a single multiplier (a fixed choice, not a sweep)."""
        if len(self.lr_grid) == 1 or len(tried) - len(self.lr_grid) >= self.extend:
            return None
        best, swept = best_multiplier(tried), sorted(tried)
        if best == swept[0]:
            return swept[0] * swept[0] / swept[1]
        if best == swept[-1]:
            return swept[-1] * swept[-1] / swept[-2]
        return None

    def describe(self, base_lr: float) -> str:
        grid = ", ".join(f"{m:g}" for m in self.lr_grid)
        budget = "the full budget" if self.fraction == 1 else f"{self.fraction:.0%} of each arm's budget"
        extended = f", extended past a winning edge up to {self.extend} times" if self.extend else ""
        return (f"LR tuned per arm, the same way for each: x{{{grid}}} of {base_lr:g}{extended} on seed(s) "
                f"{list(self.seeds)}, {budget}")


def untuned_label(base_lr: float) -> str:
    return f"UNTUNED: every arm at lr {base_lr:g} (--no-tune)"


def best_multiplier(mean_losses: dict[float, float]) -> float:
    """The multiplier of lowest mean final loss (NaN losses never win); ties go to the smaller learning rate."""
    finite = {m: loss for m, loss in mean_losses.items() if math.isfinite(loss)}
    if not finite:
        raise ValueError("every learning rate of the grid diverged (non-finite final loss): lower --lr or "
                         "change --lr-grid")
    return min(sorted(finite), key=lambda m: finite[m])


def mean_final_loss(results: list[RunResult]) -> float:
    return statistics.mean(r.final_val_loss for r in results)


def fingerprint(settings: dict) -> str:
    """A short hash of ``settings`` (JSON-able): the name of a cached result."""
    text = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_result(path: str, result: RunResult, settings: dict) -> None:
    """Write atomically (a temporary file renamed), so an interrupted write leaves nothing that looks done."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {"format": CACHE_FORMAT, "settings": settings, "steps": result.steps, "flops": result.flops,
               "wall_seconds": result.wall_seconds, "final_val_loss": result.final_val_loss,
               "evals": [list(e) for e in result.evals]}
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(payload, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class CachedRunMismatch(ValueError):
    """A tuning cache file whose recorded settings are not the ones its name stands for."""


def load_result(path: str, settings: dict) -> RunResult | None:
    """The cached result at ``path``, or None if there is none.  A file whose recorded settings differ from
    ``settings`` (a hash collision, or a hand-edited file) is refused rather than used."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        payload = json.load(f)
    expected = json.loads(json.dumps(settings, default=str))
    if payload.get("format") != CACHE_FORMAT or payload.get("settings") != expected:
        raise CachedRunMismatch(f"{path} holds a tuning run of other settings than its name says: delete it, or "
                                "give compare another --out")
    from growlib.train.metrics import Evaluation, RunResult

    return RunResult(steps=payload["steps"], flops=payload["flops"], wall_seconds=payload["wall_seconds"],
                     final_val_loss=payload["final_val_loss"], evals=[Evaluation(*e) for e in payload["evals"]])
