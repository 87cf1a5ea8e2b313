"""What a run shows while it trains: a tqdm bar on a terminal, and elsewhere (CI, nohup, a pipe, a log file)
a plain line every ``interval_s`` seconds, so a long run is never silent; and, for ``compare``, which run of
how many it is at and when the whole comparison should end."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """``seconds`` as 45s, 12m05s or 3h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepProgress:
    """The ``progress`` callback of one run (growlib.train.loop.run_schedule calls it after every step with the
    step's metrics record).  On a terminal a tqdm bar; otherwise a line such as
    ``vcycle seed 2: step 120/488, stage coarse, loss 4.512, 5300 tok/s, ETA 1m12s`` at the first step, then
    whenever ``interval_s`` seconds have passed, and at the last step."""

    def __init__(self, label: str = "", interval_s: float = 30.0, stream: TextIO | None = None,
                 terminal: bool | None = None):
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be a number of seconds >= 0, got {interval_s!r}")
        self.label, self.interval_s = label, interval_s
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.bar, self.last_line = None, None

    def __call__(self, record: dict) -> None:
        step, total = record["step"], record["total_steps"]
        tokens_per_s = record["tokens"] / max(record["wall"], 1e-9)
        if self.terminal:
            self._bar(record, step, total, tokens_per_s)
            return
        now = time.monotonic()
        if self.last_line is not None and now - self.last_line < self.interval_s and step != total:
            return
        self.last_line = now
        eta = record["wall"] / step * (total - step) if step else 0.0
        prefix = f"{self.label}: " if self.label else ""
        print(f"{prefix}step {step}/{total}, stage {record['stage']}, loss {record['loss']:.3f}, "
              f"{tokens_per_s:.0f} tok/s, ETA {duration(eta)}", file=self.stream, flush=True)

    def _bar(self, record: dict, step: int, total: int, tokens_per_s: float) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step - 1, unit="step", desc=self.label or None, file=self.stream)
        self.bar.update(1)
        self.bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}",
                             flops=f"{record['flops']:.3g}")
        if step == total:
            self.bar.close()


class RunPlan:
    """Where a comparison stands: runs planned per schedule (tuning runs and reported runs; a sweep that goes
    past the edge of its grid adds some; a schedule that fails gives up the rest of its own), runs done, and an
    ETA from the steps still to train at the pace of the steps trained so far (runs read back from a cache or a
    checkpoint cost nothing and do not count in the pace)."""

    def __init__(self):
        self.runs = self.steps = self.done_runs = self.done_steps = self.trained_steps = 0
        self.trained_seconds = 0.0
        self._left: dict[str, list[int]] = {}  # schedule -> [runs, steps] planned and not done yet

    def add(self, schedule: str, steps: int, runs: int = 1) -> None:
        self.runs += runs
        self.steps += steps * runs
        left = self._left.setdefault(schedule, [0, 0])
        left[0] += runs
        left[1] += steps * runs

    def position(self) -> str:
        return f"run {min(self.done_runs + 1, self.runs)} of {self.runs}"

    def finished(self, schedule: str, steps: int, seconds: float, trained: bool) -> None:
        self.done_runs += 1
        self.done_steps += steps
        self._left[schedule][0] -= 1
        self._left[schedule][1] -= steps
        if trained:
            self.trained_steps += steps
            self.trained_seconds += seconds

    def abandon(self, schedule: str) -> None:
        """``schedule`` failed: the runs it had left will not happen."""
        runs, steps = self._left.pop(schedule, (0, 0))
        self.runs -= runs
        self.steps -= steps

    def done(self) -> str:
        """How many runs are done, and about how long the rest will take."""
        if not self.trained_steps:
            return f"{self.done_runs} of {self.runs} runs done"
        remaining = max(0, self.steps - self.done_steps) * self.trained_seconds / self.trained_steps
        return f"{self.done_runs} of {self.runs} runs done, about {duration(remaining)} left"
