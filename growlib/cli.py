"""Command line: ``growlib demo`` (the operators on real HF model classes), ``growlib train`` (one schedule),
``growlib compare`` (every schedule against training from scratch on the same budget), ``growlib grow`` (a saved
model into a larger one), ``growlib check-kernels``
(every Triton kernel against its PyTorch reference on this machine; see growlib/kernels/check.py)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import logging
import os
import re
import sys
import time

import growlib
from growlib import names
from growlib.train.tuning import DEFAULT_EXTEND, DEFAULT_LR_GRID, DEFAULT_TUNE_SEEDS

# torch, transformers and growlib's training modules are imported inside the commands that use them: argument
# parsing, --help and the checks of every flag run before them, in a fraction of a second.

#: the families with a ``demo_model`` in their adapter (named here so that ``--help`` needs no import)
DEMO_FAMILIES = ("bert", "gpt2", "llama")


def _demo_model(family: str):
    """The model ``demo`` shows, randomly initialised at a real size (its adapter's ``demo_model``): no download."""
    from growlib.models import adapter_named

    return adapter_named(family).demo_model()


def _millions(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def _shape(model) -> str:
    dims = growlib.schema_of(model).dims
    return (f"{dims['layers']} layers, hidden {dims['model']}, {dims['heads']} heads "
            f"({dims['kv_heads']} kv) x {dims['head_dim']}, ffn {dims['ffn']}")


def _relative_logit_error(a, b, tokens) -> float:
    import torch

    with torch.no_grad():
        la, lb = a(input_ids=tokens).logits.double(), b(input_ids=tokens).logits.double()
    return float((la - lb).abs().max() / lb.abs().max())


def _timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"  {label:<58} {time.perf_counter() - start:6.2f} s")
    return result


def demo(family: str, seed: int) -> int:
    import torch

    torch.manual_seed(seed)
    print(f"growlib {growlib.__version__} demo on {family} (backend {growlib.current_backend()}, "
          f"torch {torch.__version__})")
    model = _demo_model(family).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 32))
    print(f"fine model    {type(model).__name__}: {_millions(model)} parameters; {_shape(model)}")

    coarse = _timed("coalesce(width=2, depth=2)", lambda: growlib.coalesce(model).eval())
    print(f"coarse model  {_millions(coarse)} parameters; {_shape(coarse)}")
    back = _timed("decoalesce(coarse, like=model)", lambda: growlib.decoalesce(coarse, like=model).eval())
    print(f"de-coalesced  {_millions(back)} parameters; {_shape(back)}")
    again = _timed("coalesce(decoalesce(coarse)) for the round trip", lambda: growlib.coalesce(back))
    exact = all(torch.equal(a, b) for a, b in zip(coarse.parameters(), again.parameters()))
    print(f"round trip coalesce(decoalesce(c)) == c exactly: {exact}")

    narrow = growlib.coalesce(model, depth=1).eval()
    wide = _timed("width-only decoalesce (function-preserving)", lambda: growlib.decoalesce(narrow, like=model))
    decoalesce_error = _relative_logit_error(wide.eval(), narrow, tokens)
    print(f"function preservation, width-only de-coalescing: max relative logit error {decoalesce_error:.2e}")

    growlib.interpolate_(model, coarse, alpha=0.25)
    print("interpolate_(fine, coarse, alpha=0.25): fine <- 0.75 fine + 0.25 decoalesce(coarse), in place")

    narrow_dims = growlib.schema_of(narrow).dims
    cloned = _timed("widen(hidden x2, hypercloning)", lambda: growlib.widen(
        narrow, hidden=2 * narrow_dims["model"], intermediate=2 * narrow_dims["ffn"], method="hypercloning").eval())
    cloning_error = _relative_logit_error(cloned, narrow, tokens)
    print(f"function preservation, HyperCloning x2: max relative logit error {cloning_error:.2e}")

    coarse_layers = growlib.schema_of(coarse).dims["layers"]
    stacked = _timed("grow_depth(2 L, stack)", lambda: growlib.grow_depth(coarse, 2 * coarse_layers))
    print(f"stacked       {_millions(stacked)} parameters; {_shape(stacked)}")
    ode_coarse = _timed("restrict(parity='even') (ODE multilevel)", lambda: growlib.restrict(model))
    print(f"ODE coarse    {_millions(ode_coarse)} parameters; {_shape(ode_coarse)}; residual step h = 2")
    print("(each time includes building the new HF model, randomly initialised and then overwritten)")
    return 0 if exact and max(decoalesce_error, cloning_error) < 1e-5 else 1


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """A flag's value that cannot work: one line naming the flag, exit status 2 (as argparse's own errors)."""


