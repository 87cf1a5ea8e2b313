"""How a stage's optimizer steps run across processes and devices: this process's rank, DDP around each
stage's model under torchrun or a DeepSpeed engine (set up at every transition, torn down when the stage ends),
the loss averaged over ranks, the check that every rank holds the same model after a transition, and bf16
autocast on the GPU.  The loop sees one interface, ``TorchSteps`` or ``DeepSpeedSteps``, whichever backend
trains; everything here is a no-op or a pass-through in a single process on the CPU."""

from __future__ import annotations

import contextlib
import os

import torch

from growlib.schedules.protocol import linear_term_value
from growlib.sharded import (RankDivergenceError, disagreeing_rows, is_sharded, is_sharded_tensor, shard_model,
                             unsharded_class, whole_tensor)
from growlib.train.config import TrainConfig, make_optimizer, trainable_parameters
from growlib.train.guards import first_nonfinite


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torchrun)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    return rank_and_world()[1]


def is_main() -> bool:
    """Whether this is rank 0, the process that writes metrics and checkpoints."""
    return rank_and_world()[0] == 0


def autocast(model: torch.nn.Module):
    """bf16 autocast on the GPU; plain fp32 on the CPU (where runs must reproduce exactly)."""
    if next(model.parameters()).is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mean_over_ranks(value: torch.Tensor) -> float:
    if world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world_size()
    return float(value)


def check_ranks_agree(model: torch.nn.Module, stage: str) -> None:
    """After a transition every rank must hold the same model, computed from the same synchronised one.  DDP and
    DeepSpeed would silently overwrite the others with rank 0's when they wrap it, so compare cheap per-tensor
    checksums (float64 sum, sum of squares, position-weighted sum) across ranks (``disagreeing_rows``) and
    raise RankDivergenceError naming the stage and the first tensor that differs.  Parameters FSDP2 shards are
    skipped: each rank holds other rows of them, checked as they were built (growlib.sharded)."""
    if world_size() == 1:
        return
    names, sums = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_sharded_tensor(p):
                continue
            x = p.detach().reshape(-1).double()
            weights = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(997).add_(1)
            names.append(name)
            sums.append(torch.stack([x.sum(), x.square().sum(), (x * weights).sum()]))
    if not sums:
        return
    differing = disagreeing_rows(torch.stack(sums))
    if differing:
        name = names[differing[0]]
        raise RankDivergenceError(
            f"the ranks hold different models after the transition into stage {stage!r}: parameter {name!r} (and "
            f"{len(differing) - 1} more) differs between ranks; every rank must compute the same transition from "
            "the same model (a non-deterministic transition, or one that reads rank-dependent data?)")


def _data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around the stage's model when running under torchrun; rebuilt at every transition, since each stage
    has its own model.  DDP only all-reduces parameters that require grad, so frozen layers send nothing."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [model.device.index] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _sync_gradients(model: torch.nn.Module, last_micro_batch: bool):
    """Skip DDP's all-reduce on all but the last micro-batch of a gradient-accumulation step."""
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


