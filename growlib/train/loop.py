"""One training loop for every schedule: stages of (model, steps, frozen parts), transitions between them,
FLOPs and wall time counted, validation every N steps, metrics as JSONL, atomic checkpoints.

A schedule is a list of ``Stage``s.  Each stage builds its model from the previous stage's (a transition:
coalesce, de-coalesce + interpolate, grow, ...), optionally freezes part of it, and trains it for its steps
with a fresh or mapped optimizer and its own warmup + cosine learning-rate schedule."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch

from growlib.apply import counting_map_flops
from growlib.operators.common import require_int
from growlib.optim import map_optimizer_state
from growlib.schema import GrowthMap
from growlib.train import faults


NONFINITE_POLICIES = ("stop", "skip")
LR_SCHEDULES = ("restart", "continue")
#: TrainConfig fields that say how to react to faults, not what to compute: left out of a run's identity.
_FAULT_POLICY_FIELDS = ("on_nonfinite", "max_consecutive_skips")


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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainConfig.{name} must be an int >= {minimum}, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0 (clip 0: no clipping), got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES + (None,):
            raise ValueError(f"TrainConfig.lr_schedule must be 'restart', 'continue' or None (each stage's own), "
                             f"got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"TrainConfig.on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        value = self.max_consecutive_skips
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"TrainConfig.max_consecutive_skips must be an int >= 1, got {value!r}")


#: What a transition does with the optimizer: a fresh one, a state the schedule kept for this very model, or
#: the old state through the transition's map (growlib.optim.map_optimizer_state).
OPTIMIZER_POLICIES = ("reset", "keep", "map")


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
    step, also after a resume (e.g. MSG ramps its masks there)."""

    name: str
    steps: int
    enter: Callable[["RunState"], Transition]
    freeze: Callable[[torch.nn.Module], None] | None = None
    lr_scale: float = 1.0
    before_step: Callable[[torch.nn.Module, int], None] | None = None
    lr_schedule: str = "restart"

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
    """<v, theta> summed over the parameters ``term`` names."""
    if not term:
        return 0.0
    params = dict(model.named_parameters())
    return sum((v * params[name]).sum() for name, v in term.items())


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


class MetricsLog:
    """Append-only JSONL: one record per training step and per evaluation."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (and a line cut short by a crash): a resumed run logs them again."""
        if not self.path or not os.path.exists(self.path) or not _is_main():
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
        if self.path and _is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


CHECKPOINT_FORMAT = "growlib-checkpoint"
#: Bumped whenever what a checkpoint holds changes: 3 added the run's identity (``run_schedule(identity=)``).
CHECKPOINT_VERSION = 3
#: How every checkpoint file begins (its header line is JSON with these keys first).
_HEADER_START = b'{"format": "growlib-checkpoint"'
_MAX_HEADER_BYTES = 4096


def _checkpoint_bytes(payload: dict) -> bytes:
    """One JSON header line (format, version, SHA-256 and length of the payload) followed by the payload as
    ``torch.save`` writes it: the header vouches for every payload byte."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
              "sha256": hashlib.sha256(body).hexdigest(), "payload_bytes": len(body)}
    return json.dumps(header).encode() + b"\n" + body


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount): the previous one is intact."""