#: API field names in messages from growlib's classes, as the flags that set them
_FLAG_OF_FIELD = {
    "TrainConfig.lr": "--lr", "TrainConfig.warmup_steps": "--warmup", "TrainConfig.lr_schedule": "--lr-schedule",
    "TrainConfig.batch_size": "--batch-size", "TrainConfig.seq_len": "--seq-len",
    "TrainConfig.eval_every": "--eval-every", "TrainConfig.eval_batches": "--eval-batches",
    "TrainConfig.on_nonfinite": "--on-nonfinite", "Experiment.family": "--model", "Experiment.size": "--size",
    "Experiment.total_steps": "--steps", "Experiment.data": "--data", "Experiment.vocab_size": "--vocab-size",
    "Experiment.bin_dtype": "--bin-dtype", "Experiment.init_from": "--init-from",
    "Experiment.tokenizer": "--tokenizer", "Experiment.target_config": "--target-config",
}


def _as_flags(message: str) -> str:
    return re.sub(r"\b(TrainConfig|Experiment)\.\w+", lambda m: _FLAG_OF_FIELD.get(m.group(0), m.group(0)), message)


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=names.FAMILIES, default=None,
                        help="model family (HF class it trains) (default: gpt2, or --init-from's)")
    parser.add_argument("--size", default=None,
                        help="the full model: tiny | small | base, or JSON (inline or a file) with layers, hidden, "
                             "heads, intermediate and, for grouped-query families (llama, qwen2, mistral), kv_heads (default: tiny, or with --init-from the "
                             "checkpoint's own sizes)")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="a save_pretrained folder (e.g. growlib grow's output) the schedule's first stage "
                             "starts from: a growth schedule's small model, a multilevel one's fine model, the "
                             "baseline's start; the full model is its config at --size")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="a folder holding a Hugging Face tokenizer to tokenize --data with and save with the "
                             "run (default: --init-from's own, else a BPE trained on the data)")
    parser.add_argument("--target-config", default=None, metavar="FILE",
                        help="a config.json giving the full model (a growth schedule's target) instead of --size")
    parser.add_argument("--data", default=None,
                        help="a text file or folder, a .bin file of token ids, or hf:NAME[:CONFIG], a Hugging "
                             "Face dataset's text column (needs the datasets package) (default: Python's own stdlib "
                             "sources); the BPE tokenizer trained on it is cached under $GROWLIB_CACHE "
                             "(default ~/.cache/growlib)")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help="the BPE vocabulary trained on text data; for a .bin file, its vocabulary")
    parser.add_argument("--bin-dtype", choices=("uint16", "uint32"), default="uint16",
                        help="how a .bin --data file stores each token id (little-endian)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None,
                        help="the budget: optimizer steps of the full model (300 unless --tokens is given)")
    budget.add_argument("--tokens", type=int, default=None,
                        help="the budget in training tokens (all processes): steps = tokens / (batch x seq x processes)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step and process")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (ViT: ignored, 17 patches)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (compare tunes multiples of it; see --lr-grid)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="linear warmup steps of each warmup + cosine curve, at most 10%% of the curve's steps")
    parser.add_argument("--lr-schedule", choices=("restart", "continue"), default=None,
                        help="warmup + cosine restarted at every stage, or one over the whole run (default: the "
                             "schedule's own: continue for ode_multilevel, restart for the others)")
    parser.add_argument("--eval-every", type=int, default=25, help="optimizer steps between validation evaluations")
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="batches per validation evaluation (compare's summary states how much one evaluation "
                             "of this size moves between disjoint validation subsets)")
    parser.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                        help="a NaN/inf loss or gradient stops the run or drops that step")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads torch may use (default: torch's, $OMP_NUM_THREADS or every core; on a busy "
                             "machine more threads than free cores slow training several times: the run says so)")
    parser.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                        help="off a terminal (CI, nohup, a pipe), a progress line at most this often")
    parser.add_argument("--out", required=True,
                        help="results folder: each run writes OUT/<schedule>-seed<seed>/ (run.json, metrics.jsonl, "
                             "checkpoint.pt, and model/: the trained model and tokenizer, growlib.load_run reads "
                             "it); compare adds summary.md/csv, tuning.md/csv, plots and OUT/tuning/")


