"""One experiment = a model family and size, a data source, a token budget and a schedule; ``compare`` runs
several schedules and seeds on the same budget and data and summarises them against the baseline."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from growlib.apply import counting_map_flops
from growlib.schedules import SCHEDULES, build_schedule
from growlib.train import data as D
from growlib.train.compare import plot_curves, summarize, write_summary
from growlib.train.flops import step_flops
from growlib.train.loop import MetricsLog, RunResult, RunState, TrainConfig, rank_and_world, run_schedule
from growlib.train.sizes import FAMILIES, build_model, parse_size

DEFAULT_CACHE = os.environ.get("GROWLIB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "growlib"))


@dataclass
class Experiment:
    """What every schedule of a comparison shares.  ``data`` is None for the embedded corpus (the Python
    standard library's sources), a text file or folder, or a pre-tokenized ``.bin`` file (``vocab_size`` then
    gives its vocabulary)."""

    family: str = "gpt2"
    size: str | dict = "tiny"
    total_steps: int = 300
    config: TrainConfig = field(default_factory=TrainConfig)
    data: str | None = None
    vocab_size: int = 2048
    cache_dir: str = DEFAULT_CACHE
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Experiment.family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("total_steps", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Experiment.{name} must be an int >= 1, got {value!r}")
        parse_size(self.size)
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"Experiment.config must be a growlib TrainConfig, got {type(self.config).__name__}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"Experiment.device must name a torch device ('cpu', 'cuda', 'cuda:1'), got "
                             f"{self.device!r}") from error
        if self.data is not None and self.family != "vit" and not os.path.exists(self.data):
            raise FileNotFoundError(f"Experiment.data: no such file or folder: {self.data!r}")


@dataclass
class PreparedData:
    """Token streams for the language models, or (images, labels) pairs for ViT."""

    train: D.TokenData | tuple[torch.Tensor, torch.Tensor]
    validation: D.TokenData | tuple[torch.Tensor, torch.Tensor]
    tokenizer: object
    vocab_size: int


def prepare_data(exp: Experiment) -> PreparedData:
    """Tokenize the experiment's data once (the BPE tokenizer is cached on disk); ViT gets the digits."""
    if exp.family == "vit":
        if exp.data is not None:
            raise ValueError(f"data: ViT trains on the embedded digits images; got data={exp.data!r}")
        train_images, train_labels, val_images, val_labels = D.digits_images()
        return PreparedData((train_images, train_labels), (val_images, val_labels), None, 0)
    if exp.data is not None and exp.data.endswith(".bin"):
        if exp.family == "bert":
            raise ValueError("data: a pre-tokenized .bin file has no tokenizer to mask with; BERT needs text data")
        ids = D.TokenData.from_bin(exp.data).ids
        if int(ids.max()) >= exp.vocab_size:
            raise ValueError(f"vocab_size={exp.vocab_size} is too small for {exp.data}, whose largest token id is "
                             f"{int(ids.max())}")
        cut = len(ids) * 9 // 10
        return PreparedData(D.TokenData(ids[:cut]), D.TokenData(ids[cut:]), None, exp.vocab_size)
    train_texts, val_texts = D.stdlib_corpus() if exp.data is None else D.load_text_source(exp.data)
    tokenizer = D.train_bpe(train_texts, exp.vocab_size, exp.cache_dir)
    return PreparedData(D.TokenData.from_texts(train_texts, tokenizer), D.TokenData.from_texts(val_texts, tokenizer),
                        tokenizer, tokenizer.vocab_size)


