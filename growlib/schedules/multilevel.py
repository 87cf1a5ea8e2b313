"""Multilevel schedules: the V-cycle of the multi-level framework and the ODE multilevel method."""

from __future__ import annotations

import torch

import growlib
from growlib.apply import apply_map
from growlib.models import adapter_for
from growlib.operators.depth import restrict_map
from growlib.operators.multilevel import coalesce_map
from growlib.optim import dual_map
from growlib.schedules.protocol import OPTIMIZER_POLICIES, RunState, Stage, Transition
from growlib.validate import require_fraction, require_int, require_number


def check_budget(parts: dict[str, float]) -> None:
    """The stages of a schedule must spend exactly its budget: their fractions add up to 1."""
    if abs(sum(parts.values()) - 1.0) > 1e-6:
        raise ValueError(f"the stage fractions must add up to 1 (the whole budget), got "
                         f"{' + '.join(f'{k}={v:g}' for k, v in parts.items())} = {sum(parts.values()):g}")


def split_steps(total: int, fractions: list[float]) -> list[int]:
    """Integer step counts proportional to ``fractions`` that add up to round(total * sum(fractions))."""
    target = round(total * sum(fractions))
    steps = [int(total * f) for f in fractions]
    steps[-1] += target - sum(steps)
    if any(n < 1 for n, f in zip(steps, fractions) if f > 0):
        raise ValueError(f"total_steps={total} is too small for stage fractions "
                         f"[{', '.join(f'{f:.3g}' for f in fractions)}]: a stage gets no step")
    return steps


