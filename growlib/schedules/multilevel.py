"""Multilevel schedules: the V-cycle of the multi-level framework and the ODE multilevel method."""

from __future__ import annotations

import growlib
from growlib.train.loop import RunState, Stage, Transition


def _split(total: int, fractions: list[float]) -> list[int]:
    """Integer step counts proportional to ``fractions`` that add up to round(total * sum(fractions))."""
    target = round(total * sum(fractions))
    steps = [int(total * f) for f in fractions]
    steps[-1] += target - sum(steps)
    if min(steps) < 1:
        raise ValueError(f"total_steps={total} is too small for stage fractions {fractions}: a stage gets no step")
    return steps


def identity_stage(name: str, steps: int) -> Stage:
    return Stage(name, steps, lambda s: Transition(s.model))


def vcycle(total_steps: int, levels: int = 2, down_fraction: float = 0.05, coarsest_fraction: float = 0.5,
           up_fraction: float = 0.45, alpha: float = 0.25, coarse_lr_scale: float = 2.0) -> list[Stage]:
    """Zou et al.'s V-cycle.  Down: train each level ``down_fraction`` of the budget, keep it, coalesce
    (width and depth halved).  Coarsest: train ``coarsest_fraction``.  Up: de-coalesce into the kept model
    with interpolation ``alpha`` (0.25 GPT/ViT, 0.5 BERT in the paper) and train ``up_fraction`` per level.
    Optimizer state is reset at each transition and the LR schedule restarts, as in the paper's code.
    Fractions are of ``total_steps``, the baseline's budget counted in optimizer steps."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    down, coarsest, up = _split(total_steps, [down_fraction, coarsest_fraction, up_fraction])
    stages = [identity_stage("level0-down", down)]

    def coalesce_into(level):
        def enter(state: RunState) -> Transition:
            state.kept[f"level{level - 1}"] = state.model
            return Transition(growlib.coalesce(state.model))
        return enter

    def interpolate_from(level):
        def enter(state: RunState) -> Transition:
            fine = state.kept.pop(f"level{level}")
            return Transition(growlib.interpolate_(fine, state.model, alpha))
        return enter

    for level in range(1, levels - 1):
        stages.append(Stage(f"level{level}-down", down, coalesce_into(level), lr_scale=coarse_lr_scale))
    stages.append(Stage(f"level{levels - 1}-coarsest", coarsest, coalesce_into(levels - 1),
                        lr_scale=coarse_lr_scale))
    for level in range(levels - 2, -1, -1):
        stages.append(Stage(f"level{level}-up", up, interpolate_from(level),
                            lr_scale=coarse_lr_scale if level else 1.0))
    return stages


def ode_multilevel(total_steps: int, cycles: int = 2, pre_fraction: float = 0.05, coarse_fraction: float = 0.3,
                   post_fraction: float = 0.15) -> list[Stage]:
    """Lauga et al.'s two-level method on the ODE view of a pre-LN transformer.  Each cycle: pre-smoothing fine
    steps, coarse steps on the even (then odd, alternating) layers with residual step h = 2, prolongation of
    the coarse layers back into the fine model, post-smoothing fine steps.  Fractions are per cycle, of
    ``total_steps``.  Optimizer state is reset at each transition (the paper names momentum across levels
    an open problem)."""
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    pre, coarse, post = _split(total_steps, [pre_fraction, coarse_fraction, post_fraction])
    stages = []

    def restrict(parity):
        def enter(state: RunState) -> Transition:
            state.kept["fine"] = state.model
            return Transition(growlib.restrict(state.model, parity=parity))
        return enter

    def prolong(parity):
        def enter(state: RunState) -> Transition:
            return Transition(growlib.prolong_(state.kept.pop("fine"), state.model, parity=parity))
        return enter

    for cycle in range(cycles):
        parity = ("even", "odd")[cycle % 2]
        stages += [identity_stage(f"cycle{cycle}-pre", pre),
                   Stage(f"cycle{cycle}-coarse-{parity}", coarse, restrict(parity)),
                   Stage(f"cycle{cycle}-post", post, prolong(parity))]
    return stages


def baseline(total_steps: int) -> list[Stage]:
    """Training from scratch: one stage, the whole budget."""
    return [identity_stage("full", total_steps)]
