"""Progressive growth schedules: multi-stage layerwise training (MSLT), progressive stacking (StackBERT /
G_stack) and masked structural growth (MSG)."""

from __future__ import annotations

from typing import Callable

import torch

import growlib
from growlib.models import adapter_for
from growlib.operators.common import layer_stack
from growlib.schedules.multilevel import split_steps, check_budget, check_fraction
from growlib.train.loop import RunState, Stage, Transition


def freeze_below(layers: int) -> Callable[[torch.nn.Module], None]:
    """Freeze the embeddings and layers [0, layers): they run forward only and receive no gradient.

    With tied embeddings the LM head is the embedding, so it is frozen with it in the partial stages."""
    def freeze(model: torch.nn.Module) -> None:
        schema = growlib.schema_of(model)
        for spec in schema.specs:
            frozen = spec.name.startswith("embed.") or (spec.layer is not None and spec.layer < layers)
            if frozen:
                model.get_parameter(spec.source).requires_grad_(False)
    return freeze


def _check_layers(layer_counts: list[int], final_layers: int) -> None:
    if not layer_counts or layer_counts != sorted(layer_counts) or len(set(layer_counts)) != len(layer_counts):
        raise ValueError(f"layer_counts must be strictly increasing, got {layer_counts}")
    if layer_counts[-1] != final_layers:
        raise ValueError(f"layer_counts must end at the model's {final_layers} layers, got {layer_counts}")


def _check_fractions(stage_fractions: list[float], layer_counts: list[int], joint: float = 0.0) -> None:
    if len(stage_fractions) != len(layer_counts):
        raise ValueError(f"stage_fractions needs one entry per layer count ({len(layer_counts)}), got "
                         f"{len(stage_fractions)}")
    for i, fraction in enumerate(stage_fractions):
        check_fraction(f"stage_fractions[{i}]", fraction)
    check_budget({"stage_fractions": sum(stage_fractions), "joint_fraction": joint})


def _shallow_start(layers: int) -> Callable[[RunState], Transition]:
    """The first stage trains a fresh model with only the bottom ``layers`` of the target's depth."""
    def enter(state: RunState) -> Transition:
        full = state.model
        dims = growlib.schema_of(full).dims
        model = adapter_for(full).new_model(full, {**_resizable(dims), "layers": layers})
        return Transition(model)
    return enter


def _resizable(dims: dict[str, int]) -> dict[str, int]:
    return {k: dims[k] for k in ("model", "ffn", "heads", "kv_heads", "head_dim", "attn", "kv", "layers")}


