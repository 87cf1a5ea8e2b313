"""Command line: ``growlib demo`` (the operators on real HF model classes), ``growlib train`` (one schedule),
``growlib compare`` (every schedule against training from scratch on the same budget), ``growlib check-kernels``
(every Triton kernel against its PyTorch reference on this machine; see growlib/kernel_check.py)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch
import transformers as T

import growlib
from growlib import kernel_check
from growlib.schedules import SCHEDULES
from growlib.train.experiment import Experiment, ScheduleFailures, compare
from growlib.train.experiment import run as run_experiment
from growlib.train.loop import CheckpointWriteError, RankDivergenceError, RunInterrupted, TrainConfig
from growlib.train.runs import RunFolderError
from growlib.train.sizes import FAMILIES
from growlib.train.tuning import DEFAULT_EXTEND, DEFAULT_LR_GRID, DEFAULT_TUNE_SEEDS, Tuning

DEMO_CONFIGS = {
    # GPT-2 small's real shape (124M parameters), randomly initialised: no download needed.
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=768, n_layer=12, n_head=12)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                                      num_hidden_layers=8, num_attention_heads=8,
                                                      num_key_value_heads=4)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(num_hidden_layers=12)),
}


def _millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def _shape(model: torch.nn.Module) -> str:
    dims = growlib.schema_of(model).dims
    return (f"{dims['layers']} layers, hidden {dims['model']}, {dims['heads']} heads "
            f"({dims['kv_heads']} kv) x {dims['head_dim']}, ffn {dims['ffn']}")


def _relative_logit_error(a: torch.nn.Module, b: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        la, lb = a(input_ids=tokens).logits.double(), b(input_ids=tokens).logits.double()
    return float((la - lb).abs().max() / lb.abs().max())


def _timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"  {label:<58} {time.perf_counter() - start:6.2f} s")
    return result


def demo(family: str, seed: int) -> int:
    torch.manual_seed(seed)
    print(f"growlib {growlib.__version__} demo on {family} (backend {growlib.current_backend()}, "
          f"torch {torch.__version__})")
    model = DEMO_CONFIGS[family]().eval()
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
    print("(times include building each new HF model, which dominates on the CPU)")
    return 0 if exact and max(decoalesce_error, cloning_error) < 1e-5 else 1


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=FAMILIES, default="gpt2", help="model family (HF class it trains)")
    parser.add_argument("--size", default="tiny",
                        help="tiny | small | base, or JSON (inline or a file) with layers, hidden, heads, "
                             "intermediate and, for llama, kv_heads")
    parser.add_argument("--data", default=None,
                        help="a text file or folder, or a .bin file of token ids (default: Python's own stdlib "
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
    parser.add_argument("--out", required=True,
                        help="results folder: each run writes OUT/<schedule>-seed<seed>/ (run.json, metrics.jsonl, "
                             "checkpoint.pt); compare adds summary.md/csv, tuning.md/csv, plots and OUT/tuning/")


def _budget_steps(args) -> int:
    """Optimizer steps from --steps, or from --tokens at this run's batch size, length and process count."""
    if args.tokens is None:
        return 300 if args.steps is None else args.steps
    per_step = args.batch_size * args.seq_len * int(os.environ.get("WORLD_SIZE", "1"))
    if args.tokens < per_step:
        raise SystemExit(f"--tokens {args.tokens} is less than one step's {per_step} tokens "
                         f"(batch {args.batch_size} x seq {args.seq_len} x processes)")
    return args.tokens // per_step


def _experiment(args) -> Experiment:
    config = TrainConfig(lr=args.lr, warmup_steps=args.warmup, lr_schedule=args.lr_schedule,
                         batch_size=args.batch_size, seq_len=args.seq_len,
                         eval_every=args.eval_every, eval_batches=args.eval_batches,
                         on_nonfinite=args.on_nonfinite)
    return Experiment(family=args.model, size=args.size, total_steps=_budget_steps(args), config=config, data=args.data,
                      vocab_size=args.vocab_size, bin_dtype=args.bin_dtype)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} expects comma-separated integers, got {text!r}") from None


def _tuning(args, seeds: list[int]) -> Tuning:
    """The compare command's tuning protocol, checked before any data is prepared."""
    try:
        grid = [float(item) for item in args.lr_grid.split(",")]
    except ValueError:
        raise SystemExit(f"--lr-grid expects comma-separated numbers, got {args.lr_grid!r}") from None
    tune_seeds = _int_list("--tune-seeds", args.tune_seeds)
    try:
        tuning = Tuning(lr_grid=tuple(grid), seeds=tuple(tune_seeds), fraction=args.tune_fraction,
                        extend=args.lr_grid_extend)
        tuning.check_disjoint(seeds)
    except ValueError as error:
        raise SystemExit(f"--lr-grid / --lr-grid-extend / --tune-seeds / --tune-fraction: {error}") from None
    return tuning


def _options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs as a dict, values parsed as JSON where they can be (numbers, lists, booleans)."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--schedule-args expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