def _gradients(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """d loss / d parameter on ``batch`` for every parameter name (tied names share one tensor)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(**batch).loss, list(params.values()), allow_unused=True)
    by_id = {id(p): (g if g is not None else torch.zeros_like(p)).detach() for p, g in zip(params.values(), grads)}
    return {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def coherence_term(fine: torch.nn.Module, coarse: torch.nn.Module, parity: str, batch: dict) -> dict[str, torch.Tensor]:
    """MG/OPT's first-order coherence: v = R grad L_h(theta_h) - grad L_H(R theta_h), with R the restriction's
    gradient map (the dual of the parameter map: a branch weight doubled gets half the gradient)."""
    adapter = adapter_for(fine)
    coarse_grads = _gradients(coarse, batch)
    restricted = {n: torch.zeros_like(g) for n, g in coarse_grads.items()}
    by_id = {}
    for name, p in coarse.named_parameters(remove_duplicate=False):  # tied names share one tensor
        restricted[name] = by_id.setdefault(id(p), restricted[name])
    apply_map(dual_map(restrict_map(adapter.schema(fine), parity)), adapter.schema(fine, _gradients(fine, batch)),
              adapter.schema(coarse, restricted))
    return {n: restricted[n] - coarse_grads[n] for n, _ in coarse.named_parameters()}


def check_optimizer_policy(policy) -> str:
    """A multilevel schedule's ``optimizer_policy``, checked when the schedule is built (a Transition checks it
    again, but only at the transition, after the first level has trained)."""
    if policy not in OPTIMIZER_POLICIES:
        raise ValueError(f"optimizer_policy must be one of {OPTIMIZER_POLICIES}, got {policy!r}")
    return policy


def going_down(state: RunState, coarse: torch.nn.Module, growth_map, level_key: str, policy: str) -> Transition:
    """Leave a fine level for a coarser one under an optimizer policy: ``reset`` drops the fine state; ``keep``
    saves it for the return and starts the coarse level fresh; ``map`` saves it and also starts the coarse
    level from it, mapped through ``growth_map`` the way gradients map."""
    if policy != "reset" and state.optimizer is not None:
        state.kept_optimizer_states[level_key] = state.optimizer.state_dict()
    if policy == "map":
        return Transition(coarse, growth_map, optimizer_policy="map")
    return Transition(coarse)


def coming_up(state: RunState, fine: torch.nn.Module, level_key: str) -> Transition:
    """Return to a fine level: resume its saved optimizer state if the policy kept one."""
    saved = state.kept_optimizer_states.pop(level_key, None)
    if saved is None:
        return Transition(fine)
    return Transition(fine, optimizer_policy="keep", optimizer_state=saved)


def identity_stage(name: str, steps: int, lr_schedule: str = "restart") -> Stage:
    return Stage(name, steps, lambda s: Transition(s.model), lr_schedule=lr_schedule, sharded_transition=True)


def vcycle(total_steps: int, final_layers: int, levels: int = 2, down_fraction: float = 0.05,
           coarsest_fraction: float = 0.7, up_fraction: float | None = None, alpha: float = 0.5,
           coarse_lr_scale: float = 2.0, optimizer_policy: str = "reset") -> list[Stage]:
    """Zou et al.'s V-cycle.  Down: train each level ``down_fraction`` of the budget, keep it, coalesce
    (width and depth halved).  Coarsest: train ``coarsest_fraction``.  Up: de-coalesce into the kept model
    with interpolation ``alpha`` and train ``up_fraction`` per level (default: what is left, shared equally).
    The LR schedule restarts at each level; ``optimizer_policy`` ``reset`` (the paper's code) starts each
    level with a fresh optimizer, ``keep`` resumes a fine level's own state on the way up, ``map`` also starts
    each coarse level from the fine state mapped through the coalescing.  Fractions are of ``total_steps``,
    the baseline's budget in steps.

    Defaults from perf/results/tuning/gpt2-4x128/vcycle: 70% of the budget on the coarsest level and alpha 0.5
    reach the baseline's loss with the fewest FLOPs there; the paper's 50% and alpha 0.25 (its GPT setting;
    0.5 is its BERT one) never reached it.

    Options:
        levels: levels of the cycle, the full model included; each coarser one halves width and depth
        down_fraction: share of the budget each level trains on the way down
        coarsest_fraction: share of the budget the coarsest level trains
        up_fraction: share of the budget each level trains on the way up (None: what is left, shared equally)
        alpha: interpolation weight of the de-coalesced coarse model into the kept fine one
        coarse_lr_scale: learning-rate multiplier of the coarser levels
        optimizer_policy: reset | keep | map: the optimizer state at each transition
    """
    check_optimizer_policy(optimizer_policy)
    require_int("levels", levels, 2)
    if final_layers % 2 ** (levels - 1):
        raise ValueError(f"levels={levels} halves the depth {levels - 1} times, so the model's {final_layers} "
                         f"layers must be a multiple of {2 ** (levels - 1)}")
    require_fraction("alpha", alpha, allow_zero=True)
    require_number("coarse_lr_scale", coarse_lr_scale, positive=True)
    require_fraction("down_fraction", down_fraction)
    require_fraction("coarsest_fraction", coarsest_fraction)
    if up_fraction is None:
        up_fraction = (1.0 - coarsest_fraction - down_fraction * (levels - 1)) / (levels - 1)
    require_fraction("up_fraction", up_fraction)
    check_budget({f"{levels - 1} x down_fraction": down_fraction * (levels - 1), "coarsest_fraction": coarsest_fraction,
                  f"{levels - 1} x up_fraction": up_fraction * (levels - 1)})
    down, coarsest, up = split_steps(total_steps, [down_fraction, coarsest_fraction, up_fraction])
    stages = [identity_stage("level0-down", down)]

    def coalesce_into(level):
        def enter(state: RunState) -> Transition:
            fine = state.kept[f"level{level - 1}"] = state.model
            return going_down(state, growlib.coalesce(fine), coalesce_map(growlib.schema_of(fine).dims),
                              f"level{level - 1}", optimizer_policy)
        return enter

    def interpolate_from(level):
        def enter(state: RunState) -> Transition:
            fine = state.kept.pop(f"level{level}")
            return coming_up(state, growlib.interpolate_(fine, state.model, alpha), f"level{level}")
        return enter

    shard_local = optimizer_policy == "reset"  # the other policies carry optimizer state: gathered
    for level in range(1, levels - 1):
        stages.append(Stage(f"level{level}-down", down, coalesce_into(level), lr_scale=coarse_lr_scale,
                            sharded_transition=shard_local))
    stages.append(Stage(f"level{levels - 1}-coarsest", coarsest, coalesce_into(levels - 1),
                        lr_scale=coarse_lr_scale, sharded_transition=shard_local))
    for level in range(levels - 2, -1, -1):
        stages.append(Stage(f"level{level}-up", up, interpolate_from(level),
                            lr_scale=coarse_lr_scale if level else 1.0, sharded_transition=shard_local))
    return stages


def ode_multilevel(total_steps: int, final_layers: int, cycles: int = 1, pre_share: float = 0.1,
                   coarse_share: float = 0.6, coherence: bool = False, optimizer_policy: str = "reset",
                   lr_schedule: str = "continue") -> list[Stage]:
    """Lauga et al.'s two-level method on the ODE view of a pre-LN transformer.  The budget is split into
    ``cycles`` equal cycles; each spends ``pre_share`` of its steps on fine pre-smoothing, ``coarse_share`` on
    the even (then odd, alternating) layers with residual step h = 2, and the rest on fine post-smoothing after
    prolongation.  The paper names momentum across levels an open problem; ``optimizer_policy`` offers
    ``reset`` (a fresh optimizer at every transition), ``keep`` (the fine level resumes its own state after
    the coarse phase) and ``map`` (keep, and the coarse level starts from the fine state restricted like
    gradients); perf/momentum_policies.py measures them.  With ``coherence`` the coarse objective is MG/OPT's
    L_H(theta) + <v, theta>, v = R grad L_h - grad L_H(R theta_h) on one batch at the transition, so the
    coarse model starts along the fine gradient.

    The default recipe (one cycle: 10% fine, 60% coarse, 30% fine; one warmup + cosine over the whole run,
    ``lr_schedule='continue'``) needs the fewest FLOPs to reach the baseline's loss in
    perf/results/tuning/gpt2-4x128/ode_multilevel; two cycles with the LR restarted at each of their six
    stages never reached it there.

    Options:
        cycles: fine / coarse / fine cycles the budget is split into
        pre_share: share of each cycle on the fine model before the coarse phase
        coarse_share: share of each cycle on the coarse model (every other layer, residual step 2)
        coherence: add MG/OPT's first-order coherence term to the coarse objective
        optimizer_policy: reset | keep | map: the optimizer state at each transition
        lr_schedule: continue (one warmup + cosine over the run) | restart (one per stage)
    """
    if not isinstance(coherence, bool):
        raise TypeError(f"coherence must be a bool, got {type(coherence).__name__}")
    check_optimizer_policy(optimizer_policy)
    require_int("cycles", cycles)
    if final_layers % 2:
        raise ValueError(f"the coarse model keeps every other layer, so the model needs an even number of "
                         f"layers, got {final_layers}")
    require_fraction("pre_share", pre_share, allow_zero=True)
    require_fraction("coarse_share", coarse_share)
    post_share = require_fraction("the post share (1 - pre_share - coarse_share)", 1.0 - pre_share - coarse_share)
    per_cycle = [split_steps(total_steps, [s / cycles for s in (pre_share, coarse_share, post_share)])
                 for _ in range(cycles)]
    leftover = total_steps - sum(map(sum, per_cycle))
    per_cycle[-1][-1] += leftover
    stages = []

    def restrict(parity):
        def enter(state: RunState) -> Transition:
            fine = state.kept["fine"] = state.model
            coarse = growlib.restrict(fine, parity=parity)
            transition = going_down(state, coarse, restrict_map(growlib.schema_of(fine), parity), "fine",
                                    optimizer_policy)
            if coherence:  # a forward + backward of both models on one micro-batch
                if not state.dry_run:
                    state.linear_term = coherence_term(fine, coarse, parity, state.sample_batch())
                transition.flops = state.micro_batch_flops(fine) + state.micro_batch_flops(coarse)
            return transition
        return enter

    def prolong(parity):
        def enter(state: RunState) -> Transition:
            return coming_up(state, growlib.prolong_(state.kept.pop("fine"), state.model, parity=parity), "fine")
        return enter

    shard_local = optimizer_policy == "reset" and not coherence  # else optimizer state or gradients: gathered
    for cycle, (pre, coarse, post) in enumerate(per_cycle):
        parity = ("even", "odd")[cycle % 2]
        stages += [identity_stage(f"cycle{cycle}-pre", pre, lr_schedule) for _ in range(1 if pre else 0)]
        stages += [Stage(f"cycle{cycle}-coarse-{parity}", coarse, restrict(parity), lr_schedule=lr_schedule,
                         sharded_transition=shard_local)]
        stages += [Stage(f"cycle{cycle}-post", post, prolong(parity), lr_schedule=lr_schedule,
                         sharded_transition=shard_local)]
    return stages


def baseline(total_steps: int) -> list[Stage]:
    """Training from scratch: one stage, the whole budget."""
    return [identity_stage("full", total_steps)]