def save_checkpoint_atomically(payload: dict, path: str) -> None:
    """Write the checkpoint to a temporary file in the same folder, fsync it, rename it over ``path`` and fsync
    the folder: ``path`` always holds one whole checkpoint (the old or the new one).  A temporary file left by
    a crash fails ``load_checkpoint`` (truncated) and is removed by the next save.  A failed write (disk full)
    removes its temporary file and raises CheckpointWriteError; ``path`` keeps the previous checkpoint."""
    blob = _checkpoint_bytes(payload)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
        os.remove(stale)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            half = len(blob) // 2
            f.write(blob[:half])
            f.flush()
            faults.in_checkpoint_write(payload.get("global_step"))
            f.write(blob[half:])
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise CheckpointWriteError(error.errno, f"could not write checkpoint {path}: {error.strerror or error}; "
                                   "its temporary file was removed and the previous checkpoint is intact") from error
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by ``save_checkpoint_atomically``.  Format, version, length and SHA-256 are
    verified before anything is deserialised (with ``weights_only=True``: tensors and plain containers only,
    no code), so a damaged file raises ValueError naming the file and what is wrong, and changes nothing."""
    def refuse(problem: str, detail: str) -> ValueError:
        return ValueError(f"checkpoint {path} is {problem}: {detail}; nothing was loaded (restore a good copy, or "
                          "delete it to start the run over)")

    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"PK\x03\x04"):
        raise refuse("not a growlib checkpoint", "it is a plain torch.save file (a zip archive) without "
                     f"growlib's {CHECKPOINT_FORMAT!r} header and checksum")
    end = data.find(b"\n", 0, _MAX_HEADER_BYTES)
    if end < 0:
        if _HEADER_START.startswith(data) or data.startswith(_HEADER_START):
            raise refuse("truncated", f"the file ends inside its header ({len(data)} bytes)")
        raise refuse("not a growlib checkpoint", f"it does not start with a {CHECKPOINT_FORMAT!r} header")
    try:
        header = json.loads(data[:end])
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise refuse("not a growlib checkpoint", f"its first line is not a {CHECKPOINT_FORMAT!r} header")
    if header.get("version") != CHECKPOINT_VERSION:
        raise refuse("of an unsupported version", f"format version {header.get('version')!r}, but this growlib "
                     f"reads version {CHECKPOINT_VERSION}")
    expected_length, digest = header.get("payload_bytes"), header.get("sha256")
    if not isinstance(expected_length, int) or not isinstance(digest, str):
        raise refuse("corrupted", "its header lacks the payload's length or SHA-256")
    body = data[end + 1:]
    if len(body) < expected_length:
        raise refuse("truncated", f"it holds {len(body)} of its {expected_length} payload bytes")
    if len(body) > expected_length:
        raise refuse("corrupted", f"it holds {len(body) - expected_length} bytes past its {expected_length}-byte "
                     "payload")
    if hashlib.sha256(body).hexdigest() != digest:
        raise refuse("corrupted", "checksum mismatch (the payload's SHA-256 differs from the header's)")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except Exception as error:  # intact bytes that torch cannot read: a payload of another torch or growlib
        raise refuse("unreadable", f"torch.load(weights_only=True) failed on its verified payload: {error}") from error
    if not isinstance(payload, dict):
        raise refuse("not a growlib checkpoint", f"its payload is a {type(payload).__name__}, not a dict")
    return payload


def config_as_dict(config: TrainConfig) -> dict:
    return asdict(config)


def run_identity_config(config: TrainConfig) -> dict:
    """The settings a checkpoint must agree on to be resumed: everything but the fault policy."""
    return {k: v for k, v in config_as_dict(config).items() if k not in _FAULT_POLICY_FIELDS}


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first (name, tensor) pair whose tensor holds NaN or inf (None tensors are skipped)."""
    for name, tensor in named_tensors:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class RankDivergenceError(RuntimeError):
    """The processes of a distributed run hold different models where they must hold the same one."""


