"""Optimizer state through a growth map.

Policies:

* ``map``   each state tensor travels through the map that gradients follow, the dual of the parameter's map:
  rows through the in-side map F and columns through the out-side map E (a unit copied n times on the out side
  receives 1/n of the gradient; a column divided by n receives the gradient unchanged), and a depth weight w
  of a single-source layer becomes 1/w.  Under a function-preserving map this is exactly the gradient the grown
  model computes.  First moments (``exp_avg``, ``momentum_buffer``) map linearly.  Second moments
  (``exp_avg_sq``, ``max_exp_avg_sq``) map through their square roots with absolute weights and are squared
  again, so they stay non-negative and coalesce(decoalesce(state)) == state (first moments exactly, second
  moments up to sqrt/square rounding).  The step count is carried over.
* ``reset`` the target optimizer starts with empty state (what the multi-level paper and StackBERT do).

Each schedule transition names its policy (growlib.schedules.protocol.Transition.optimizer_policy); the multilevel
schedules take ``optimizer_policy=reset|keep|map``, and reset by default, as the source papers do.  ``map`` is
the policy to use for function-preserving transitions (width growth, width-only de-coalescing).
"""

from __future__ import annotations

import torch

from growlib.apply import apply_map
from growlib.models import adapter_for
from growlib.schema import DepthMap, GrowthMap, WidthMap

POLICIES = ("map", "reset")
LINEAR_STATE = ("exp_avg", "momentum_buffer")
RMS_STATE = ("exp_avg_sq", "max_exp_avg_sq")
SCALAR_STATE = ("step",)


def dual_map(growth_map: GrowthMap) -> GrowthMap:
    """The map gradients follow when parameters follow ``growth_map`` (see the module docstring)."""
    def dual_depth(depth: DepthMap) -> DepthMap:
        return DepthMap(tuple(None if row is None else
                              (((row[0][0], 1.0 / row[0][1]),) if len(row) == 1 and row[0][1] != 0 else row)
                              for row in depth.rows), depth.n_in)

    return GrowthMap(source_dims=growth_map.source_dims, target_dims=growth_map.target_dims,
                     width={role: WidthMap(out_map=w.in_map, in_map=w.out_map) for role, w in growth_map.width.items()},
                     depth=dual_depth(growth_map.depth),
                     depth_by_name={k: dual_depth(d) for k, d in growth_map.depth_by_name.items()})


def map_optimizer_state(source_optimizer: torch.optim.Optimizer, source_model: torch.nn.Module,
                        target_optimizer: torch.optim.Optimizer, target_model: torch.nn.Module,
                        growth_map: GrowthMap, policy: str = "map") -> None:
    """Fill ``target_optimizer``'s state for ``target_model`` from ``source_optimizer``'s through ``growth_map``.

    The source optimizer must have taken a step (an optimizer that keeps no state, SGD without momentum,
    leaves the target's state empty).  A parameter without state while others have it received no gradient
    so far: its moments are zeros, as they would be after that many zero gradients.  An unknown state key
    raises instead of being dropped."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    for name, opt, model in (("source_optimizer", source_optimizer, source_model),
                             ("target_optimizer", target_optimizer, target_model)):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        optimized = {id(p) for g in opt.param_groups for p in g["params"]}
        if any(id(p) not in optimized for p in model.parameters()):
            raise ValueError(f"{name} does not optimize every parameter of its model")
    if policy == "reset":
        target_optimizer.state.clear()
        return
    if not isinstance(growth_map, GrowthMap):
        raise TypeError(f"growth_map must be a growlib.GrowthMap (the map the parameters went through), got "
                        f"{type(growth_map).__name__}")

    adapter = adapter_for(source_model, "source_model")
    if adapter_for(target_model, "target_model") is not adapter:
        raise ValueError("source_model and target_model must be of the same model family")
    source_params = dict(source_model.named_parameters(remove_duplicate=False))
    stated = {name: source_optimizer.state[p] for name, p in source_params.items() if source_optimizer.state.get(p)}
    if not stated:
        if _keeps_no_state(source_optimizer):
            target_optimizer.state.clear()
            return
        raise ValueError("source_optimizer has no state for any parameter of source_model: take a step first or "
                         "use policy='reset'")
    keys = None
    for name, state in stated.items():
        unknown = set(state) - set(LINEAR_STATE + RMS_STATE + SCALAR_STATE)
        if unknown:
            raise ValueError(f"cannot map optimizer state {sorted(unknown)} of parameter {name!r}: growlib maps "
                             f"{LINEAR_STATE + RMS_STATE + SCALAR_STATE}")
        keys = set(state) if keys is None else keys
        if set(state) != keys:
            raise ValueError(f"parameter {name!r} has state {sorted(state)}, others {sorted(keys)}")

    gradient_map = dual_map(growth_map)
    target_params = dict(target_model.named_parameters(remove_duplicate=False))
    new_state = {id(p): {} for p in target_params.values()}
    for key in sorted(keys & set(LINEAR_STATE + RMS_STATE)):
        dtype = next(iter(stated.values()))[key].dtype
        source_tensors = {n: stated[n][key] if n in stated else torch.zeros_like(p, dtype=dtype)
                          for n, p in source_params.items()}
        for p in target_params.values():  # tied parameters share one state tensor
            new_state[id(p)].setdefault(key, torch.zeros_like(p, dtype=dtype))
        target_tensors = {n: new_state[id(p)][key] for n, p in target_params.items()}
        apply_map(gradient_map, adapter.schema(source_model, source_tensors),
                  adapter.schema(target_model, target_tensors), rms=key in RMS_STATE)
    target_optimizer.state.clear()
    if "step" in keys:
        step = next(iter(stated.values()))["step"]
        for state in new_state.values():
            state["step"] = step.clone() if torch.is_tensor(step) else step
    for p in target_params.values():
        target_optimizer.state[p] = new_state[id(p)]


def _keeps_no_state(optimizer: torch.optim.Optimizer) -> bool:
    """SGD without momentum: its steps leave no state to map."""
    return isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) == 0 for g in optimizer.param_groups)
