"""One training loop for every schedule.  A schedule is a list of ``Stage``s (growlib.schedules.protocol);
each stage builds its model from the previous stage's (a transition: coalesce, de-coalesce + interpolate,
grow, ...), optionally freezes part of it, and trains it for its steps with a fresh, kept or mapped optimizer
and its warmup + cosine learning rate, while FLOPs and wall time are counted, the model is validated every N
steps, metrics go to JSONL and checkpoints are written atomically; SIGINT / SIGTERM stop it cleanly.  Entering
a stage (``enter_stage``) is the one walk over a schedule: ``run_schedule`` trains between its stages and
``planned_flops`` only adds up what they cost, so the FLOPs predicted for a schedule are the FLOPs its run
counts.  The settings, metrics, checkpoints, distributed steps and numerical guards the loop uses live in
growlib.train.config, .metrics, .checkpoint, .distributed and .guards."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from growlib.apply import counting_map_flops
from growlib.optim import map_optimizer_state
from growlib.schedules.protocol import RunState, Stage, Transition
from growlib.sharded import is_sharded, reshard, shard_model
from growlib.train import faults
from growlib.train.checkpoint import (CheckpointWriteError, engine_file_digests, engine_tag, load_checkpoint,
                                      model_from_record, model_record, remove_engine_checkpoints, require_same_run,
                                      save_checkpoint_atomically, sync_engine_files, verified_engine_checkpoint)
from growlib.train.config import TrainConfig, learning_rate, make_optimizer, run_identity_config
from growlib.train.distributed import (DeepSpeedSteps, FSDPSteps, TorchSteps, check_ranks_agree, is_main,
                                       mean_over_ranks, rank_and_world, world_size)
from growlib.train.guards import NonfiniteGuard, require_finite_parameters
from growlib.train.metrics import Evaluation, MetricsLog, RunResult, evaluate, parameter_count
from growlib.train.runs import ENGINE_DIR
from growlib.validate import require_int


#: which transitions ran shard-local or gathered (the command line shows it)
_transitions_log = logging.getLogger("growlib.train")
#: how FSDP2 runs make a transition: each rank building its shard of the new model where the stage allows, or
#: every rank gathering the model whole first (``run_schedule``)
FSDP_TRANSITIONS = ("shard-local", "gather")


@dataclass
class EnteredStage:
    """A stage ready to train: its model (frozen as the stage says), its optimizer (carrying state as the
    transition's policy says) and one process's FLOPs: the transition's (the maps it applied, the work it
    reports, the optimizer state it mapped) and one optimizer step's."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    transition_flops: float
    flops_per_step: float


def enter_stage(stage: Stage, state: RunState, config: TrainConfig, step_flops: Callable[[torch.nn.Module], float],
                *, under_deepspeed: bool = False,
                check_model: Callable[[torch.nn.Module], None] | None = None) -> EnteredStage:
    """Make ``stage``'s transition from ``state``: its model, freezing and optimizer, and what they cost.
    ``state.model`` and ``state.optimizer`` become the stage's.  ``check_model`` (the loop's checks) sees the
    new model before it is frozen.  Training (``run_schedule``) and counting (``planned_flops``) both enter
    every stage through here."""
    state.linear_term = {}
    state.micro_batch_flops = lambda m: step_flops(m) / config.grad_accum
    with counting_map_flops() as maps:
        transition = stage.enter(state)
    model = transition.model
    if is_sharded(model) and transition.optimizer_policy != "reset":
        raise ValueError(f"stage {stage.name!r} built its model sharded (a shard-local transition), which starts a "
                         f"fresh optimizer, but its optimizer policy is {transition.optimizer_policy!r}: declare "
                         "Stage.sharded_transition only for transitions with the 'reset' policy")
    if check_model is not None:
        check_model(model)
    if stage.freeze:
        stage.freeze(model)
    optimizer = make_optimizer(model, config)
    with counting_map_flops() as carried:
        _carry_optimizer_state(transition, state.optimizer, state.model, optimizer, under_deepspeed)
    state.model, state.optimizer = model, optimizer
    return EnteredStage(model, optimizer, maps.flops + transition.flops + carried.flops, step_flops(model))