def check_ranks_agree(model: torch.nn.Module, stage: str) -> None:
    """After a transition every rank must hold the same model, computed from the same synchronised one.  DDP and
    DeepSpeed would silently overwrite the others with rank 0's when they wrap it, so compare cheap per-tensor
    checksums (float64 sum, sum of squares, position-weighted sum) across ranks (all_reduce MAX and MIN) and
    raise RankDivergenceError naming the stage and the first tensor that differs."""
    if _world_size() == 1:
        return
    names, sums = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().reshape(-1).double()
            weights = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(997).add_(1)
            names.append(name)
            sums.append(torch.stack([x.sum(), x.square().sum(), (x * weights).sum()]))
    high = torch.stack(sums)
    low = high.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    differing = (high != low).any(dim=1).nonzero()
    if len(differing):
        name = names[int(differing[0])]
        raise RankDivergenceError(
            f"the ranks hold different models after the transition into stage {stage!r}: parameter {name!r} (and "
            f"{len(differing) - 1} more) differs between ranks; every rank must compute the same transition from "
            "the same model (a non-deterministic transition, or one that reads rank-dependent data?)")


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run between two steps; ``str()`` says where and how to continue.  A
    KeyboardInterrupt, so ``except Exception`` does not swallow it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _StopRequests:
    """While training: the first SIGINT / SIGTERM asks the loop to stop after the current step (it checkpoints,
    then raises RunInterrupted); a second SIGINT interrupts at once.  Only the main thread can own signals: in
    another thread nothing is installed and signals keep their usual effect."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False

    def _handle(self, number, frame):
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name
        print(f"growlib: {self.signal_name}: stopping after this step, with a checkpoint (Ctrl-C again stops at "
              "once)", file=sys.stderr, flush=True)

    def pending(self, device: torch.device) -> str | None:
        """The signal that asks to stop, on any rank (every rank must stop at the same step)."""
        if _world_size() == 1:
            return self.signal_name
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return (self.signal_name or "a signal on another rank") if flag.item() else None


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


def _autocast(model: torch.nn.Module):
    """bf16 autocast on the GPU; plain fp32 on the CPU (where runs must reproduce exactly)."""
    if next(model.parameters()).is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torchrun)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _world_size() -> int:
    return rank_and_world()[1]


def _is_main() -> bool:
    return rank_and_world()[0] == 0


def _data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around the stage's model when running under torchrun; rebuilt at every transition, since each stage
    has its own model.  DDP only all-reduces parameters that require grad, so frozen layers send nothing."""
    if _world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [model.device.index] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _sync_gradients(model: torch.nn.Module, last_micro_batch: bool):
    """Skip DDP's all-reduce on all but the last micro-batch of a gradient-accumulation step."""
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _mean_over_ranks(value: torch.Tensor) -> float:
    if _world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= _world_size()
    return float(value)


class TorchSteps:
    """Optimizer steps with plain PyTorch, or DDP under torchrun: autocast, accumulation, clipping."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.wrapped = _data_parallel(model)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_batch(self, batch: dict, linear_term: dict, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its share of the step's mean loss."""
        accum = self.config.grad_accum
        with _autocast(self.model), _sync_gradients(self.wrapped, last):
            loss = self.wrapped(**batch).loss / accum
            (loss + linear_term_value(self.model, linear_term) / accum).backward()
        return loss.detach()

    def clip_and_find_nonfinite_gradient(self) -> str | None:
        """Clip the gradients; return None if they are all finite, else the name of the first parameter whose
        gradient holds NaN or inf.  The check is one isfinite on the total norm clipping computes anyway (under
        DDP the gradients are already averaged, so every rank decides alike); the search runs only on failure."""
        params = _trainable(self.model)
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


def deepspeed_config(user_config: dict, config: TrainConfig) -> dict:
    """The user's DeepSpeed JSON with the keys growlib owns filled in from ``config``.

    growlib builds the optimizer and sets each stage's learning rate, and its transitions read and write whole
    parameters, so an ``optimizer`` / ``scheduler`` section or ZeRO stage 3 is refused rather than ignored."""
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
    if stage not in (0, 1, 2):
        raise ValueError(f"deepspeed config: zero_optimization.stage must be 0, 1 or 2, got {stage!r}; stage 3 "
                         "partitions the parameters, which growlib's transitions read whole")
    owned = {"train_micro_batch_size_per_gpu": config.batch_size, "gradient_accumulation_steps": config.grad_accum,
             "gradient_clipping": config.clip}
    for key, value in owned.items():
        if key in user_config and user_config[key] != value:
            raise ValueError(f"deepspeed config: {key}={user_config[key]!r} disagrees with growlib's setting {value!r}; "
                             "leave it out or make them equal")
    expected_batch = config.batch_size * config.grad_accum * _world_size()
    if user_config.get("train_batch_size", expected_batch) != expected_batch:
        raise ValueError(f"deepspeed config: train_batch_size={user_config['train_batch_size']!r}, but batch size x "
                         f"accumulation x processes = {expected_batch}")
    return {**user_config, **owned}