class ProgressBar:
    """A tqdm bar over optimizer steps showing the stage, loss, tokens/s and FLOPs so far (only on a terminal)."""

    def __init__(self):
        self.bar = None

    def __call__(self, record: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=record["total_steps"], initial=record["step"] - 1, unit="step",
                            disable=not sys.stderr.isatty())
        self.bar.update(1)
        self.bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.3f}",
                             tok_s=f"{record['tokens'] / max(record['wall'], 1e-9):.0f}",
                             flops=f"{record['flops']:.3g}")
        if record["step"] == record["total_steps"]:
            self.bar.close()


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
        raise SystemExit(f"GROWLIB_DIST_TIMEOUT_S must be a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def _init_distributed(with_deepspeed: bool) -> str | None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on the CPU, with a timeout
    (``GROWLIB_DIST_TIMEOUT_S``, default 10 minutes) so a rank that dies or stalls makes the others fail
    instead of hang; through DeepSpeed's communication layer when training with DeepSpeed.  Returns this
    rank's device, if distributed."""
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


def _deepspeed_config(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--deepspeed: cannot read a JSON config from {path!r}: {error}")


#: Exit status of a run stopped by SIGINT / SIGTERM (128 + SIGINT, as shells report Ctrl-C).
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def _exit_on_fault(command: str):
    """A numerical fault, diverging ranks, a run folder that cannot be used as asked, a checkpoint that cannot be
    written (disk full), schedules of a comparison that failed, or a failed collective (another rank died, or
    stalled longer than the process group's timeout) end the command with one line and exit status 1; SIGINT /
    SIGTERM with one line saying where --resume continues, and status 130."""
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


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: every command, its options, their help and defaults."""
    parser = argparse.ArgumentParser(prog="growlib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults_shown = {"formatter_class": _HelpWithDefaults}
    demo_parser = commands.add_parser("demo", help="coalesce / de-coalesce / grow a real HF model class",
                                      **defaults_shown)
    demo_parser.add_argument("--model", choices=sorted(DEMO_CONFIGS), default="gpt2",
                             help="the model class shown (randomly initialised at its real size)")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    train_parser = commands.add_parser("train", help="train one schedule", **defaults_shown)
    _experiment_arguments(train_parser)
    train_parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="baseline",
                              help="the growth or multi-level method to train with (baseline: from scratch)")
    train_parser.add_argument("--schedule-args", nargs="*", default=[], metavar="KEY=VALUE",
                              help="the schedule's options, values as JSON (alpha=0.25 levels=3 "
                                   "layer_counts=[1,2,4] frozen_forward=true)")
    train_parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    train_parser.add_argument("--resume", action="store_true",
                              help="continue the run in OUT/<schedule>-seed<seed> from its checkpoint; refused if "
                                   "any setting differs from the run's")
    train_parser.add_argument("--overwrite", action="store_true",
                              help="delete the run already in OUT/<schedule>-seed<seed> and start over (without it, "
                                   "starting where a run lies is refused)")
    train_parser.add_argument("--checkpoint-every", type=int, default=None,
                              help="optimizer steps between checkpoints (default 50; not with --deepspeed)")
    train_parser.add_argument("--deepspeed", default=None, metavar="CONFIG.json",
                              help="train through DeepSpeed (ZeRO stage 0-2) with this config; launch with torchrun")
    compare_parser = commands.add_parser("compare", help="every schedule against the baseline, same budget",
                                         **defaults_shown)
    _experiment_arguments(compare_parser)
    compare_parser.add_argument("--schedules", default="baseline,vcycle,ode_multilevel,mslt,stack,msg,ligo",
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
    check_parser = commands.add_parser("check-kernels", help="every Triton kernel against its PyTorch reference "
                                       "on this machine (CUDA, else the CPU through Triton's interpreter)")
    kernel_check.add_arguments(check_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return demo(args.model, args.seed)
    if args.command == "check-kernels":
        return kernel_check.main((["--quick"] if args.quick else [])
                                 + [option for op in args.kernel or () for option in ("--kernel", op)])
    if args.command in ("train", "compare") and args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise SystemExit(f"--checkpoint-every must be >= 0 (0: only the final checkpoint), got {args.checkpoint_every}")
    if args.command == "train":
        if args.resume and args.overwrite:
            raise SystemExit("--resume and --overwrite exclude each other: --resume continues the run in the "
                             "folder, --overwrite deletes it and starts over")
        experiment = _experiment(args)
        deepspeed = _deepspeed_config(args.deepspeed)
        if deepspeed is not None and (args.resume or args.checkpoint_every):
            raise SystemExit("--deepspeed runs write no checkpoints (ZeRO partitions the optimizer state): drop "
                             "--resume and --checkpoint-every")
        checkpoint_every = 0 if deepspeed is not None else (50 if args.checkpoint_every is None else args.checkpoint_every)
        experiment.device = _init_distributed(deepspeed is not None) or experiment.device
        with _exit_on_fault("train"):
            result = run_experiment(experiment, args.schedule, args.seed, _options(args.schedule_args),
                                    out_dir=args.out, resume=args.resume, checkpoint_every=checkpoint_every,
                                    progress=ProgressBar(), deepspeed=deepspeed, overwrite=args.overwrite)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"{args.schedule}: {result.steps} steps, {result.flops:.3g} FLOPs, {result.wall_seconds:.1f} s, "
                  f"final validation loss {result.final_val_loss:.4f}")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0
    seeds = _int_list("--seeds", args.seeds)
    tuning = None if args.no_tune else _tuning(args, seeds)
    with _exit_on_fault("compare"):
        table = compare(_experiment(args), args.schedules.split(","), seeds, args.out, budget=args.budget,
                        tuning=tuning, overwrite=args.overwrite, checkpoint_every=args.checkpoint_every)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
