"""The numerical guards of a run: a NaN / inf loss or gradient is found with the step, stage and tensor that
hold it, and ``TrainConfig.on_nonfinite`` decides whether the run stops or drops that step (counting the
steps dropped in a row, up to ``max_consecutive_skips``); a model with a NaN / inf parameter is never trained
on after a transition nor checkpointed.  Kept in one place so that every fault raises the same
FloatingPointError wording and the skip count is checkpointed and resumed as one number."""

from __future__ import annotations

import math

import torch

from growlib.train.config import TrainConfig


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first (name, tensor) pair whose tensor holds NaN or inf (None tensors are skipped)."""
    for name, tensor in named_tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else getattr(tensor, "ds_tensor", tensor)
        # FSDP2: this rank's shard (a DTensor's local part); ZeRO-3: its partition (the parameter itself is empty)
        if local is not None and not bool(torch.isfinite(local).all()):
            return name
    return None


def require_finite_parameters(model: torch.nn.Module, where: str) -> None:
    """Raise FloatingPointError naming the first parameter holding NaN or inf, and ``where`` that was found.
    Under torchrun every rank decides alike (a NaN in one rank's FSDP shard stops them all)."""
    broken = first_nonfinite(model.named_parameters())
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(broken is not None)], device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and broken is None:
            broken = "(in another rank's shard)"
    if broken is not None:
        raise FloatingPointError(f"parameter {broken!r} holds NaN or inf {where}")


def nonfinite_fault(loss_sum: float, steps, step: int, stage: str) -> tuple[str, str | None] | None:
    """None when this step's loss and gradients are finite, else (what is wrong, the tensor's name or None).
    The loss is checked first: a NaN loss makes every gradient NaN, and the loss names the cause.  ``steps``
    is the stage's step backend (growlib.train.distributed), which clips and searches the gradients."""
    if not math.isfinite(loss_sum):
        return f"the loss is {loss_sum} at step {step} (stage {stage!r})", None
    parameter = steps.clip_and_find_nonfinite_gradient()
    if parameter is None:
        return None
    return (f"the gradient of parameter {parameter!r} holds NaN or inf at step {step} (stage {stage!r}; the loss "
            f"is finite: {loss_sum:.6g})"), parameter


class NonfiniteGuard:
    """Takes or drops each optimizer step under ``config.on_nonfinite``, counting the steps dropped in a row
    (``consecutive_skips``, which a checkpoint holds so that a resumed run counts on)."""

    def __init__(self, config: TrainConfig, consecutive_skips: int = 0):
        self.config, self.consecutive_skips = config, consecutive_skips

    def step_or_skip(self, loss_sum: float, steps, step: int, stage: str) -> tuple[str, str | None] | None:
        """Update the parameters through ``steps`` when the loss and gradients are finite (returns None);
        otherwise drop the step and return its fault (``'skip'``), or raise FloatingPointError (``'stop'``, or
        more than ``max_consecutive_skips`` dropped in a row)."""
        fault = nonfinite_fault(loss_sum, steps, step, stage)
        config = self.config
        if fault is None:
            steps.step()
            self.consecutive_skips = 0
        elif config.on_nonfinite == "skip" and self.consecutive_skips < config.max_consecutive_skips:
            steps.skip()
            self.consecutive_skips += 1
        elif config.on_nonfinite == "skip":
            raise FloatingPointError(f"{fault[0]}; that is {self.consecutive_skips + 1} non-finite steps in a row, "
                                     f"more than on_nonfinite='skip' drops (max_consecutive_skips="
                                     f"{config.max_consecutive_skips})")
        else:
            raise FloatingPointError(f"{fault[0]}; stopping (on_nonfinite='stop'): the last checkpoint holds "
                                     "the last good state")
        return fault