def mslt(total_steps: int, final_layers: int, layer_counts: list[int] | None = None,
         stage_fractions: list[float] | None = None, joint_fraction: float = 0.1) -> list[Stage]:
    """Multi-stage layerwise training (Yang et al.): start with ``layer_counts[0]`` layers; at each stage copy the
    top layers onto the stack, freeze the embeddings and the old layers, train the new layers, the head and the
    final norm; end with a joint stage that trains everything.  Defaults: quarters of the depth, budget split
    evenly over the partial stages, ``joint_fraction`` for the joint stage."""
    layer_counts = layer_counts or sorted({max(1, final_layers * k // 4) for k in range(1, 5)})
    _check_layers(layer_counts, final_layers)
    check_fraction("joint_fraction", joint_fraction, allow_zero=True)
    for previous, layers in zip(layer_counts, layer_counts[1:]):
        if layers - previous > previous:
            raise ValueError(f"layer_counts {layer_counts}: growing {previous} -> {layers} layers would copy more "
                             f"top layers than exist; MSLT can at most double the depth per stage")
    stage_fractions = stage_fractions or [(1.0 - joint_fraction) / len(layer_counts)] * len(layer_counts)
    _check_fractions(stage_fractions, layer_counts, joint_fraction)
    steps = split_steps(total_steps, stage_fractions + [joint_fraction])
    stages = [Stage(f"layers{layer_counts[0]}", steps[0], _shallow_start(layer_counts[0]))]
    for previous, layers, n in zip(layer_counts, layer_counts[1:], steps[1:]):
        stages.append(Stage(f"layers{layers}", n,
                            lambda s, layers=layers: Transition(growlib.grow_depth(s.model, layers, "copy_top")),
                            freeze=freeze_below(previous)))
    stages.append(Stage("joint", steps[-1], _unfreeze_all))
    return stages


def _unfreeze_all(state: RunState) -> Transition:
    for p in state.model.parameters():
        p.requires_grad_(True)
    return Transition(state.model)


def stack(total_steps: int, final_layers: int, layer_counts: list[int] | None = None,
          stage_fractions: list[float] | None = None) -> list[Stage]:
    """Progressive stacking (StackBERT / G_stack): train a shallow model, double its depth by stacking it on
    itself, repeat; everything stays trainable; optimizer state reset at each growth as in StackBERT."""
    layer_counts = layer_counts or sorted({max(1, final_layers // 4), max(1, final_layers // 2), final_layers})
    _check_layers(layer_counts, final_layers)
    stage_fractions = stage_fractions or [1.0 / len(layer_counts)] * len(layer_counts)
    _check_fractions(stage_fractions, layer_counts)
    steps = split_steps(total_steps, stage_fractions)
    stages = [Stage(f"layers{layer_counts[0]}", steps[0], _shallow_start(layer_counts[0]))]
    for layers, n in zip(layer_counts[1:], steps[1:]):
        stages.append(Stage(f"layers{layers}", n,
                            lambda s, layers=layers: Transition(growlib.grow_depth(s.model, layers, "stack"))))
    return stages


class LayerMask:
    """MSG's mask on a grown layer: its output becomes ``m * layer(x) + (1 - m) * x``.

    At m = 0 the layer is the identity, so growth preserves the function whatever the new layer's weights;
    the mask then ramps to 1 and the layer becomes an ordinary one.  Works for pre- and post-LN layers alike,
    since it blends the whole layer's output with its input."""

    def __init__(self):
        self.value = 0.0

    def __call__(self, module, args, kwargs, output):
        if self.value == 1.0:
            return output
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (self.value * output[0] + (1.0 - self.value) * x,) + output[1:]
        return self.value * output + (1.0 - self.value) * x


def ramp_masks(first_new_layer: int, ramp_steps: int) -> Callable[[torch.nn.Module, int], None]:
    """A ``before_step`` that masks layers [first_new_layer, L) and sets the mask to step / ramp_steps.

    The hooks are (re)attached on first use, so a run resumed from a checkpoint masks exactly as before."""
    def before_step(model: torch.nn.Module, step_in_stage: int) -> None:
        masks = getattr(model, "growlib_msg_masks", None)
        if masks is None:
            masks = []
            for layer in list(layer_stack(model))[first_new_layer:]:
                mask = LayerMask()
                layer.register_forward_hook(mask, with_kwargs=True)
                masks.append(mask)
            model.growlib_msg_masks = masks
        for mask in masks:
            mask.value = min(1.0, step_in_stage / ramp_steps)
    return before_step


def msg(total_steps: int, final_layers: int, layer_counts: list[int] | None = None,
        stage_fractions: list[float] | None = None, ramp_fraction: float = 0.2) -> list[Stage]:
    """Masked structural growth (Yao et al.): grow the depth in stages like progressive stacking, but the new
    layers start masked (identity) and their mask ramps linearly from 0 to 1 over ``ramp_fraction`` of
    their stage, so the loss right after growth equals the loss before it and the new layers blend in.
    New layers start as copies of the ones below (G_stack); everything stays trainable; the optimizer state
    is reset at each growth."""
    layer_counts = layer_counts or sorted({max(1, final_layers // 4), max(1, final_layers // 2), final_layers})
    _check_layers(layer_counts, final_layers)
    check_fraction("ramp_fraction", ramp_fraction)
    stage_fractions = stage_fractions or [1.0 / len(layer_counts)] * len(layer_counts)
    _check_fractions(stage_fractions, layer_counts)
    steps = split_steps(total_steps, stage_fractions)
    stages = [Stage(f"layers{layer_counts[0]}", steps[0], _shallow_start(layer_counts[0]))]
    for previous, layers, n in zip(layer_counts, layer_counts[1:], steps[1:]):
        stages.append(Stage(f"layers{layers}", n,
                            lambda s, layers=layers: Transition(growlib.grow_depth(s.model, layers, "stack")),
                            before_step=ramp_masks(previous, max(1, round(n * ramp_fraction)))))
    return stages
