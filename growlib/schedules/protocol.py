"""The schedule protocol: what a schedule builds (``Stage``s whose ``enter`` returns a ``Transition``) and what
its stages read and leave behind (``RunState``), with the vocabularies they are checked against (the
optimizer policies, the learning-rate schedules).  It lives with the schedules, which build these types, and
imports nothing of the training package, which executes them: the training loop depends on the protocol,
never the other way round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from growlib.schema import GrowthMap

#: What a transition does with the optimizer: a fresh one, a state the schedule kept for this very model, or
#: the old state through the transition's map (growlib.optim.map_optimizer_state).
OPTIMIZER_POLICIES = ("reset", "keep", "map")
#: "restart": warmup + cosine restarted at every stage; "continue": one warmup + cosine over the whole run.
LR_SCHEDULES = ("restart", "continue")


@dataclass
class Transition:
    """What a stage starts from.

    ``optimizer_policy``: ``reset`` starts a fresh optimizer; ``map`` carries the previous optimizer's state
    through ``growth_map`` (growlib.map_optimizer_state); ``keep`` loads ``optimizer_state``, a state dict the
    schedule saved earlier for this very model (e.g. the fine level's own state, resumed after a coarse
    phase).  ``flops`` is compute the transition itself spent beyond applying maps (e.g. fitting LiGO)."""

    model: torch.nn.Module
    growth_map: GrowthMap | None = None
    optimizer_policy: str = "reset"
    optimizer_state: dict | None = None
    flops: float = 0.0

    def __post_init__(self):
        if self.optimizer_policy not in OPTIMIZER_POLICIES:
            raise ValueError(f"optimizer_policy must be one of {OPTIMIZER_POLICIES}, got {self.optimizer_policy!r}")
        if self.optimizer_policy == "map" and self.growth_map is None:
            raise ValueError("optimizer_policy 'map' needs the transition's growth_map")
        if self.optimizer_policy == "keep" and self.optimizer_state is None:
            raise ValueError("optimizer_policy 'keep' needs the optimizer_state to load")


@dataclass
class Stage:
    """A phase of a schedule.  ``enter(state)`` returns the stage's Transition; ``freeze(model)`` (optional)
    marks the parameters that stay fixed; ``lr_scale`` multiplies the base learning rate; ``lr_schedule``
    restarts warmup + cosine at this stage or continues the run's one curve (``TrainConfig.lr_schedule``
    overrides it when set); ``before_step(model, step_in_stage)`` (optional) runs before every optimizer
    step, also after a resume (e.g. MSG ramps its masks there).  ``sharded_transition`` (a bool, or a function
    of the model being left that says): ``enter`` and ``freeze`` read and write weights only through growlib's
    map operators and ``requires_grad``, with the ``reset`` optimizer policy, so under FSDP2 they may run on the
    sharded model, each rank building its shard of the new one (growlib.sharded); otherwise the loop gathers the
    model whole first."""

    name: str
    steps: int
    enter: Callable[["RunState"], Transition]
    freeze: Callable[[torch.nn.Module], None] | None = None
    lr_scale: float = 1.0
    before_step: Callable[[torch.nn.Module, int], None] | None = None
    lr_schedule: str = "restart"
    sharded_transition: bool | Callable[[torch.nn.Module], bool] = False

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be an int >= 1, got {self.steps!r}")
        if not self.lr_scale > 0:
            raise ValueError(f"stage {self.name!r}: lr_scale must be > 0, got {self.lr_scale!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"stage {self.name!r}: lr_schedule must be one of {LR_SCHEDULES}, got "
                             f"{self.lr_schedule!r}")


@dataclass
class RunState:
    """What stages read and leave behind: the current model and any models a schedule keeps for later
    (e.g. the V-cycle's fine model before coalescing)."""

    model: torch.nn.Module
    kept: dict[str, torch.nn.Module] = field(default_factory=dict)
    #: parameter name -> v: the stage's loss gets + <v, theta> (MG/OPT first-order coherence); set by a
    #: stage's enter, cleared at every transition, checkpointed with the run.
    linear_term: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``sample_batch(i)``: the training micro-batch i positions ahead of the current one, for transitions
    #: that need data (the coherence term's gradients, fitting LiGO).
    sample_batch: Callable[..., dict] | None = None
    #: FLOPs of one micro-batch's forward + backward for a model as currently frozen, for transitions that
    #: report the work they do (``Transition.flops``).
    micro_batch_flops: Callable[[torch.nn.Module], float] | None = None
    #: True while a schedule is only walked to count its FLOPs: transitions must build the same models and
    #: report the same FLOPs, but may skip the training work they would do (fitting LiGO).
    dry_run: bool = False
    #: small JSON-able facts a schedule needs in later stages (e.g. the target model's config); checkpointed.
    notes: dict[str, str] = field(default_factory=dict)
    #: the optimizer of the stage being left (read-only for ``enter``: save its state_dict to ``keep`` it).
    optimizer: torch.optim.Optimizer | None = None
    #: optimizer state dicts a schedule keeps for a later ``keep`` transition; checkpointed with the run.
    kept_optimizer_states: dict[str, dict] = field(default_factory=dict)


def linear_term_value(model: torch.nn.Module, term: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """<v, theta> summed over the parameters ``term`` names: what ``RunState.linear_term`` adds to the loss."""
    if not term:
        return 0.0
    params = dict(model.named_parameters())
    return sum((v * params[name]).sum() for name, v in term.items())