class TorchSteps:
    """Optimizer steps with plain PyTorch, or DDP under torchrun: autocast, accumulation, clipping."""

    #: whether the model's parameters are split across ranks (then ``gathered`` makes them whole)
    sharded = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.wrapped = _data_parallel(model)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_batch(self, batch: dict, linear_term: dict, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its share of the step's mean loss."""
        accum = self.config.grad_accum
        with autocast(self.model), _sync_gradients(self.wrapped, last):
            loss = self.wrapped(**batch).loss / accum
            (loss + linear_term_value(self.model, linear_term) / accum).backward()
        return loss.detach()

    def clip_and_find_nonfinite_gradient(self) -> str | None:
        """Clip the gradients; return None if they are all finite, else the name of the first parameter whose
        gradient holds NaN or inf.  The check is one isfinite on the total norm clipping computes anyway (under
        DDP the gradients are already averaged, so every rank decides alike); the search runs only on failure."""
        params = trainable_parameters(self.model)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        # clip_grad_norm_ in two halves (torch >= 2.6), so the search runs before clipping spreads a NaN
        if hasattr(torch.nn.utils, "get_total_norm"):
            total_norm = torch.nn.utils.get_total_norm(grads)
        else:
            total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not bool(torch.isfinite(total_norm)):
            return first_nonfinite((name, p.grad) for name, p in self.model.named_parameters() if p.requires_grad)
        if self.config.clip > 0 and hasattr(torch.nn.utils, "clip_grads_with_norm_"):
            torch.nn.utils.clip_grads_with_norm_(params, self.config.clip, total_norm)
        elif self.config.clip > 0:
            scale = torch.clamp(self.config.clip / (total_norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(scale)
        return None

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Drop this step's gradients without updating anything."""
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Nothing to release: a DDP wrapper goes with its stage."""


class FSDPSteps(TorchSteps):
    """Optimizer steps under FSDP2 (``torch.distributed.fsdp.fully_shard``): every layer and then the rest of the
    model sharded across the ranks, parameters, gradients and optimizer state alike (mixed precision on the GPU:
    bf16 compute, fp32 gradient reduction).  The stage's model is sharded in place, so evaluation and the
    stage's hooks see the live weights; its optimizer is rebuilt over the shards, carrying the state the
    transition's policy gave it.

    A transition that allows it (``Stage.sharded_transition``) reads the shards and gives a new model already
    sharded, each rank having built its own shard (growlib.sharded: the shard-local variant), which is trained
    with the optimizer the transition made.  The other transitions read whole parameters, so there and at the
    end of a run ``gathered`` assembles the whole model and optimizer on every rank (the full-gather variant:
    each rank holds one whole model and its optimizer state for that moment).  A checkpoint is each rank's
    shards (``save``, torch.distributed.checkpoint).  Layers MSLT runs forward-only (``route_frozen_bottom``)
    stay whole on every rank: their fused stack reads their weights directly."""

    sharded = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        from growlib.models import adapter_for

        self.model_class, self.build_options = unsharded_class(model), adapter_for(model).build_options(model)
        self.model, self.config, self.wrapped = model, config, model
        if is_sharded(model):  # built sharded by a shard-local transition, its optimizer over the shards
            self.optimizer = optimizer
            return
        carried = _full_optimizer_state(model, optimizer)
        routed = getattr(model, "growlib_frozen_bottom", None)
        shard_model(model, on_cuda=next(model.parameters()).is_cuda, whole_layers=tuple(routed[2]) if routed else ())
        self.optimizer = make_optimizer(model, config)
        if carried is not None:
            set_optimizer_state_dict(model, self.optimizer, carried, options=_full_state())

    def micro_batch(self, batch: dict, linear_term: dict, last: bool) -> torch.Tensor:
        if linear_term:
            raise ValueError("ode_multilevel's coherence term is not supported under --fsdp (it multiplies whole "
                             "parameters): set coherence=false")
        self.model.set_requires_gradient_sync(last)  # reduce-scatter once per accumulated step
        return super().micro_batch(batch, linear_term, last)

    def clip_and_find_nonfinite_gradient(self) -> str | None:
        """As TorchSteps, over sharded gradients: the total norm is reduced across ranks (every rank decides
        alike); the search for the broken parameter looks at this rank's shards."""
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return None
        total_norm = torch.nn.utils.get_total_norm(grads)
        total_norm = whole_tensor(total_norm)
        if not bool(torch.isfinite(total_norm)):
            return first_nonfinite((name, p.grad) for name, p in self.model.named_parameters() if p.requires_grad) \
                or "(in another rank's shard)"
        if self.config.clip > 0:
            scale = min(1.0, float(self.config.clip / (total_norm + 1e-6)))
            for g in grads:
                g.mul_(scale)
        return None

    def save(self, folder: str, tag: str, kept: dict[str, torch.nn.Module]) -> None:
        """Every rank writes its shards of the model and optimizer state, and of the sharded models the schedule
        ``kept`` for later, to ``folder/tag`` (torch.distributed.checkpoint: one file per rank and the
        metadata)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(kept), checkpoint_id=os.path.join(folder, tag))
        torch.distributed.barrier()  # every rank's files are written before any is hashed

    def load(self, folder: str, tag: str, kept: dict[str, torch.nn.Module]) -> None:
        """Restore the shards ``save`` wrote (same number of ranks: the run's identity holds it), ``kept``
        sharded as they were."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = self._state(kept)
        dcp.load(state, checkpoint_id=os.path.join(folder, tag))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        for key, model in kept.items():
            set_model_state_dict(model, state["kept"][key])

    def _state(self, kept: dict[str, torch.nn.Module]) -> dict:
        """This rank's shards of the stage's model and optimizer and of the ``kept`` models, as DCP names them."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state,
                "kept": {key: get_model_state_dict(model) for key, model in kept.items()}}

    def gathered(self, optimizer_state: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The stage's model and optimizer assembled whole on every rank, as plain (unsharded) objects with the
        same weights, frozen parameters and optimizer state (``optimizer_state=False``: a fresh optimizer, its
        state not gathered): what transitions read."""
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)

        weights = get_model_state_dict(self.model, options=_full_state())
        moments = (get_optimizer_state_dict(self.model, self.optimizer, options=_full_state()) if optimizer_state
                   else {})
        plain = _plain_copy(self.model, self.model_class, self.build_options, weights)
        optimizer = make_optimizer(plain, self.config)
        if moments.get("state"):
            set_optimizer_state_dict(plain, optimizer, moments, options=_full_state())
        for group in optimizer.param_groups:
            group["lr"] = self.optimizer.param_groups[0]["lr"]
        return plain, optimizer


def _plain_copy(model: torch.nn.Module, model_class: type, build_options: dict,
                weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain model of ``model_class`` holding ``weights`` (a whole state dict), with ``model``'s frozen
    parameters, training mode and loss type: a sharded model made whole again."""
    from growlib.models.base import build_uninitialised

    device = next(iter(weights.values())).device
    plain = build_uninitialised(model_class, model.config, device, **build_options)
    plain.load_state_dict(weights, strict=True)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in plain.named_parameters():
        p.requires_grad_(trainable[name])
    plain.train(model.training)
    if getattr(model, "loss_type", None):
        plain.loss_type = model.loss_type
    return plain


def _full_state():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def _full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's state keyed by parameter names (None if it has none yet), to load into its sharded twin."""
    if not optimizer.state:
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_state())


def deepspeed_config(user_config: dict, config: TrainConfig) -> dict:
    """The user's DeepSpeed JSON with the keys growlib owns filled in from ``config``.

    growlib builds the optimizer and sets each stage's learning rate, so an ``optimizer`` / ``scheduler``
    section is refused rather than ignored."""
    if not isinstance(user_config, dict):
        raise TypeError(f"deepspeed config must be a dict (the parsed JSON), got {type(user_config).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a growlib TrainConfig, got {type(config).__name__}")
    if not isinstance(user_config.get("zero_optimization", {}), dict):
        raise ValueError(f"deepspeed config: zero_optimization must be an object such as {{\"stage\": 2}}, got "
                         f"{user_config['zero_optimization']!r}")
    for key in ("optimizer", "scheduler"):
        if key in user_config:
            raise ValueError(f"deepspeed config: remove {key!r}; growlib builds AdamW and sets the learning rate "
                             "of every stage (use --lr / --warmup)")
    stage = user_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    owned = {"train_micro_batch_size_per_gpu": config.batch_size, "gradient_accumulation_steps": config.grad_accum,
             "gradient_clipping": config.clip}
    for key, value in owned.items():
        if key in user_config and user_config[key] != value:
            raise ValueError(f"deepspeed config: {key}={user_config[key]!r} disagrees with growlib's setting "
                             f"{value!r}; leave it out or make them equal")
    expected_batch = config.batch_size * config.grad_accum * world_size()
    if user_config.get("train_batch_size", expected_batch) != expected_batch:
        raise ValueError(f"deepspeed config: train_batch_size={user_config['train_batch_size']!r}, but batch size x "
                         f"accumulation x processes = {expected_batch}")
    return {**user_config, **owned}


class DeepSpeedSteps:
    """Optimizer steps through a DeepSpeed engine (ZeRO stage 0-3) built around the stage's model.

    DeepSpeed scales the loss for accumulation, all-reduces or reduce-scatters gradients, clips and steps at
    the accumulation boundary.  A new engine is built at every transition; the old one's gradient hooks are
    removed so a model kept for later (the V-cycle's fine model) is not reduced twice.  Under ZeRO-3 the engine
    partitions the parameters themselves, so ``gathered`` assembles the model whole on every rank for
    transitions (as FSDPSteps does).  The engine's own checkpoint (``save`` / ``load``: every
    rank's partition of the optimizer state) travels beside growlib's."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                 user_config: dict):
        import deepspeed

        from growlib.models import adapter_for

        self.zero_stage = user_config.get("zero_optimization", {}).get("stage", 0)
        if self.zero_stage == 3 and getattr(model, "growlib_frozen_bottom", None):
            raise ValueError("ZeRO stage 3 partitions the weights MSLT's forward-only stack reads directly: "
                             "pass --schedule-args frozen_forward=false (the frozen layers then run as ordinary "
                             "layers without gradients)")
        self.model, self.config = model, config
        self.model_class, self.build_options = type(model), adapter_for(model).build_options(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(user_config, config))

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are partitioned across ranks (ZeRO-3)."""
        return self.zero_stage == 3

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_batch(self, batch: dict, linear_term: dict, last: bool) -> torch.Tensor:
        if linear_term and self.sharded:
            raise ValueError("ode_multilevel's coherence term is not supported under ZeRO stage 3 (it multiplies "
                             "whole parameters): set coherence=false")
        with autocast(self.model):
            loss = self.engine(**batch).loss
        self.engine.backward(loss + linear_term_value(self.model, linear_term))
        if not last:
            self.engine.step()  # no update before the accumulation boundary, whose step() waits for the checks
        return loss.detach() / self.config.grad_accum

    def clip_and_find_nonfinite_gradient(self) -> str | None:
        """Not checked: the engine clips inside ``step()`` and, under ZeRO, holds only its partition of the
        gradients.  Under DeepSpeed only the loss is checked (a non-finite gradient with a finite loss is not
        caught), and ``on_nonfinite='skip'`` is refused."""
        return None

    def step(self) -> None:
        """The accumulation boundary's ``engine.step()``: clips, updates and zeroes the gradients."""
        self.engine.step()

    def skip(self) -> None:
        raise AssertionError("on_nonfinite='skip' is refused with deepspeed before training starts")

    def gathered(self, optimizer_state: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """ZeRO-3: the stage's model assembled whole on every rank as a plain model, and a fresh optimizer for
        it (DeepSpeed runs take the ``reset`` policy only: the engine's optimizer state stays partitioned, so
        ``optimizer_state`` is never gathered)."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            weights = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        plain = _plain_copy(self.model, self.model_class, self.build_options, weights)
        return plain, make_optimizer(plain, self.config)

    def save(self, folder: str, tag: str, kept: dict[str, torch.nn.Module]) -> None:
        """Every rank writes its partition of the engine's state (model and optimizer) to ``folder/tag``.
        DeepSpeed runs keep no sharded models (``kept`` is empty): their transitions gather."""
        if kept:
            raise ValueError(f"DeepSpeed cannot checkpoint the sharded models {sorted(kept)}")
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)
        if world_size() > 1:
            torch.distributed.barrier()  # every rank's files are written before any is hashed

    def load(self, folder: str, tag: str, kept: dict[str, torch.nn.Module]) -> None:
        """Restore the engine's state written by ``save`` (same number of ranks, same stage)."""
        if kept:
            raise ValueError(f"DeepSpeed cannot restore the sharded models {sorted(kept)}")
        loaded, _ = self.engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load its checkpoint {os.path.join(folder, tag)}")

    def close(self) -> None:
        self.engine.destroy()
        for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(self.engine, hook, None)
            if handle is not None:
                handle.remove()
