"""Progressive growth schedules: multi-stage layerwise training (MSLT), progressive stacking (StackBERT /
G_stack), masked structural growth (MSG) and LiGO's learned growth."""

from __future__ import annotations

import json
from typing import Callable

import torch

import growlib
from growlib.models import adapter_for
from growlib.frozen import restore_layers, route_frozen_bottom
from growlib.operators.common import layer_stack
from growlib.operators.ligo import LIGO_DEPTH_INITS, LIGO_WIDTH_INITS, TIES
from growlib.schedules.multilevel import check_budget, split_steps
from growlib.schedules.protocol import RunState, Stage, Transition
from growlib.sharded import is_sharded, rebuilt
from growlib.validate import require_fraction, require_int, require_number


def embeddings_tied_to_head(model: torch.nn.Module) -> bool:
    """Whether the LM head is the input embedding matrix (GPT-2, BERT's MLM head): freezing one freezes both."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


def _check_freezing(frozen_forward: bool | None, freeze_embeddings: bool | None) -> None:
    for name, value in (("frozen_forward", frozen_forward), ("freeze_embeddings", freeze_embeddings)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None (automatic), got {type(value).__name__}")
    if frozen_forward and freeze_embeddings is False:
        raise ValueError("frozen_forward=True needs freeze_embeddings=True: gradients cannot pass down through the "
                         "forward-only stack to trainable embeddings (set frozen_forward=False)")


def freeze_below(layers: int, frozen_forward: bool | None = None, freeze_embeddings: bool | None = None
                 ) -> Callable[[torch.nn.Module], None]:
    """Freeze layers [0, layers) and (``freeze_embeddings``) the embeddings: they receive no gradient.  With
    ``frozen_forward`` the frozen layers also run as one forward-only fused stack (growlib.freeze_forward: no
    autograd graph, no saved activations; bf16 on the GPU, where the loop autocasts to bf16), which needs the
    embeddings frozen too, since no gradient can pass down through that stack.

    ``freeze_embeddings=None`` freezes them unless they are tied to the LM head (then freezing them would
    freeze the head too, which perf/results/tuning/gpt2-4x128/mslt measures as the difference between
    reaching the baseline's loss and not); ``frozen_forward=None`` runs the forward-only stack whenever the
    embeddings end up frozen."""
    _check_freezing(frozen_forward, freeze_embeddings)

    def freeze(model: torch.nn.Module) -> None:
        embeddings_frozen = _embeddings_frozen(model, frozen_forward, freeze_embeddings)
        schema = growlib.schema_of(model)
        for spec in schema.specs:
            frozen = ((embeddings_frozen and spec.name.startswith("embed."))
                      or (spec.layer is not None and spec.layer < layers))
            if frozen:
                model.get_parameter(spec.source).requires_grad_(False)
        if uses_frozen_stack(model, frozen_forward, freeze_embeddings):
            on_gpu = next(model.parameters()).is_cuda
            route_frozen_bottom(model, layers, dtype=torch.bfloat16 if on_gpu else None)
    return freeze


def _embeddings_frozen(model: torch.nn.Module, frozen_forward: bool | None, freeze_embeddings: bool | None) -> bool:
    if freeze_embeddings is not None:
        return freeze_embeddings
    return bool(frozen_forward) or not embeddings_tied_to_head(model)


def uses_frozen_stack(model: torch.nn.Module, frozen_forward: bool | None = None,
                      freeze_embeddings: bool | None = None) -> bool:
    """Whether MSLT with these options runs ``model``'s frozen layers through the fused forward-only stack."""
    if frozen_forward is not None:
        return frozen_forward
    return _embeddings_frozen(model, frozen_forward, freeze_embeddings)


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
        require_fraction(f"stage_fractions[{i}]", fraction)
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
         stage_fractions: list[float] | None = None, joint_fraction: float = 0.4,
         frozen_forward: bool | None = None, freeze_embeddings: bool | None = None) -> list[Stage]:
    """Multi-stage layerwise training (Yang et al.): start with ``layer_counts[0]`` layers; at each stage copy the
    top layers onto the stack, freeze the old layers (and the embeddings), train the new layers, the head and
    the final norm; end with a joint stage that trains everything.

    Defaults (perf/results/tuning/gpt2-4x128/mslt): half the depth, then the full depth, the partial stages
    sharing 60% of the budget evenly and the joint stage 40%; embeddings frozen unless tied to the LM head
    (GPT-2, BERT: freezing them freezes the head, and that recipe never reached the baseline's loss there);
    ``frozen_forward`` (default: whenever the embeddings are frozen) runs the frozen layers through
    growlib.freeze_forward's fused forward-only stack (False: HF's own layers, through which gradients reach
    trainable embeddings).

    Options:
        layer_counts: depth of each stage, increasing, the last the full depth (None: half, then full)
        stage_fractions: share of the budget of each partial stage (None: 1 - joint_fraction, shared evenly)
        joint_fraction: share of the budget of the final stage that trains every layer
        frozen_forward: run the frozen layers through the fused forward-only stack (None: when embeddings freeze)
        freeze_embeddings: freeze the embeddings with the old layers (None: unless tied to the LM head)
    """
    _check_freezing(frozen_forward, freeze_embeddings)
    layer_counts = layer_counts or sorted({max(1, final_layers // 2), final_layers})
    _check_layers(layer_counts, final_layers)
    require_fraction("joint_fraction", joint_fraction, allow_zero=True)
    for previous, layers in zip(layer_counts, layer_counts[1:]):
        if layers - previous > previous:
            raise ValueError(f"layer_counts {layer_counts}: growing {previous} -> {layers} layers would copy more "
                             f"top layers than exist; MSLT can at most double the depth per stage")
    stage_fractions = stage_fractions or [(1.0 - joint_fraction) / len(layer_counts)] * len(layer_counts)
    _check_fractions(stage_fractions, layer_counts, joint_fraction)
    steps = split_steps(total_steps, stage_fractions + [joint_fraction])
    stages = [Stage(f"layers{layer_counts[0]}", steps[0], _shallow_start(layer_counts[0]))]
    def without_frozen_stack(model: torch.nn.Module) -> bool:  # else the stack's whole layers: gathered
        return not uses_frozen_stack(model, frozen_forward, freeze_embeddings)

    for previous, layers, n in zip(layer_counts, layer_counts[1:], steps[1:]):
        stages.append(Stage(f"layers{layers}", n,
                            lambda s, layers=layers: Transition(growlib.grow_depth(s.model, layers, "copy_top")),
                            freeze=freeze_below(previous, frozen_forward, freeze_embeddings),
                            sharded_transition=without_frozen_stack))
    stages.append(Stage("joint", steps[-1], _unfreeze_all, sharded_transition=without_frozen_stack))
    return stages


def _unfreeze_all(state: RunState) -> Transition:
    model = state.model
    restore_layers(model)
    for p in model.parameters():
        p.requires_grad_(True)
    if is_sharded(model):  # FSDP2 would not train the layers it first ran frozen alike (growlib.sharded.rebuilt)
        model = rebuilt(model)
    return Transition(model)


def stack(total_steps: int, final_layers: int, layer_counts: list[int] | None = None,
          stage_fractions: list[float] | None = None) -> list[Stage]:
    """Progressive stacking (StackBERT / G_stack): train a shallow model, double its depth by stacking it on
    itself, repeat; everything stays trainable; optimizer state reset at each growth as in StackBERT.

    Options:
        layer_counts: depth of each stage, increasing, the last the full depth (None: a quarter, half, full)
        stage_fractions: share of the budget of each stage (None: equal shares)
    """
    layer_counts = layer_counts or sorted({max(1, final_layers // 4), max(1, final_layers // 2), final_layers})
    _check_layers(layer_counts, final_layers)
    stage_fractions = stage_fractions or [1.0 / len(layer_counts)] * len(layer_counts)
    _check_fractions(stage_fractions, layer_counts)
    steps = split_steps(total_steps, stage_fractions)
    stages = [Stage(f"layers{layer_counts[0]}", steps[0], _shallow_start(layer_counts[0]))]
    for layers, n in zip(layer_counts[1:], steps[1:]):
        stages.append(Stage(f"layers{layers}", n,
                            lambda s, layers=layers: Transition(growlib.grow_depth(s.model, layers, "stack")),
                            sharded_transition=True))
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
    is reset at each growth.

    Options:
        layer_counts: depth of each stage, increasing, the last the full depth (None: a quarter, half, full)
        stage_fractions: share of the budget of each stage (None: equal shares)
        ramp_fraction: share of a stage over which the new layers' mask ramps from 0 to 1
    """
    layer_counts = layer_counts or sorted({max(1, final_layers // 4), max(1, final_layers // 2), final_layers})
    _check_layers(layer_counts, final_layers)
    require_fraction("ramp_fraction", ramp_fraction)
    stage_fractions = stage_fractions or [1.0 / len(layer_counts)] * len(layer_counts)
    _check_fractions(stage_fractions, layer_counts)
    steps = split_steps(total_steps, stage_fractions)
    stages = [Stage(f"layers{layer_counts[0]}", steps[0], _shallow_start(layer_counts[0]))]
    for previous, layers, n in zip(layer_counts, layer_counts[1:], steps[1:]):
        stages.append(Stage(f"layers{layers}", n,
                            lambda s, layers=layers: Transition(growlib.grow_depth(s.model, layers, "stack")),
                            before_step=ramp_masks(previous, max(1, round(n * ramp_fraction))),
                            sharded_transition=True))
    return stages


def _small_dims(dims: dict[str, int], layers: int, width_fraction: float) -> dict[str, int]:
    """The small model's sizes: ``layers`` layers, and hidden, FFN and (whole) heads scaled by the fraction."""
    scaled = {}
    for role in ("model", "ffn", "heads", "kv_heads"):
        size = dims[role] * width_fraction
        if size != int(size) or size < 1:
            raise ValueError(f"small_width={width_fraction} must give whole sizes: the model's {role}={dims[role]} "
                             f"would become {size:g}")
        scaled[role] = int(size)
    if scaled["heads"] % scaled["kv_heads"]:
        raise ValueError(f"small_width={width_fraction} leaves {scaled['heads']} query heads for "
                         f"{scaled['kv_heads']} key/value heads")
    return {**_resizable(dims), **scaled, "layers": layers, "attn": scaled["heads"] * dims["head_dim"],
            "kv": scaled["kv_heads"] * dims["head_dim"]}


def ligo(total_steps: int, final_layers: int, small_layers: int | None = None, small_width: float = 1.0,
         small_fraction: float = 0.25, fit_steps: int | None = None, fit_lr: float = 1e-3, depth_init: str = "stack",
         width_init: str = "net2net", tie: str = "paper") -> list[Stage]:
    """LiGO (Wang et al.): train a small model (``small_layers``, default half the depth, and ``small_width``
    of the width: full width by default, since at the sizes measured in perf/results/ligo_small_width a
    narrower small model loses more than its cheaper phase saves) for ``small_fraction`` of the budget, fit the
    learned growth operator (growlib.LiGO: the width maps are learned even when the width stays) for
    ``fit_steps`` steps on the large model's loss (default: the paper's 100, but at most 5% of the budget,
    which short runs cannot spare more of), materialise the large model and train it for the rest.

    Fitting reads the training batches that follow (the large model trains on them again) and is charged its
    FLOPs: per step one micro-batch forward + backward of the large model plus the operator's expansion and
    its gradient.  Under torchrun every rank fits on its own batches and rank 0's result is broadcast, so all
    ranks continue from the same model.

    Options:
        small_layers: depth of the small model (None: half the depth)
        small_width: width of the small model as a share of the full width
        small_fraction: share of the budget the small model trains
        fit_steps: optimizer steps fitting the growth operator (None: 100, at most 5% of the budget)
        fit_lr: learning rate of the operator's fit
        depth_init: stack | interleave | copy_top: the depth map the operator starts from
        width_init: net2net | bert2bert_fpi | hypercloning: the width maps the operator starts from
        tie: paper | shared: which width maps the operator shares
    """
    small_layers = max(1, final_layers // 2) if small_layers is None else small_layers
    fit_steps = max(1, min(100, total_steps // 20)) if fit_steps is None else fit_steps
    require_int("small_layers", small_layers, 1, final_layers)
    require_fraction("small_width", small_width)
    for name, value, choices in (("depth_init", depth_init, LIGO_DEPTH_INITS), ("tie", tie, TIES),
                                 ("width_init", width_init, tuple(m for m in LIGO_WIDTH_INITS if m != "bert2bert_aki"))):
        if value not in choices:  # checked now: LiGO itself is built only after the small model's training
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    require_fraction("small_fraction", small_fraction)
    if small_fraction == 1.0:
        raise ValueError("small_fraction must leave part of the budget to the large model, got 1")
    require_int("fit_steps", fit_steps)
    require_number("fit_lr", fit_lr, positive=True)
    small_steps, large_steps = split_steps(total_steps, [small_fraction, 1.0 - small_fraction])

    def start_small(state: RunState) -> Transition:
        full = state.model
        state.notes["ligo_target_config"] = json.dumps(full.config.to_dict(), default=str)
        dims = growlib.schema_of(full).dims
        return Transition(adapter_for(full).new_model(full, _small_dims(dims, small_layers, small_width)))

    def grow(state: RunState) -> Transition:
        small = state.model
        target_config = type(small.config).from_dict(json.loads(state.notes["ligo_target_config"]))
        operator = growlib.LiGO(small, target_config, depth_init=depth_init, width_init=width_init, tie=tie)
        if not state.dry_run:
            operator.fit([state.sample_batch(i) for i in range(fit_steps)], steps=fit_steps, lr=fit_lr)
        large = operator.materialize()
        _broadcast_from_rank_zero(large)
        fit_flops = fit_steps * (state.micro_batch_flops(large) + operator.flops_per_expansion(backward=True))
        return Transition(large, flops=fit_flops)

    return [Stage("small", small_steps, start_small), Stage("large", large_steps, grow)]


def _broadcast_from_rank_zero(model: torch.nn.Module) -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p, 0)