def planned_flops(stages: list[Stage], state: RunState, config: TrainConfig,
                  step_flops: Callable[[torch.nn.Module], float]) -> float:
    """The FLOPs ``run_schedule`` counts for ``stages`` in one process, found without training: every stage is
    entered as the loop enters it (``enter_stage``, with ``state.dry_run`` set so that transitions skip their
    training work, such as fitting LiGO) and charged its steps, added one by one as the loop adds them."""
    state.dry_run = True
    total = 0.0
    for stage in stages:
        entered = enter_stage(stage, state, config, step_flops)
        total += entered.transition_flops
        for _ in range(stage.steps):
            total += entered.flops_per_step
        _stand_in_for_training(entered.optimizer)
    return total


def _stand_in_for_training(optimizer: torch.optim.Optimizer) -> None:
    """Give a dry run's optimizer the state training leaves (AdamW's moments, from one step of zero gradients
    at learning rate 0, which changes no weight), so a later transition keeps or maps a state of the real
    one's shapes, at the real one's cost."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
        if world_size() == 1:
            return self.signal_name
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return (self.signal_name or "a signal on another rank") if flag.item() else None


def run_schedule(stages: list[Stage], state: RunState, config: TrainConfig, *,
                 train_batch: Callable[[int], dict], eval_batches: list[dict],
                 step_flops: Callable[[torch.nn.Module], float], metrics: MetricsLog | None = None,
                 checkpoint_path: str | None = None, checkpoint_every: int = 0, resume: bool = False,
                 schedule_name: str = "", progress: Callable[[dict], None] | None = None,
                 deepspeed: dict | None = None, fsdp: bool = False, fsdp_transitions: str = "shard-local",
                 tokens_per_sample: int | None = None, identity: dict | None = None) -> RunResult:
    """Train through ``stages`` starting from ``state.model``.

    ``train_batch(global_step)`` must be deterministic in the step (that is the data position a checkpoint
    holds); ``step_flops(model)`` gives one optimizer step's FLOPs for the model as currently frozen;
    ``progress(record)`` (optional) sees every step's metrics record, e.g. to drive a progress bar;
    ``tokens_per_sample`` is what the records count as tokens per sample (default ``config.seq_len``; a ViT
    sees its patches + class token, whatever ``seq_len`` says).
    With ``resume`` and an existing checkpoint, the run continues exactly where it stopped; a damaged
    checkpoint raises ValueError before anything changes.  ``deepspeed`` (a DeepSpeed JSON config as a dict)
    trains every stage through a DeepSpeed engine instead of DDP; ``fsdp`` shards every stage's model with FSDP2
    (growlib.train.distributed.FSDPSteps).  ``fsdp_transitions``: ``shard-local`` (default) lets each rank build
    its shard of the new model in the transitions that allow it (``Stage.sharded_transition``: growlib.sharded)
    and gathers the model whole on every rank for the others; ``gather`` always gathers it.  Both give the same
    models bit for bit; they differ in memory.

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
        run = _ScheduleRun(stages, state, config, train_batch=train_batch, eval_batches=eval_batches,
                           step_flops=step_flops, metrics=metrics, checkpoint_path=checkpoint_path,
                           checkpoint_every=checkpoint_every, resume=resume, schedule_name=schedule_name,
                           progress=progress, deepspeed=deepspeed, fsdp=fsdp, fsdp_transitions=fsdp_transitions,
                           tokens_per_sample=tokens_per_sample, identity=identity, stop_requests=stop_requests)
        checkpoint = run.start()
        first_stage = checkpoint["stage"] if checkpoint is not None else 0
        for index in range(first_stage, len(stages)):
            if index == first_stage and checkpoint is not None:
                run.restore_stage(index, checkpoint)
                run.train_stage(index, first_step=checkpoint["step_in_stage"])
            else:
                run.transition_into(index)
                run.train_stage(index, first_step=0)
        return run.finish()


