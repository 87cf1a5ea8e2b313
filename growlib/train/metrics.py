"""What a run measures and reports: the validation loss of a model (``evaluate``), one point of the
validation curve (``Evaluation``), a finished run's totals (``RunResult``) and the JSONL metrics log every
step and evaluation is appended to (``MetricsLog``, written by rank 0 only and cut back on resume).  These
are the records the comparisons, plots and tuning read, so they stay independent of how a run trains."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from growlib.train.distributed import autocast, is_main


class MetricsLog:
    """Append-only JSONL: one record per training step and per evaluation."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (and a line cut short by a crash): a resumed run logs them again."""
        if not self.path or not os.path.exists(self.path) or not is_main():
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.path and is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Evaluation(NamedTuple):
    """One point of a run's validation curve.  ``parameters`` is the size of the model evaluated: a
    schedule's smaller models (a coarse level, a shallow stage) are evaluated too, but only evaluations of
    the final model's size count as reaching a target loss (growlib.train.compare.cost_to_reach)."""

    step: int
    flops: float
    wall: float
    val_loss: float
    parameters: int


@dataclass
class RunResult:
    """Totals of a finished run and its evaluation curve."""

    steps: int
    flops: float
    wall_seconds: float
    final_val_loss: float
    evals: list[Evaluation]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict]) -> float:
    """The mean loss over ``batches`` in eval mode (the model's training mode is restored)."""
    was_training = model.training
    model.eval()
    with autocast(model):
        losses = [float(model(**batch).loss) for batch in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameter elements (a tied embedding counts once), frozen ones included."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())  # ZeRO-3: p is empty