def _debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")


def _budget_steps(args) -> int:
    """Optimizer steps from --steps, or from --tokens at this run's batch size, length and process count."""
    if args.tokens is None:
        return 300 if args.steps is None else args.steps
    per_step = args.batch_size * args.seq_len * int(os.environ.get("WORLD_SIZE", "1"))
    if args.tokens < per_step:
        raise UsageError(f"--tokens {args.tokens} is less than one step's {per_step} tokens "
                         f"(batch {args.batch_size} x seq {args.seq_len} x processes)")
    return args.tokens // per_step


def _checkpoint_family(args) -> str | None:
    """--init-from's (else --target-config's) family, read from its config.json: the default of --model."""
    config_file = (os.path.join(args.init_from, "config.json") if args.init_from is not None
                   else args.target_config)
    if config_file is None:
        return None
    from growlib.train.sizes import config_family

    try:
        return config_family(config_file, "--init-from" if args.init_from is not None else "--target-config")
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None


def _experiment(args):
    """The Experiment the flags describe; every value checked here, before any data or model exists."""
    from growlib.train.experiment import Experiment
    from growlib.train.config import TrainConfig

    try:
        config = TrainConfig(lr=args.lr, warmup_steps=args.warmup, lr_schedule=args.lr_schedule,
                             batch_size=args.batch_size, seq_len=args.seq_len,
                             eval_every=args.eval_every, eval_batches=args.eval_batches,
                             on_nonfinite=args.on_nonfinite)
        starts_elsewhere = args.init_from is not None or args.target_config is not None
        return Experiment(family=args.model or _checkpoint_family(args) or "gpt2",
                          size=args.size or (None if starts_elsewhere else "tiny"), total_steps=_budget_steps(args),
                          config=config, init_from=args.init_from, tokenizer=args.tokenizer,
                          target_config=args.target_config,
                          data=args.data, vocab_size=args.vocab_size, bin_dtype=args.bin_dtype)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(_as_flags(str(error))) from error


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _tuning(args, seeds: list[int]):
    """The compare command's tuning protocol, checked before any data is prepared."""
    from growlib.train.tuning import Tuning

    try:
        grid = [float(item) for item in args.lr_grid.split(",")]
    except ValueError:
        raise UsageError(f"--lr-grid expects comma-separated numbers, got {args.lr_grid!r}") from None
    tune_seeds = _int_list("--tune-seeds", args.tune_seeds)
    try:
        tuning = Tuning(lr_grid=tuple(grid), seeds=tuple(tune_seeds), fraction=args.tune_fraction,
                        extend=args.lr_grid_extend)
        tuning.check_disjoint(seeds)
    except ValueError as error:
        raise UsageError(f"--lr-grid / --lr-grid-extend / --tune-seeds / --tune-fraction: {error}") from None
    return tuning