class _ScheduleRun:
    """One call of ``run_schedule``: what it was given, and where it stands (steps, FLOPs and wall time so far,
    evaluations, the last checkpoint, the optimizer and step backend of the stage in training)."""

    def __init__(self, stages: list[Stage], state: RunState, config: TrainConfig, *, train_batch, eval_batches,
                 step_flops, metrics, checkpoint_path, checkpoint_every, resume, schedule_name, progress, deepspeed,
                 fsdp, fsdp_transitions, tokens_per_sample, identity, stop_requests: _StopRequests):
        if deepspeed is not None and fsdp:
            raise ValueError("deepspeed and fsdp exclude each other: choose one engine")
        if fsdp_transitions not in FSDP_TRANSITIONS:
            raise ValueError(f"fsdp_transitions must be one of {FSDP_TRANSITIONS}, got {fsdp_transitions!r}")
        if deepspeed is not None and config.on_nonfinite == "skip":
            raise ValueError("TrainConfig.on_nonfinite='skip' is not supported with deepspeed: the engine clips and "
                             "steps by itself, so growlib checks only the loss there and stops on a non-finite one")
        self.stages, self.state, self.config = stages, state, config
        self.train_batch, self.eval_batches, self.step_flops = train_batch, eval_batches, step_flops
        self.metrics = metrics or MetricsLog(None)
        self.checkpoint_path, self.checkpoint_every, self.resume = checkpoint_path, checkpoint_every, resume
        self.schedule_name, self.progress, self.deepspeed, self.fsdp = schedule_name, progress, deepspeed, fsdp
        self.fsdp_transitions = fsdp_transitions
        self.tokens_per_sample = (config.seq_len if tokens_per_sample is None
                                  else require_int("tokens_per_sample", tokens_per_sample))
        self.identity = {"schedule": schedule_name, "stages": [[s.name, s.steps] for s in stages],
                         "config": run_identity_config(config),
                         "run": json.loads(json.dumps(identity or {}))}  # as the checkpoint will hold it
        self.stop_requests = stop_requests
        self.total_steps = sum(s.steps for s in stages)
        self.global_step, self.flops, self.wall = 0, 0.0, 0.0
        self.evals: list[Evaluation] = []
        self.last_checkpoint = 0
        self.guard = NonfiniteGuard(config)
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps: TorchSteps | FSDPSteps | DeepSpeedSteps | None = None
        #: the engine checkpoints of FSDP2 and DeepSpeed (each rank's shards of model and optimizer state)
        self.engine_folder = os.path.join(os.path.dirname(checkpoint_path), ENGINE_DIR) if checkpoint_path else None
        self.engine_checkpoint: str | None = None  # the engine state a resumed stage loads
        self.flops_per_step = 0.0

    def start(self) -> dict | None:
        """Start the run, or with ``resume`` and a checkpoint of this very run, restore its counters, models and
        schedule state and return the checkpoint (its stage's optimizer and random state are restored by
        ``restore_stage``).  The metrics log is cut back to the step the run continues from."""
        if not (self.resume and self.checkpoint_path and os.path.exists(self.checkpoint_path)):
            if self.resume:
                self.metrics.truncate_after(0)  # killed before its first checkpoint: start again, log once
            return None
        checkpoint = load_checkpoint(self.checkpoint_path)
        require_same_run(checkpoint, self.identity, self.checkpoint_path)
        if checkpoint["engine"] is not None:  # sharded state, verified before anything changes
            self.engine_checkpoint = verified_engine_checkpoint(self.engine_folder, checkpoint["engine"])
        self.last_checkpoint = self.global_step = checkpoint["global_step"]
        self.flops, self.wall = checkpoint["flops"], checkpoint["wall"]
        self.evals = [Evaluation(*e) for e in checkpoint["evals"]]
        self.guard.consecutive_skips = checkpoint["consecutive_skips"]
        self.metrics.truncate_after(self.global_step)
        # in place, not a new RunState: the caller's ``state`` must end holding the run's model, also when the
        # checkpoint is the final one and nothing is left to train (compare measures evaluation noise on it)
        state = self.state
        # a model kept sharded has no weights here: built as shards, it loads them with the stage's
        state.kept = {k: model_from_record(r, state.model, sharded=r["state"] is None)
                      for k, r in checkpoint["kept"].items()}
        state.model = model_from_record(checkpoint["model"], state.model)
        state.linear_term, state.notes = checkpoint["linear_term"], checkpoint["notes"]
        state.kept_optimizer_states = checkpoint["kept_optimizer_states"]
        return checkpoint

    def restore_stage(self, index: int, checkpoint: dict) -> None:
        """Set up the stage the checkpoint stopped in: its freezing, its optimizer's state and the random state."""
        stage, model = self.stages[index], self.state.model
        if stage.freeze:
            stage.freeze(model)
        self.optimizer = self.state.optimizer = make_optimizer(model, self.config)
        if checkpoint["engine"] is None:  # else the shards load into the engine train_stage builds
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        if checkpoint["cuda_rng"]:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        self.flops_per_step = self.step_flops(model) * world_size()

    def transition_into(self, index: int) -> None:
        """Enter stage ``index`` from the current state (``enter_stage``), charging the transition's FLOPs on
        every rank and its wall time; the new model is checked before anything trains on it."""
        stage = self.stages[index]
        if self.shard_local(stage):
            self.keep_sharded()
            variant = "shard-local (each rank builds its shard of the new model)"
        elif self.steps is not None and self.steps.sharded:
            self.gather_sharded_model()
            variant = "gathered (the model made whole on every rank first)"
        else:
            variant = None
        if variant and is_main():
            _transitions_log.info(f"transition into stage {stage.name!r}: {variant}")
        self.state.sample_batch = lambda ahead=0: self.train_batch(self.global_step * self.config.grad_accum + ahead)
        started = time.perf_counter()

        def check_model(model: torch.nn.Module) -> None:
            faults.in_transition(stage.name)
            require_finite_parameters(model, f"right after the transition into stage {stage.name!r} (before step "
                                             f"{self.global_step + 1}): the transition broke the model; stopping "
                                             "before it is trained or checkpointed")
            check_ranks_agree(model, stage.name)

        entered = enter_stage(stage, self.state, self.config, self.step_flops,
                              under_deepspeed=self.deepspeed is not None, check_model=check_model)
        self.flops += entered.transition_flops * world_size()  # every rank does the transition
        self.wall += time.perf_counter() - started  # transitions cost time too (fitting LiGO)
        self.optimizer = entered.optimizer
        self.flops_per_step = entered.flops_per_step * world_size()

    def shard_local(self, stage: Stage) -> bool:
        """Whether the transition into ``stage`` runs on the FSDP2-sharded model (``Stage.sharded_transition``)."""
        if not (self.fsdp and self.fsdp_transitions == "shard-local"):
            return False
        allowed = stage.sharded_transition
        return bool(allowed(self.state.model) if callable(allowed) else allowed)

    def keep_sharded(self) -> None:
        """Before a shard-local transition: the model as shards (the run's first model, plain until now, sharded
        here, so that a model the first transition keeps for later is sharded too) and the old optimizer
        released (the transition starts a fresh one)."""
        if self.steps is not None:
            reshard(self.state.model)
            self.steps.close()
            self.steps = None
        elif not is_sharded(self.state.model):
            shard_model(self.state.model, on_cuda=next(self.state.model.parameters()).is_cuda)
        self.optimizer = self.state.optimizer = None

    def gather_sharded_model(self, finishing: bool = False) -> None:
        """Under FSDP2 / ZeRO-3: make the run's model and optimizer whole, plain objects again (on every rank), for
        the transition or the caller that reads them next (``finishing``: the model only, no optimizer state is
        read after the run); the sharded ones go with their step backend."""
        if self.steps is not None and self.steps.sharded:
            self.state.model, self.state.optimizer = self.steps.gathered(optimizer_state=not finishing)
            self.optimizer = self.state.optimizer
            self.steps.close()
            self.steps = None

    def train_stage(self, index: int, first_step: int) -> None:
        """Train stage ``index`` from ``first_step`` to its end through a new step backend (DDP, FSDP2 or
        DeepSpeed)."""
        model = self.state.model
        model.train()
        if self.steps is not None:
            self.steps.close()
        if self.deepspeed is not None:
            self.steps = DeepSpeedSteps(model, self.optimizer, self.config, self.deepspeed)
        elif self.fsdp:
            self.steps = FSDPSteps(model, self.optimizer, self.config)  # shards the model in place
            self.optimizer = self.state.optimizer = self.steps.optimizer
        else:
            self.steps = TorchSteps(model, self.optimizer, self.config)
        if self.engine_checkpoint is not None:  # resuming: the shards of model and optimizer as checkpointed
            self.steps.load(self.engine_folder, self.engine_checkpoint, self.sharded_kept())
            self.engine_checkpoint = None
        for step_in_stage in range(first_step, self.stages[index].steps):
            self.train_step(index, step_in_stage)

    def train_step(self, index: int, step_in_stage: int) -> None:
        """One optimizer step (or a dropped one), its metrics, and the evaluation, checkpoint and stop it is due."""
        stage, model, config = self.stages[index], self.state.model, self.config
        faults.before_step(self.global_step + 1, rank_and_world()[0])
        started = time.perf_counter()
        lr = learning_rate(config, stage, step_in_stage, self.global_step, self.total_steps)
        self.steps.set_lr(lr)
        if stage.before_step:
            stage.before_step(model, step_in_stage)
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            batch = self.train_batch(self.global_step * config.grad_accum + micro)
            loss = self.steps.micro_batch(batch, self.state.linear_term, last=micro == config.grad_accum - 1)
            loss_sum += mean_over_ranks(loss)
        fault = self.guard.step_or_skip(loss_sum, self.steps, self.global_step + 1, stage.name)
        self.global_step += 1
        self.flops += self.flops_per_step
        self.wall += time.perf_counter() - started
        self.log_step(stage, lr, loss_sum, fault)
        if self.global_step % config.eval_every == 0 or self.global_step == self.total_steps:
            self.evaluate(stage)
        if self.checkpoint_path and self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
            self.write_checkpoint(index, step_in_stage + 1)
        self.stop_if_asked(index, step_in_stage)

    def log_step(self, stage: Stage, lr: float, loss_sum: float, fault: tuple[str, str | None] | None) -> None:
        """The step's metrics record (a dropped step's with its fault) to the log and the progress callback."""
        record = {"kind": "train", "schedule": self.schedule_name, "step": self.global_step, "stage": stage.name,
                  "tokens": (self.global_step * self.config.grad_accum * self.config.batch_size * self.tokens_per_sample
                             * world_size()),
                  "flops": self.flops, "loss": loss_sum, "lr": lr, "wall": self.wall}
        if fault is None:
            self.metrics.write(record)
        else:  # JSON has no NaN: the loss is written as text
            self.metrics.write({**record, "kind": "skipped", "loss": str(loss_sum), "reason": fault[0],
                                "tensor": fault[1]})
        if self.progress and is_main():
            self.progress({**record, "total_steps": self.total_steps})

    def evaluate(self, stage: Stage) -> None:
        """Validate the current model, adding a point to the curve and an ``eval`` record to the log."""
        model = self.state.model
        val = evaluate(model, self.eval_batches)
        self.evals.append(Evaluation(self.global_step, self.flops, self.wall, val, parameter_count(model)))
        self.metrics.write({"kind": "eval", "schedule": self.schedule_name, "step": self.global_step,
                            "stage": stage.name, "flops": self.flops, "wall": self.wall, "val_loss": val,
                            "parameters": self.evals[-1].parameters})

    def stop_if_asked(self, index: int, step_in_stage: int) -> None:
        """After a SIGINT / SIGTERM on any rank: checkpoint this step (if the run can) and raise RunInterrupted."""
        stop = self.stop_requests.pending(next(self.state.model.parameters()).device)
        if not stop:
            return
        can_checkpoint = bool(self.checkpoint_path)
        if can_checkpoint and self.last_checkpoint != self.global_step:
            self.write_checkpoint(index, step_in_stage + 1)
        where = (f"checkpoint {self.checkpoint_path} holds step {self.global_step}: --resume continues from there"
                 if can_checkpoint else "no checkpoint (none is written without a run folder): this run cannot "
                 "be resumed")
        raise RunInterrupted(f"{stop} at step {self.global_step} of {self.total_steps}; {where}", self.global_step)

    def write_checkpoint(self, stage_index: int, step_in_stage: int) -> None:
        """Checkpoint the current state (on the main rank) as being at ``step_in_stage`` of that stage.  Under FSDP
        and DeepSpeed every rank writes its shard of the model and optimizer state (torch.distributed.checkpoint,
        DeepSpeed's own) to ``engine/step<N>`` beside the checkpoint, which names those files with their SHA-256
        and holds the rest of the run's state."""
        state = self.state
        require_finite_parameters(state.model, f"after step {self.global_step} (stage "
                                               f"{self.stages[stage_index].name!r}); not writing a checkpoint of it")
        engine, sharded_kept = None, self.sharded_kept()
        if isinstance(self.steps, (FSDPSteps, DeepSpeedSteps)):  # each rank writes its shard of the state
            tag = engine_tag(self.global_step)
            self.steps.save(self.engine_folder, tag, sharded_kept)
            sync_engine_files(self.engine_folder, tag)
            engine = {"tag": tag, "sha256": engine_file_digests(self.engine_folder, tag)}  # every rank hashes some
            model, optimizer = model_record(state.model, weights=False), None
        else:
            model, optimizer = model_record(state.model), self.optimizer.state_dict()
        if is_main():
            try:
                save_checkpoint_atomically({
                    "stage": stage_index, "step_in_stage": step_in_stage, "global_step": self.global_step,
                    "flops": self.flops, "wall": self.wall, "evals": [tuple(e) for e in self.evals],
                    "model": model, "kept": {k: model_record(m, weights=k not in sharded_kept)
                                             for k, m in state.kept.items()},
                    "linear_term": state.linear_term, "kept_optimizer_states": state.kept_optimizer_states,
                    "notes": state.notes, "consecutive_skips": self.guard.consecutive_skips,
                    "optimizer": optimizer, "engine": engine,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "identity": self.identity}, self.checkpoint_path)
            except CheckpointWriteError as error:
                resumable = (f"--resume continues from step {self.last_checkpoint}" if self.last_checkpoint
                             else "there is no earlier checkpoint to resume")
                raise CheckpointWriteError(error.errno, f"{error.strerror} (step {self.global_step}); once there is "
                                           f"space, {resumable}") from error
            if engine:
                remove_engine_checkpoints(self.engine_folder, keep=engine["tag"])
        if engine and world_size() > 1:
            torch.distributed.barrier()  # no rank goes on (or exits on a stop request) before the checkpoint is whole
        self.last_checkpoint = self.global_step

    def sharded_kept(self) -> dict[str, torch.nn.Module]:
        """The models the schedule keeps for later that are sharded (left by a shard-local transition): their
        shards go into the engine checkpoint with the stage's."""
        return {key: model for key, model in self.state.kept.items() if is_sharded(model)}

    def finish(self) -> RunResult:
        """Checkpoint the final state (unless just done), make the model whole, release the last step backend
        and total the run."""
        if self.checkpoint_path and self.last_checkpoint != self.global_step and self.stages:
            self.write_checkpoint(len(self.stages) - 1, self.stages[-1].steps)
        self.gather_sharded_model(finishing=True)
        if self.steps is not None:
            self.steps.close()
        return RunResult(steps=self.global_step, flops=self.flops, wall_seconds=self.wall,
                         final_val_loss=self.evals[-1].val_loss if self.evals else float("nan"), evals=self.evals)