class DeepSpeedSteps:
    """Optimizer steps through a DeepSpeed engine (ZeRO stage 0-2) built around the stage's model.

    DeepSpeed scales the loss for accumulation, all-reduces or reduce-scatters gradients, clips and steps at
    the accumulation boundary.  A new engine is built at every transition; the old one's gradient hooks are
    removed so a model kept for later (the V-cycle's fine model) is not reduced twice."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                 user_config: dict):
        import deepspeed

        self.model, self.config = model, config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(user_config, config))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_batch(self, batch: dict, linear_term: dict, last: bool) -> torch.Tensor:
        with _autocast(self.model):
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

    def close(self) -> None:
        self.engine.destroy()
        for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(self.engine, hook, None)
            if handle is not None:
                handle.remove()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = _trainable(model)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def _model_record(model: torch.nn.Module) -> dict:
    return {"class": type(model).__name__, "config": model.config.to_dict(), "state": model.state_dict()}


def _model_from_record(record: dict, like: torch.nn.Module) -> torch.nn.Module:
    """Rebuild a checkpointed model of the same family as ``like`` (the schedule's initial model).  The class
    is looked up among the model classes growlib supports only: a checkpoint cannot name any other callable."""
    from growlib.models import ADAPTERS

    supported = {cls.__name__: cls for adapter in ADAPTERS for cls in adapter.model_classes}
    if record["class"] not in supported:
        raise ValueError(f"checkpoint model class {record['class']!r} is not one growlib supports "
                         f"({sorted(supported)})")
    cls = supported[record["class"]]
    config = type(like.config).from_dict(record["config"])
    model = cls(config).to(next(like.parameters()).device)
    model.load_state_dict(record["state"], strict=True)
    if getattr(like, "loss_type", None):  # e.g. GPT-2's, which transformers cannot infer from its class name
        model.loss_type = like.loss_type
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict]) -> float:
    was_training = model.training
    model.eval()
    with _autocast(model):
        losses = [float(model(**batch).loss) for batch in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def run_schedule(stages: list[Stage], state: RunState, config: TrainConfig, *,
                 train_batch: Callable[[int], dict], eval_batches: list[dict],
                 step_flops: Callable[[torch.nn.Module], float], metrics: MetricsLog | None = None,
                 checkpoint_path: str | None = None, checkpoint_every: int = 0, resume: bool = False,
                 schedule_name: str = "", progress: Callable[[dict], None] | None = None,
                 deepspeed: dict | None = None, tokens_per_sample: int | None = None,
                 identity: dict | None = None) -> RunResult:
    """Train through ``stages`` starting from ``state.model``.

    ``train_batch(global_step)`` must be deterministic in the step (that is the data position a checkpoint
    holds); ``step_flops(model)`` gives one optimizer step's FLOPs for the model as currently frozen;
    ``progress(record)`` (optional) sees every step's metrics record, e.g. to drive a progress bar;
    ``tokens_per_sample`` is what the records count as tokens per sample (default ``config.seq_len``; a ViT
    sees its patches + class token, whatever ``seq_len`` says).
    With ``resume`` and an existing checkpoint, the run continues exactly where it stopped; a damaged
    checkpoint raises ValueError before anything changes.  ``deepspeed`` (a DeepSpeed JSON config as a dict)
    trains every stage through a DeepSpeed engine instead of DDP.

    Numerical faults: a NaN / inf loss or gradient (``config.on_nonfinite``: stop or skip the step) and a NaN /
    inf parameter right after a transition or in a model about to be checkpointed (always stop) raise
    FloatingPointError naming the step, stage and tensor; no checkpoint of a broken state is ever written.
    Under torchrun, the ranks' models are compared after every transition (``check_ranks_agree``).

    ``identity`` (JSON-able) describes the run beyond its stages and settings (model, data, seed, ...: see
    growlib.train.runs); a checkpoint of any other identity is refused, naming what differs.  With a
    ``checkpoint_path`` the run always ends with a checkpoint of its final state (resuming it trains nothing
    and returns the result).  SIGINT / SIGTERM stop the run after the current step, with a checkpoint, raising
    RunInterrupted; a checkpoint that cannot be written raises CheckpointWriteError, the previous one intact."""
    with _StopRequests() as stop_requests:
        return _run_schedule(stages, state, config, train_batch, eval_batches, step_flops, metrics, checkpoint_path,
                             checkpoint_every, resume, schedule_name, progress, deepspeed, tokens_per_sample,
                             identity, stop_requests)


def _run_schedule(stages, state, config, train_batch, eval_batches, step_flops, metrics, checkpoint_path,
                  checkpoint_every, resume, schedule_name, progress, deepspeed, tokens_per_sample, identity,
                  stop_requests: _StopRequests) -> RunResult:
    if deepspeed is not None and (resume or checkpoint_every):
        raise ValueError("checkpoint_every and resume must be off with deepspeed: ZeRO partitions the optimizer "
                         "state across ranks, and growlib's checkpoints hold it whole")
    if deepspeed is not None and config.on_nonfinite == "skip":
        raise ValueError("TrainConfig.on_nonfinite='skip' is not supported with deepspeed: the engine clips and "
                         "steps by itself, so growlib checks only the loss there and stops on a non-finite one")
    metrics = metrics or MetricsLog(None)
    tokens_per_sample = config.seq_len if tokens_per_sample is None else require_int("tokens_per_sample",
                                                                                     tokens_per_sample)
    total_steps = sum(s.steps for s in stages)
    start_stage, start_step, global_step, flops, wall = 0, 0, 0, 0.0, 0.0
    evals: list[Evaluation] = []
    checkpoint = None
    run_identity = json.loads(json.dumps(identity or {}))  # as the checkpoint will hold it
    identity = {"schedule": schedule_name, "stages": [[s.name, s.steps] for s in stages],
                "config": run_identity_config(config), "run": run_identity}
    last_checkpoint = 0
    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        checkpoint = load_checkpoint(checkpoint_path)
        if checkpoint.get("identity") != identity:
            from growlib.train.runs import identity_differences

            recorded = checkpoint.get("identity") or {}
            differences = identity_differences(
                {**recorded.get("run", {}), "stages": recorded.get("stages"), "schedule": recorded.get("schedule"),
                 "training": recorded.get("config")},
                {**run_identity, "stages": identity["stages"], "schedule": schedule_name,
                 "training": identity["config"]})
            raise ValueError(f"checkpoint {checkpoint_path} belongs to another run: {'; '.join(differences)}; resume "
                             "with the run's own schedule, steps and settings")
        last_checkpoint = checkpoint["global_step"]
        start_stage, start_step = checkpoint["stage"], checkpoint["step_in_stage"]
        global_step, flops, wall = checkpoint["global_step"], checkpoint["flops"], checkpoint["wall"]
        evals = [Evaluation(*e) for e in checkpoint["evals"]]
        metrics.truncate_after(global_step)
        # in place, not a new RunState: the caller's ``state`` must end holding the run's model, also when the
        # checkpoint is the final one and nothing is left to train (compare measures evaluation noise on it)
        state.kept = {k: _model_from_record(r, state.model) for k, r in checkpoint["kept"].items()}
        state.model = _model_from_record(checkpoint["model"], state.model)
        state.linear_term, state.notes = checkpoint["linear_term"], checkpoint["notes"]
        state.kept_optimizer_states = checkpoint["kept_optimizer_states"]

    elif resume:
        metrics.truncate_after(0)  # killed before its first checkpoint: start again, log once

    optimizer, steps = None, None
    consecutive_skips = checkpoint["consecutive_skips"] if checkpoint is not None else 0

    def write_checkpoint(stage_index: int, step_in_stage: int) -> int:
        """Checkpoint the current state (on the main rank) as being at ``step_in_stage`` of that stage."""
        _require_finite_parameters(model, f"after step {global_step} (stage {stages[stage_index].name!r}); not "
                                          "writing a checkpoint of it")
        if not _is_main():
            return global_step
        try:
            save_checkpoint_atomically({
                "stage": stage_index, "step_in_stage": step_in_stage, "global_step": global_step,
                "flops": flops, "wall": wall, "evals": [tuple(e) for e in evals], "model": _model_record(model),
                "kept": {k: _model_record(m) for k, m in state.kept.items()},
                "linear_term": state.linear_term, "kept_optimizer_states": state.kept_optimizer_states,
                "notes": state.notes, "consecutive_skips": consecutive_skips,
                "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "identity": identity}, checkpoint_path)
        except CheckpointWriteError as error:
            resumable = (f"--resume continues from step {last_checkpoint}" if last_checkpoint
                         else "there is no earlier checkpoint to resume")
            raise CheckpointWriteError(error.errno, f"{error.strerror} (step {global_step}); once there is space, "
                                       f"{resumable}") from error
        return global_step
    for index in range(start_stage, len(stages)):
        stage = stages[index]
        resuming_here = checkpoint is not None and index == start_stage
        if resuming_here:
            model = state.model
            if stage.freeze:
                stage.freeze(model)
            optimizer = _make_optimizer(model, config)
            optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["rng"])
            if checkpoint["cuda_rng"]:
                torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        else:
            state.linear_term = {}
            state.sample_batch = lambda ahead=0: train_batch(global_step * config.grad_accum + ahead)
            state.micro_batch_flops = lambda m: step_flops(m) / config.grad_accum
            state.optimizer = optimizer
            transition_started = time.perf_counter()
            with counting_map_flops() as maps:
                transition = stage.enter(state)
            model = transition.model
            flops += (maps.flops + transition.flops) * _world_size()  # every rank does the transition
            faults.in_transition(stage.name)
            _require_finite_parameters(model, f"right after the transition into stage {stage.name!r} (before step "
                                              f"{global_step + 1}): the transition broke the model; stopping before "
                                              "it is trained or checkpointed")
            check_ranks_agree(model, stage.name)
            if stage.freeze:
                stage.freeze(model)
            new_optimizer = _make_optimizer(model, config)
            with counting_map_flops() as maps:
                _carry_optimizer_state(transition, optimizer, state.model, new_optimizer, deepspeed is not None)
            flops += maps.flops * _world_size()
            wall += time.perf_counter() - transition_started  # transitions cost time too (fitting LiGO)
            optimizer = new_optimizer
            state.model = model
        model.train()
        if steps is not None:
            steps.close()
        steps = (DeepSpeedSteps(model, optimizer, config, deepspeed) if deepspeed is not None
                 else TorchSteps(model, optimizer, config))
        flops_per_step = step_flops(model) * _world_size()
        first_step = start_step if resuming_here else 0
        for step_in_stage in range(first_step, stage.steps):
            faults.before_step(global_step + 1, rank_and_world()[0])
            started = time.perf_counter()
            lr = learning_rate(config, stage, step_in_stage, global_step, total_steps)
            steps.set_lr(lr)
            if stage.before_step:
                stage.before_step(model, step_in_stage)
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                batch = train_batch(global_step * config.grad_accum + micro)
                loss = steps.micro_batch(batch, state.linear_term, last=micro == config.grad_accum - 1)
                loss_sum += _mean_over_ranks(loss)
            fault = _nonfinite_fault(loss_sum, steps, global_step + 1, stage.name)
            if fault is None:
                steps.step()
                consecutive_skips = 0
            elif config.on_nonfinite == "skip" and consecutive_skips < config.max_consecutive_skips:
                steps.skip()
                consecutive_skips += 1
            elif config.on_nonfinite == "skip":
                raise FloatingPointError(f"{fault[0]}; that is {consecutive_skips + 1} non-finite steps in a row, "
                                         f"more than on_nonfinite='skip' drops (max_consecutive_skips="
                                         f"{config.max_consecutive_skips})")
            else:
                raise FloatingPointError(f"{fault[0]}; stopping (on_nonfinite='stop'): the last checkpoint holds "
                                         "the last good state")
            global_step += 1
            flops += flops_per_step
            wall += time.perf_counter() - started
            record = {"kind": "train", "schedule": schedule_name, "step": global_step, "stage": stage.name,
                      "tokens": global_step * config.grad_accum * config.batch_size * tokens_per_sample * _world_size(),
                      "flops": flops, "loss": loss_sum, "lr": lr, "wall": wall}
            if fault is None:
                metrics.write(record)
            else:  # JSON has no NaN: the loss is written as text
                metrics.write({**record, "kind": "skipped", "loss": str(loss_sum), "reason": fault[0],
                               "tensor": fault[1]})
            if progress and _is_main():
                progress({**record, "total_steps": total_steps})
            if global_step % config.eval_every == 0 or global_step == total_steps:
                val = evaluate(model, eval_batches)
                evals.append(Evaluation(global_step, flops, wall, val, _parameter_count(model)))
                metrics.write({"kind": "eval", "schedule": schedule_name, "step": global_step,
                               "stage": stage.name, "flops": flops, "wall": wall, "val_loss": val,
                               "parameters": evals[-1].parameters})
            if checkpoint_path and checkpoint_every and global_step % checkpoint_every == 0:
                last_checkpoint = write_checkpoint(index, step_in_stage + 1)
            stop = stop_requests.pending(next(model.parameters()).device)
            if stop:
                can_checkpoint = bool(checkpoint_path) and deepspeed is None
                if can_checkpoint and last_checkpoint != global_step:
                    last_checkpoint = write_checkpoint(index, step_in_stage + 1)
                where = (f"checkpoint {checkpoint_path} holds step {global_step}: --resume continues from there"
                         if can_checkpoint else "no checkpoint (none is written without a run folder or with "
                         "DeepSpeed): this run cannot be resumed")
                raise RunInterrupted(f"{stop} at step {global_step} of {total_steps}; {where}", global_step)
        start_step = 0
    if steps is not None:
        steps.close()
    if checkpoint_path and deepspeed is None and last_checkpoint != global_step and stages:
        write_checkpoint(len(stages) - 1, stages[-1].steps)
    return RunResult(steps=global_step, flops=flops, wall_seconds=wall,
                     final_val_loss=evals[-1].val_loss if evals else float("nan"), evals=evals)


def _parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameter elements (a tied embedding counts once), frozen ones included."""
    return sum(p.numel() for p in model.parameters())


def _require_finite_parameters(model: torch.nn.Module, where: str) -> None:
    """Raise FloatingPointError naming the first parameter holding NaN or inf, and ``where`` that was found."""
    broken = first_nonfinite(model.named_parameters())
    if broken is not None:
        raise FloatingPointError(f"parameter {broken!r} holds NaN or inf {where}")


def _nonfinite_fault(loss_sum: float, steps, step: int, stage: str) -> tuple[str, str | None] | None:
    """None when this step's loss and gradients are finite, else (what is wrong, the tensor's name or None).
    The loss is checked first: a NaN loss makes every gradient NaN, and the loss names the cause."""
    if not math.isfinite(loss_sum):
        return f"the loss is {loss_sum} at step {step} (stage {stage!r})", None
    parameter = steps.clip_and_find_nonfinite_gradient()
    if parameter is None:
        return None
    return (f"the gradient of parameter {parameter!r} holds NaN or inf at step {step} (stage {stage!r}; the loss "
            f"is finite: {loss_sum:.6g})"), parameter


def _carry_optimizer_state(transition: Transition, old_optimizer: torch.optim.Optimizer | None,
                           old_model: torch.nn.Module, new_optimizer: torch.optim.Optimizer,
                           under_deepspeed: bool) -> None:
    """Apply the transition's optimizer policy to the fresh ``new_optimizer`` of ``transition.model``."""
    policy = transition.optimizer_policy
    if policy == "reset" or (policy == "map" and old_optimizer is None):
        return  # nothing to carry: a fresh optimizer, or the first stage
    if under_deepspeed:
        raise ValueError(f"optimizer_policy {policy!r} needs the whole optimizer state, which DeepSpeed ZeRO "
                         "partitions across ranks: use the schedule's 'reset' policy with deepspeed")
    if policy == "keep":
        new_optimizer.load_state_dict(transition.optimizer_state)
        return
    frozen = [name for model in (old_model, transition.model) for name, p in model.named_parameters()
              if not p.requires_grad]
    if frozen:
        raise ValueError(f"optimizer_policy 'map' needs every parameter trainable on both sides of the "
                         f"transition, but {frozen[:3]} are frozen: use 'reset' for stages that freeze")
    map_optimizer_state(old_optimizer, old_model, new_optimizer, transition.model, transition.growth_map)