def _set_threads(requested: int | None) -> None:
    """torch's CPU threads: ``--threads``, else torch's default ($OMP_NUM_THREADS, or every core), which is the
    fastest on an idle machine; but on a busy one, threads competing for cores made training 7-10x slower
    (2 cores), so a run that starts on a busy machine says so, once, with the flag that helps."""
    if requested is not None and requested < 1:
        raise UsageError(f"--threads must be >= 1, got {requested}")
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
        return
    cpus, load, threads = os.cpu_count() or 1, os.getloadavg()[0], torch.get_num_threads()
    if threads > 1 and load >= cpus / 2 + 0.5:  # our own previous command may leave up to ~1 in the average
        print(f"growlib: the machine is busy (load {load:.1f} on {cpus} CPUs) and torch uses {threads} threads; "
              f"if training is slow, --threads {max(1, round(cpus - load))} may be several times faster",
              file=sys.stderr)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (it may have been replaced since, e.g. by a
    test's capture), not to the stream it found when it was made."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _show_progress_logs() -> None:
    """Data preparation and LiGO's fit report to the ``growlib`` loggers; the command line prints them."""
    logger = logging.getLogger("growlib")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _progress(args):
    """The per-run progress callback factory: a bar on a terminal, a line every --progress-every s elsewhere."""
    from growlib.train.progress import StepProgress

    if not args.progress_every >= 0:
        raise UsageError(f"--progress-every must be a number of seconds >= 0, got {args.progress_every}")
    return lambda label: StepProgress(label, interval_s=args.progress_every)


def _distributed_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: ``GROWLIB_DIST_TIMEOUT_S`` seconds, 10 minutes if unset."""
    value = os.environ.get("GROWLIB_DIST_TIMEOUT_S")
    if value is None:
        return datetime.timedelta(minutes=10)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UsageError(f"GROWLIB_DIST_TIMEOUT_S must be a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def _init_distributed(with_deepspeed: bool) -> str | None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on the CPU, with a timeout
    (``GROWLIB_DIST_TIMEOUT_S``, default 10 minutes) so a rank that dies or stalls makes the others fail
    instead of hang; through DeepSpeed's communication layer when training with DeepSpeed.  Returns this
    rank's device, if distributed."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not with_deepspeed:
        return None
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend, timeout = ("nccl" if on_gpu else "gloo"), _distributed_timeout()
    if with_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        torch.distributed.init_process_group(backend, timeout=timeout)
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if on_gpu else "cpu"


def _deepspeed_config(path: str | None, experiment) -> dict | None:
    """The --deepspeed JSON, read and checked against growlib's settings before anything is built."""
    if path is None:
        return None
    from growlib.train.distributed import deepspeed_config

    try:
        with open(path) as f:
            config = json.load(f)
        deepspeed_config(config, experiment.config)
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--deepspeed: cannot read a JSON config from {path!r}: {error}") from None
    except (TypeError, ValueError) as error:
        raise UsageError(f"--deepspeed {path}: {error}") from None
    return config


def _schedule_options(schedule: str, pairs: list[str]) -> dict:
    from growlib.schedules import parse_options

    try:
        return parse_options(schedule, pairs)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_schedule(args, experiment, steps: int, options: dict) -> None:
    """Build the schedule's stages now: an option out of range, or a budget too small for the schedule, fails
    here, naming --schedule-args or the budget's flag; a checkpoint (--init-from) that does not fit the first
    stage fails too."""
    from growlib.schedules import build_schedule
    from growlib.train.experiment import build_stages, check_start, full_layers

    layers = full_layers(experiment)
    try:
        build_schedule(args.schedule, steps, layers, **options)
    except ValueError as error:
        budget = f"--tokens {args.tokens} ({steps} steps)" if args.tokens is not None else f"--steps {steps}"
        try:
            build_schedule(args.schedule, steps, layers)
        except ValueError:
            raise UsageError(f"--schedule {args.schedule} with {budget}: {error}") from None
        raise UsageError(f"--schedule-args {' '.join(args.schedule_args)}: {error}") from None
    check_start(experiment, build_stages(experiment, args.schedule, steps, options))


#: Exit status of a run stopped by SIGINT / SIGTERM (128 + SIGINT, as shells report Ctrl-C).
EXIT_INTERRUPTED = 130
#: Exit status of a command refused for its arguments (argparse's own).
EXIT_USAGE = 2


@contextlib.contextmanager
def _exit_on_fault(command: str, debug: bool):
    """A numerical fault, diverging ranks, a run folder that cannot be used as asked, a checkpoint that cannot be
    written (disk full), schedules of a comparison that failed, or a failed collective (another rank died, or
    stalled longer than the process group's timeout) end the command with one line and exit status 1; SIGINT /
    SIGTERM with one line saying where --resume continues, and status 130.  ``debug``: the traceback instead."""
    if debug:
        yield
        return
    import torch

    from growlib.train.experiment import ScheduleFailures
    from growlib.train.checkpoint import CheckpointWriteError
    from growlib.train.distributed import RankDivergenceError
    from growlib.train.loop import RunInterrupted
    from growlib.train.runs import RunFolderError

    try:
        yield
    except (FloatingPointError, RankDivergenceError) as error:
        raise SystemExit(f"growlib {command}: {type(error).__name__}: {error}") from error
    except RunFolderError as error:
        raise SystemExit(f"growlib {command}: {error}") from error
    except CheckpointWriteError as error:  # an OSError: its strerror is the message, without "[Errno 28]"
        raise SystemExit(f"growlib {command}: {error.strerror}") from error
    except ScheduleFailures as error:
        if error.table:
            print(error.table)
        raise SystemExit(f"growlib {command}: {error}") from error
    except RunInterrupted as error:
        print(f"growlib {command}: interrupted by {error}"
              + ("; the same compare command resumes the comparison" if command == "compare" else ""),
              file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        print(f"growlib {command}: interrupted; nothing after the last checkpoint was kept"
              + (" (the same command resumes the comparison)" if command == "compare" else
                 " (--resume continues from it)"), file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except RuntimeError as error:
        dist = torch.distributed
        if not (dist.is_initialized() and dist.get_world_size() > 1
                and (isinstance(error, getattr(dist, "DistError", ())) or "gloo" in str(error))):
            raise
        raise SystemExit(f"growlib {command}: rank {dist.get_rank()} of {dist.get_world_size()}: a collective "
                         f"operation failed, so another rank died or stalled for longer than the timeout "
                         f"({_distributed_timeout().total_seconds():g} s, GROWLIB_DIST_TIMEOUT_S); see the other "
                         f"ranks' output.  {type(error).__name__}: {error}") from error


def check_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    """check-kernels' options (growlib.kernels.check's own parser has the same)."""
    parser.add_argument("--quick", action="store_true",
                        help="one awkward shape per kernel, epilogue and dtype instead of all of them")
    parser.add_argument("--kernel", action="append", choices=names.KERNEL_OPS, metavar="OP",
                        help=f"check only this op (repeatable): {', '.join(names.KERNEL_OPS)}")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: every command, its options, their help and defaults."""
    parser = argparse.ArgumentParser(prog="growlib", description=__doc__)
    parser.add_argument("--version", action="version", version=f"growlib {growlib.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults_shown = {"formatter_class": _HelpWithDefaults}
    demo_parser = commands.add_parser("demo", help="coalesce / de-coalesce / grow a real HF model class",
                                      **defaults_shown)
    demo_parser.add_argument("--model", choices=DEMO_FAMILIES, default="gpt2",
                             help="the model class shown (randomly initialised at its real size)")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    _debug_argument(demo_parser)
    train_parser = commands.add_parser("train", help="train one schedule", **defaults_shown)
    _experiment_arguments(train_parser)
    train_parser.add_argument("--schedule", choices=names.SCHEDULE_NAMES, default="baseline",
                              help="the growth or multi-level method to train with (baseline: from scratch)")
    train_parser.add_argument("--schedule-args", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                              help="the schedule's options (alpha=0.25 levels=3 layer_counts=1,2,4 "
                                   "frozen_forward=true); `growlib schedules` lists them")
    train_parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    train_parser.add_argument("--resume", action="store_true",
                              help="continue the run in OUT/<schedule>-seed<seed> from its checkpoint; refused if "
                                   "any setting differs from the run's")
    train_parser.add_argument("--overwrite", action="store_true",
                              help="delete the run already in OUT/<schedule>-seed<seed> and start over (without it, "
                                   "starting where a run lies is refused)")
    train_parser.add_argument("--checkpoint-every", type=int, default=None,
                              help="optimizer steps between checkpoints (default 50)")
    train_parser.add_argument("--deepspeed", default=None, metavar="CONFIG.json",
                              help="train through DeepSpeed (ZeRO stage 0-3) with this config; launch with torchrun")
    train_parser.add_argument("--fsdp", action="store_true",
                              help="shard every stage's model, gradients and optimizer state across the torchrun "
                                   "processes (FSDP2); each rank writes its shards to the checkpoint")
    train_parser.add_argument("--fsdp-transitions", choices=("shard-local", "gather"), default="shard-local",
                              help="with --fsdp: shard-local builds each rank's shard of the new model where the "
                                   "transition allows (the V-cycle's, ODE's, stacking's, MSG's and MSLT's without "
                                   "its fused frozen stack, under the reset optimizer policy) and gathers the model "
                                   "whole for the others; gather always gathers it. Same models, different memory")
    _debug_argument(train_parser)
    compare_parser = commands.add_parser("compare", help="every schedule against the baseline, same budget",
                                         **defaults_shown)
    _experiment_arguments(compare_parser)
    compare_parser.add_argument("--schedules", default=",".join(names.SCHEDULE_NAMES),
                                help="comma-separated schedules to compare (the baseline is always added)")
    compare_parser.add_argument("--seeds", default="0,1,2", help="the reported seeds, comma-separated")
    compare_parser.add_argument("--budget", choices=("flops", "steps"), default="flops",
                                help="give every schedule the baseline's FLOPs or its steps")
    compare_parser.add_argument("--lr-grid", default=",".join(f"{m:g}" for m in DEFAULT_LR_GRID),
                                help="multipliers of --lr every schedule (the baseline too) is tuned over, the "
                                     "same for each; each is then compared at its best")
    compare_parser.add_argument("--tune-seeds", default=",".join(map(str, DEFAULT_TUNE_SEEDS)),
                                help="seeds the tuning runs train on; never one of --seeds")
    compare_parser.add_argument("--lr-grid-extend", type=int, default=DEFAULT_EXTEND,
                                help="multipliers a sweep may add past an edge of --lr-grid that wins (0: none)")
    compare_parser.add_argument("--tune-fraction", type=float, default=1.0,
                                help="share of each schedule's budget a tuning run trains, its warmup scaled "
                                     "alike (1: the full budget)")
    compare_parser.add_argument("--no-tune", action="store_true",
                                help="every schedule at --lr, untuned (the tables say so)")
    compare_parser.add_argument("--overwrite", action="store_true",
                                help="train every run again, deleting what OUT holds of earlier ones (without it, "
                                     "the same command resumes: finished runs are kept, interrupted ones resume)")
    compare_parser.add_argument("--checkpoint-every", type=int, default=50,
                                help="optimizer steps between each run's checkpoints (0: only the final one)")
    _debug_argument(compare_parser)
    schedules_parser = commands.add_parser("schedules", help="every schedule's options: type, default, meaning")
    schedules_parser.add_argument("name", nargs="?", choices=names.SCHEDULE_NAMES,
                                  help="only this schedule (default: all)")
    _debug_argument(schedules_parser)
    check_parser = commands.add_parser("check-kernels", help="every Triton kernel against its PyTorch reference "
                                       "on this machine (CUDA, else the CPU through Triton's interpreter)")
    check_kernels_arguments(check_parser)
    _debug_argument(check_parser)
    grow_parser = commands.add_parser("grow", help="grow a saved HF model into a larger one, saved the same way",
                                      **defaults_shown)
    grow_arguments(grow_parser)
    _debug_argument(grow_parser)
    return parser


def grow_arguments(parser: argparse.ArgumentParser) -> None:
    """grow's arguments: the folders, the target sizes (each defaults to the source's) and the methods."""
    parser.add_argument("src", metavar="SRC", help="a save_pretrained folder of a supported model")
    parser.add_argument("out", metavar="OUT", help="the folder to write the grown model to (must not exist)")
    for flag, what in (("layers", "layers"), ("hidden", "hidden size"), ("intermediate", "MLP width"),
                       ("heads", "attention heads (the head size is kept)")):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"the grown model's {what} (default: SRC's)")
    parser.add_argument("--depth-method", choices=names.DEPTH_METHODS, default="stack",
                        help="how new layers are made: stack (StackBERT / G_stack), interleave, copy_top (MSLT)")
    parser.add_argument("--width-method", choices=names.WIDTH_METHODS, default="hypercloning",
                        help="how new units are made (hypercloning preserves the function)")
    parser.add_argument("--ligo-steps", type=int, default=0,
                        help="fit LiGO for this many steps on --data instead (both methods as its initialisation)")
    parser.add_argument("--data", default=None,
                        help="text (file, folder or hf:NAME[:CONFIG]) to fit LiGO on and to measure function "
                             "preservation on (default: random tokens)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (fit and check)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (fit and check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random copies, LiGO and the check batch")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--stream", action="store_true",
                        help="grow from SRC's safetensors files to OUT's one parameter at a time, never holding "
                             "either model (for checkpoints larger than memory; no LiGO, no function check)")
    parser.add_argument("--max-shard-mb", type=int, default=None,
                        help="with --stream: the most megabytes per output safetensors file (default 5000)")


def describe_schedules(only: str | None = None) -> str:
    """``growlib schedules``: each schedule's options as its builder declares them."""
    from growlib.schedules import SCHEDULES, schedule_options

    blocks = []
    for name in [only] if only else SCHEDULES:
        first_sentence = re.split(r"(?<=\.)(?:\s{2,}|\n)", inspect.getdoc(SCHEDULES[name]) or "")[0]
        summary = " ".join(first_sentence.split())
        lines = [f"{name}: {summary}"]
        for option in schedule_options(name):
            lines.append(f"  {option.name} ({option.type}, default {option.default!r}): {option.meaning}")
        blocks.append("\n".join(lines if len(lines) > 1 else lines + ["  (no options)"]))
    return "\n\n".join(blocks) + "\n\n--schedule-args KEY=VALUE ...: booleans true/false, lists 1,2,4 or [1,2,4], none"


def _train(args) -> int:
    import torch

    from growlib.train.experiment import require_engine_supports, run as run_experiment

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run in the "
                         "folder, --overwrite deletes it and starts over")
    experiment = _experiment(args)
    options = _schedule_options(args.schedule, args.schedule_args)
    _check_schedule(args, experiment, experiment.total_steps, dict(options))
    deepspeed = _deepspeed_config(args.deepspeed, experiment)
    require_engine_supports(args.schedule, dict(options), deepspeed, args.fsdp)  # before any data is read
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise UsageError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N")
    if args.fsdp_transitions != "shard-local" and not args.fsdp:
        raise UsageError(f"--fsdp-transitions {args.fsdp_transitions} chooses how FSDP2 runs make transitions: "
                         "add --fsdp")
    checkpoint_every = 50 if args.checkpoint_every is None else args.checkpoint_every
    progress = _progress(args)
    experiment.device = _init_distributed(deepspeed is not None) or experiment.device
    with _exit_on_fault("train", args.debug):
        result = run_experiment(experiment, args.schedule, args.seed, options, out_dir=args.out, resume=args.resume,
                                checkpoint_every=checkpoint_every, progress=progress(f"{args.schedule} seed {args.seed}"),
                                deepspeed=deepspeed, overwrite=args.overwrite, fsdp=args.fsdp,
                                fsdp_transitions=args.fsdp_transitions)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"{args.schedule}: {result.steps} steps, {result.flops:.3g} FLOPs, {result.wall_seconds:.1f} s, "
              f"final validation loss {result.final_val_loss:.4f}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _compare(args) -> int:
    from growlib.train.experiment import compare

    seeds = _int_list("--seeds", args.seeds)
    schedules = args.schedules.split(",")
    unknown = [name for name in schedules if name not in names.SCHEDULE_NAMES]
    if unknown:
        raise UsageError(f"--schedules: unknown {unknown}; choose from {', '.join(names.SCHEDULE_NAMES)}")
    tuning = None if args.no_tune else _tuning(args, seeds)
    experiment = _experiment(args)
    progress = _progress(args)
    with _exit_on_fault("compare", args.debug):
        table = compare(experiment, schedules, seeds, args.out, budget=args.budget, tuning=tuning,
                        overwrite=args.overwrite, checkpoint_every=args.checkpoint_every, progress=progress)
    print(table)
    return 0


def _grow(args) -> int:
    from growlib.grow import grow_checkpoint

    if args.max_shard_mb is not None and not args.stream:
        raise UsageError("--max-shard-mb sizes the files --stream writes: add --stream, or drop it")
    max_shard_mb = 5000 if args.max_shard_mb is None else args.max_shard_mb
    if max_shard_mb < 1:
        raise UsageError(f"--max-shard-mb must be >= 1, got {max_shard_mb}")
    _show_progress_logs()
    try:
        grow_checkpoint(args.src, args.out, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                        heads=args.heads, depth_method=args.depth_method, width_method=args.width_method,
                        ligo_steps=args.ligo_steps, data=args.data, batch_size=args.batch_size,
                        seq_len=args.seq_len, seed=args.seed, overwrite=args.overwrite, stream=args.stream,
                        max_shard_bytes=max_shard_mb * 10**6)
    except (ValueError, TypeError) as error:  # a size the operators refuse (e.g. heads that do not divide)
        raise UsageError(str(error)) from error
    return 0


def _dispatch(args) -> int:
    if args.command == "demo":
        return demo(args.model, args.seed)
    if args.command == "schedules":
        print(describe_schedules(args.name))
        return 0
    if args.command == "grow":
        return _grow(args)
    if args.command == "check-kernels":
        from growlib.kernels import check as kernel_check

        return kernel_check.main((["--quick"] if args.quick else [])
                                 + [option for op in args.kernel or () for option in ("--kernel", op)])
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0 (0: only the final checkpoint), got {args.checkpoint_every}")
    _set_threads(args.threads)
    _show_progress_logs()
    return _train(args) if args.command == "train" else _compare(args)


def main(argv: list[str] | None = None) -> int:
    """Parse, check every flag, run.  A flag that cannot work ends the command with one line naming it and exit
    status 2 (``--debug``: the traceback); faults while training with one line and status 1 (_exit_on_fault);
    anything else (a bug) with its traceback."""
    from growlib.errors import InputError

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (UsageError, InputError) as error:
        if args.debug:
            raise
        print(f"growlib {args.command}: error: {_as_flags(str(error))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
