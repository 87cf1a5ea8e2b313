"""The training settings every stage of a run shares: ``TrainConfig`` and its validation, the policies it
chooses between (non-finite steps, learning-rate schedules), and what follows from it alone: each step's
learning rate, the optimizer a stage trains with, and the part of the settings that is a run's identity.
Kept apart from the loop so that the command line, the experiments and the tests can build and check a
configuration without importing the machinery that trains."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from growlib.schedules.protocol import LR_SCHEDULES, Stage
from growlib.validate import require_choice, require_int, require_number

NONFINITE_POLICIES = ("stop", "skip")
#: TrainConfig fields that say how to react to faults, not what to compute: left out of a run's identity.
FAULT_POLICY_FIELDS = ("on_nonfinite", "max_consecutive_skips")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (a stage may scale the learning rate)."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    batch_size: int = 16
    seq_len: int = 64
    grad_accum: int = 1
    clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 8
    seed: int = 0
    #: "restart": warmup + cosine restarted at every stage (the papers' code); "continue": one warmup + cosine
    #: over the whole run, each stage scaling it by its lr_scale; None: each stage's own ``Stage.lr_schedule``
    #: (the schedule's default recipe: "continue" for ode_multilevel, "restart" for the others).
    lr_schedule: str | None = None
    #: A NaN / inf loss or gradient: "stop" raises FloatingPointError (the last checkpoint stays the last good
    #: state); "skip" drops that optimizer step and goes on, until ``max_consecutive_skips`` steps in a row
    #: were dropped.  Neither is part of a checkpoint's identity, so a stopped run may resume with "skip".
    on_nonfinite: str = "stop"
    max_consecutive_skips: int = 10

    def __post_init__(self):
        for name, minimum in (("batch_size", 1), ("seq_len", 1), ("grad_accum", 1), ("eval_every", 1),
                              ("eval_batches", 1), ("warmup_steps", 0), ("seed", 0)):
            require_int(f"TrainConfig.{name}", getattr(self, name), minimum)
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip"):
            require_number(f"TrainConfig.{name}", getattr(self, name))
        require_number("TrainConfig.lr", self.lr, positive=True)
        for name in ("weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0 (clip 0: no clipping), got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES + (None,):
            raise ValueError(f"TrainConfig.lr_schedule must be 'restart', 'continue' or None (each stage's own), "
                             f"got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        require_choice("TrainConfig.on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        require_int("TrainConfig.max_consecutive_skips", self.max_consecutive_skips)


def run_identity_config(config: TrainConfig) -> dict:
    """The settings a checkpoint must agree on to be resumed: everything but the fault policy."""
    return {k: v for k, v in asdict(config).items() if k not in FAULT_POLICY_FIELDS}


def learning_rate(config: TrainConfig, stage: Stage, step_in_stage: int, global_step: int | None = None,
                  total_steps: int | None = None) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio``: over each stage (``lr_schedule='restart'``) or over
    the whole run (``'continue'``, which needs ``global_step`` and ``total_steps``), times the stage's scale.
    The config's ``lr_schedule`` decides when set, else the stage's."""
    if (config.lr_schedule or stage.lr_schedule) == "continue":
        if global_step is None or total_steps is None:
            raise ValueError("lr_schedule 'continue' needs global_step and total_steps")
        return stage.lr_scale * _warmup_cosine(config, global_step, total_steps)
    return stage.lr_scale * _warmup_cosine(config, step_in_stage, stage.steps)


def _warmup_cosine(config: TrainConfig, step: int, steps: int) -> float:
    warmup = min(config.warmup_steps, max(1, steps // 10))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a stage trains: those its freezing left requiring grad."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """A fresh AdamW over the model's trainable parameters (fused on the GPU)."""
    params = trainable_parameters(model)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