def _batches(exp: Experiment, prepared: PreparedData, seed: int) -> tuple[Callable[[int], dict], list[dict]]:
    """Training batches by step (each rank of a distributed run draws its own: step * world + rank) and the
    fixed validation batches."""
    cfg, device = exp.config, torch.device(exp.device)
    rank, world = rank_and_world()

    def to_device(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items()}

    if exp.family == "vit":
        def train_batch(step):
            return to_device(D.image_batch(*prepared.train, step * world + rank, cfg.batch_size, seed))
        evals = D.image_validation_batches(*prepared.validation, cfg.batch_size, cfg.eval_batches)
    elif exp.family == "bert":
        def train_batch(step):
            return to_device(D.mlm_batch(prepared.train, step * world + rank, cfg.batch_size, cfg.seq_len, seed,
                                         prepared.tokenizer))
        evals = D.mlm_validation_batches(prepared.validation, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                         prepared.tokenizer)
    else:
        def train_batch(step):
            return to_device(D.causal_lm_batch(prepared.train, step * world + rank, cfg.batch_size, cfg.seq_len, seed))
        evals = D.validation_batches(prepared.validation, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    return train_batch, [to_device(b) for b in evals]


def run(exp: Experiment, schedule: str, seed: int = 0, options: dict | None = None,
        prepared: PreparedData | None = None, out_dir: str | None = None, resume: bool = False,
        checkpoint_every: int = 50, progress: Callable[[dict], None] | None = None,
        deepspeed: dict | None = None) -> RunResult:
    """Train ``schedule`` on the experiment; metrics and checkpoints go to ``out_dir`` when given;
    ``deepspeed`` (a DeepSpeed config dict) trains through DeepSpeed engines, without checkpoints."""
    prepared = prepared or prepare_data(exp)
    torch.manual_seed(seed)
    model = build_model(exp.family, exp.size, prepared.vocab_size, exp.config.seq_len).to(exp.device)
    final_layers = model.config.num_hidden_layers
    stages = build_schedule(schedule, exp.total_steps, final_layers, **(options or {}))
    train_batch, eval_batches = _batches(exp, prepared, seed)
    tokens_per_step = exp.config.batch_size * exp.config.grad_accum

    def flops(m):
        return step_flops(m, tokens_per_step, _seq_len(exp)).total

    run_dir = os.path.join(out_dir, f"{schedule}-seed{seed}") if out_dir else None
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        if not resume and rank_and_world()[0] == 0:  # a fresh run: nothing of an earlier one may be resumed
            for stale in ("metrics.jsonl", "checkpoint.pt"):
                if os.path.exists(os.path.join(run_dir, stale)):
                    os.remove(os.path.join(run_dir, stale))
    return run_schedule(stages, RunState(model), exp.config, train_batch=train_batch, eval_batches=eval_batches,
                        step_flops=flops, metrics=MetricsLog(os.path.join(run_dir, "metrics.jsonl") if run_dir else None),
                        checkpoint_path=os.path.join(run_dir, "checkpoint.pt") if run_dir else None,
                        checkpoint_every=checkpoint_every if run_dir else 0, resume=resume, schedule_name=schedule,
                        progress=progress, deepspeed=deepspeed,
                        tokens_per_sample=step_flops(model, 1, _seq_len(exp)).seq_len)


def _seq_len(exp: Experiment) -> int | None:
    """The sequence length FLOPs are counted at: ViT's is fixed by its patches (None: from the config)."""
    return None if exp.family == "vit" else exp.config.seq_len


BUDGETS = ("steps", "flops")


def schedule_flops(exp: Experiment, schedule: str, total_steps: int, options: dict | None,
                   vocab_size: int) -> float:
    """The FLOPs a schedule will spend, found by walking its stages (transitions on untrained weights,
    freezing applied) without training: FLOPs per step depend only on each stage's shapes and frozen parts;
    the transitions' maps (and any work they report, such as fitting LiGO) are added."""
    torch.manual_seed(0)
    model = build_model(exp.family, exp.size, vocab_size, exp.config.seq_len).to(exp.device)
    stages = build_schedule(schedule, total_steps, model.config.num_hidden_layers, **(options or {}))
    state, total = RunState(model, dry_run=True), 0.0
    tokens_per_step = exp.config.batch_size * exp.config.grad_accum
    state.micro_batch_flops = lambda m: step_flops(m, exp.config.batch_size, _seq_len(exp)).total
    for stage in stages:
        if stage.freeze is None:
            for p in state.model.parameters():
                p.requires_grad_(True)
        with counting_map_flops() as maps:
            transition = stage.enter(state)
        state.model = transition.model
        if stage.freeze:
            stage.freeze(state.model)
        total += maps.flops + transition.flops
        total += stage.steps * step_flops(state.model, tokens_per_step, _seq_len(exp)).total
    return total


def compare(exp: Experiment, schedules: list[str], seeds: list[int], out_dir: str,
            options: dict[str, dict] | None = None, budget: str = "flops",
            log: Callable[[str], None] = print) -> str:
    """Run every schedule with every seed on the same data; write summary.md / summary.csv and the loss
    curves; return the markdown table.

    ``budget='steps'`` gives every schedule the baseline's ``total_steps`` (the same tokens);
    ``budget='flops'`` stretches each schedule's steps so it spends the baseline's FLOPs, which is how
    compute saved is measured: the FLOPs each method needs to reach the baseline's final loss."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    unknown = [name for name in schedules if name not in SCHEDULES]
    if not schedules or unknown:
        raise ValueError(f"schedules must be a non-empty list of {sorted(SCHEDULES)}, got {list(schedules)!r}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    if "baseline" not in schedules:
        schedules = ["baseline"] + list(schedules)
    prepared = prepare_data(exp)
    baseline_flops = schedule_flops(exp, "baseline", exp.total_steps, None, prepared.vocab_size)
    results: dict[str, list[RunResult]] = {}
    for name in schedules:
        steps = exp.total_steps
        if budget == "flops" and name != "baseline":
            own = schedule_flops(exp, name, exp.total_steps, (options or {}).get(name), prepared.vocab_size)
            steps = round(exp.total_steps * baseline_flops / own)
        for seed in seeds:
            stretched = Experiment(**{**exp.__dict__, "total_steps": steps})
            result = run(stretched, name, seed, (options or {}).get(name), prepared, out_dir)
            log(f"{name:>15} seed {seed}: {result.steps} steps, val loss {result.final_val_loss:.3f}, {result.flops:.3g} FLOPs, "
                f"{result.wall_seconds:.1f} s")
            results.setdefault(name, []).append(result)
    header = (f"{exp.family} {exp.size}, baseline {exp.total_steps} steps x {exp.config.batch_size} x "
              f"{exp.config.seq_len} tokens, budget: same {budget}, seeds {seeds}, data {exp.data or 'python stdlib'}")
    table = write_summary(summarize(results), out_dir, header)
    try:
        plot_curves(results, out_dir)
    except ImportError:
        log("matplotlib is not installed: skipping loss_vs_flops.png / loss_vs_time.png (pip install matplotlib)")
    return table
