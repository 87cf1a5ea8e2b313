"""One experiment = a model family and size, a data source, a token budget and a schedule; ``compare`` runs
several schedules and seeds on the same budget and data and summarises them against the baseline."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from growlib.errors import InputError
from growlib.schedules import SCHEDULES, build_schedule
from growlib.train import data as D
import growlib
from growlib.train import tuning as T
from growlib.train.compare import plot_curves, summarize, write_summary, write_tuning_table
from growlib.train.export import export_model, export_path, hf_tokenizer
from growlib.train.flops import step_flops
from growlib.train.progress import RunPlan
from growlib.schedules.protocol import RunState
from growlib.train.checkpoint import CHECKPOINT_VERSION
from growlib.train.config import TrainConfig, run_identity_config
from growlib.train.distributed import rank_and_world
from growlib.train.loop import FSDP_TRANSITIONS, planned_flops, run_schedule
from growlib.train.metrics import MetricsLog, RunResult, evaluate
from growlib.train.runs import IDENTITY_FILE, RunFolder, RunFolderError, folder_digest, identity_differences
from growlib.grow import TOKENIZER_FILES, load_pretrained
from growlib.models import adapter_for, adapter_named
from growlib.train.sizes import FAMILIES, build_model, config_family, parse_size
from growlib.validate import is_int, require_int

DEFAULT_CACHE = os.environ.get("GROWLIB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "growlib"))


#: data preparation's progress (growlib.cli shows it; the API stays quiet unless logging is configured)
_data_progress = logging.getLogger("growlib.data")


@dataclass
class Experiment:
    """What every schedule of a comparison shares.  ``data`` is None for the embedded corpus (the Python
    standard library's sources), a text file or folder, or a pre-tokenized ``.bin`` file (``vocab_size`` then
    gives its vocabulary).

    To start from a saved model, ``init_from`` names its ``save_pretrained`` folder (e.g. ``growlib grow``'s
    output): the schedule's first stage starts from its weights -- the small model of a growth schedule, the
    fine model of a multilevel one, the baseline's starting point.  The full model (a growth schedule's target)
    is then the checkpoint's config at ``size`` (None: the checkpoint's own sizes) or ``target_config`` (a
    config.json).  ``tokenizer`` names a folder holding a Hugging Face tokenizer to tokenize the data with and
    save with the run (default: the checkpoint's own with ``init_from``, else a BPE trained on the data).
    ``init_weights`` False builds the full model from the checkpoint's config but trains it from scratch (what
    ``compare``'s baseline does when the checkpoint is a growth schedule's smaller model)."""

    family: str = "gpt2"
    size: str | dict | None = "tiny"
    total_steps: int = 300
    config: TrainConfig = field(default_factory=TrainConfig)
    data: str | None = None
    vocab_size: int = 2048
    #: How a ``.bin`` file stores each token id: "uint16" or "uint32" (little-endian).
    bin_dtype: str = "uint16"
    cache_dir: str = DEFAULT_CACHE
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    init_from: str | None = None
    tokenizer: str | None = None
    target_config: str | None = None
    init_weights: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Experiment.family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("total_steps", "vocab_size"):
            require_int(f"Experiment.{name}", getattr(self, name))
        if self.size is None and self.init_from is None and self.target_config is None:
            raise ValueError("Experiment.size may be None only with init_from or target_config, which give the sizes")
        if self.size is not None and self.target_config is not None:
            raise ValueError("Experiment.size and Experiment.target_config both give the full model: pass one")
        if self.size is not None:
            parse_size(self.size, "Experiment.size")
        for name, config_file in (("init_from", self.init_from and os.path.join(self.init_from, "config.json")),
                                  ("target_config", self.target_config)):
            if config_file is not None and config_family(config_file, f"Experiment.{name}") != self.family:
                raise ValueError(f"Experiment.{name}: {config_file} is a {config_family(config_file, name)} "
                                 f"config, but Experiment.family is {self.family!r}")
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"Experiment.init_weights must be a bool, got {type(self.init_weights).__name__}")
        if self.tokenizer is not None and not os.path.isdir(self.tokenizer):
            raise FileNotFoundError(f"Experiment.tokenizer: no such folder: {self.tokenizer!r}")
        if self.bin_dtype not in D.BIN_DTYPES:
            raise ValueError(f"Experiment.bin_dtype must be one of {tuple(D.BIN_DTYPES)}, got {self.bin_dtype!r}")
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"Experiment.config must be a growlib TrainConfig, got {type(self.config).__name__}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"Experiment.device must name a torch device ('cpu', 'cuda', 'cuda:1'), got "
                             f"{self.device!r}") from error
        if (self.data is not None and self.task != "image_classification" and not D.is_hf_dataset(self.data)
                and not os.path.exists(self.data)):
            raise FileNotFoundError(f"Experiment.data: no such file or folder: {self.data!r}")

    @property
    def task(self) -> str:
        """What the family trains on, as its adapter declares: causal_lm, masked_lm or image_classification."""
        return adapter_named(self.family).task


@dataclass
class PreparedData:
    """Token streams for the language models, or (images, labels) pairs for ViT."""

    train: D.TokenData | tuple[torch.Tensor, torch.Tensor]
    validation: D.TokenData | tuple[torch.Tensor, torch.Tensor]
    tokenizer: object
    vocab_size: int
    #: SHA-256 over both splits as tokenized (growlib.train.data.array_fingerprint): other data, another
    #: tokenizer or another vocabulary gives another fingerprint.
    fingerprint: str = ""

    def __post_init__(self):
        if not self.fingerprint:
            parts = [self.train, self.validation]
            digests = [D.array_fingerprint(t.numpy()) for split in parts if isinstance(split, tuple) for t in split]
            digests += [split.fingerprint() for split in parts if not isinstance(split, tuple)]
            self.fingerprint = hashlib.sha256(" ".join(digests).encode()).hexdigest()


def prepare_data(exp: Experiment) -> PreparedData:
    """Tokenize the experiment's data once (the BPE tokenizer is cached on disk); ViT gets the digits.  Each
    step is reported to the ``growlib.data`` logger (the command line shows it)."""
    started = time.perf_counter()

    def report(message: str) -> None:
        _data_progress.info(f"data: {message} ({time.perf_counter() - started:.1f} s)")

    if exp.task == "image_classification":
        if exp.data is not None:
            raise InputError(f"data: {exp.family} trains on the embedded digits images; got data={exp.data!r}")
        train_images, train_labels, val_images, val_labels = D.digits_images()
        return PreparedData((train_images, train_labels), (val_images, val_labels), None, 0)
    if exp.data is not None and exp.data.endswith(".bin"):
        if exp.task == "masked_lm":
            raise InputError(f"data: a pre-tokenized .bin file has no tokenizer to mask with; {exp.family} (masked "
                             "tokens) needs text data")
        ids = D.TokenData.from_bin(exp.data, exp.bin_dtype).ids
        if int(ids.max()) >= exp.vocab_size:
            raise InputError(f"vocab_size={exp.vocab_size} is too small for {exp.data}, whose largest token id is "
                             f"{int(ids.max())}")
        cut = len(ids) * 9 // 10
        report(f"read {len(ids):,} token ids from {exp.data}")
        return PreparedData(D.TokenData(ids[:cut]), D.TokenData(ids[cut:]), None, exp.vocab_size)
    report(f"reading {exp.data or 'the Python standard library sources'}")
    train_texts, val_texts = D.stdlib_corpus() if exp.data is None else D.load_texts(exp.data)
    tokenizer_folder = tokenizer_source(exp)
    if tokenizer_folder is not None:
        tokenizer = D.HFTokenizer.from_folder(tokenizer_folder)
        report(f"{len(train_texts):,} training and {len(val_texts):,} validation texts; the tokenizer of "
               f"{tokenizer_folder} ({tokenizer.vocab_size} tokens)")
        if exp.task == "masked_lm" and tokenizer.mask_id is None:
            raise InputError(f"tokenizer: the tokenizer of {tokenizer_folder} has no mask token, which "
                             f"{exp.family} (masked tokens) needs")
    else:
        report(f"{len(train_texts):,} training and {len(val_texts):,} validation texts; BPE tokenizer of "
               f"{exp.vocab_size} tokens (trained once, then cached under {exp.cache_dir})")
        tokenizer = D.train_bpe(train_texts, exp.vocab_size, exp.cache_dir)
    report("tokenizing (or reading the token ids cached from an earlier run)")
    train, validation = D.tokenized_splits(train_texts, val_texts, tokenizer, exp.cache_dir)
    report(f"{len(train.ids):,} training and {len(validation.ids):,} validation tokens")
    return PreparedData(train, validation, tokenizer, tokenizer.vocab_size)


def tokenizer_source(exp: Experiment) -> str | None:
    """The folder whose Hugging Face tokenizer the data is tokenized with: ``tokenizer``, else the checkpoint's
    own (``init_from``), which must then hold one; None: a BPE trained on the data."""
    if exp.tokenizer is not None:
        return exp.tokenizer
    if exp.init_from is None:
        return None
    if not any(os.path.isfile(os.path.join(exp.init_from, name)) for name in TOKENIZER_FILES):
        raise InputError(f"init_from: {exp.init_from} holds no tokenizer, and its vocabulary is some tokenizer's: "
                         "pass --tokenizer DIR, the folder of the tokenizer it was trained with")
    return exp.init_from


def _size_dims(size: dict, dims: dict) -> dict:
    """``dims`` with the role sizes a ``size`` dict gives (head size: hidden / heads)."""
    heads = size["heads"]
    return {**dims, "layers": size["layers"], "model": size["hidden"], "ffn": size["intermediate"], "heads": heads,
            "kv_heads": size.get("kv_heads", heads), "head_dim": size["hidden"] // heads}


def full_model(exp: Experiment, vocab_size: int) -> torch.nn.Module:
    """The model the schedule trains at full size (a growth schedule's target), freshly initialised on
    ``exp.device``: the size's model of the family, or the checkpoint's config at ``size`` (its own sizes when
    None), or ``target_config``'s model."""
    adapter = adapter_named(exp.family)
    config = _full_config(exp)
    if config is None:
        return build_model(exp.family, exp.size, vocab_size, exp.config.seq_len).to(exp.device)
    return adapter.finish(adapter.model_class()(config)).to(exp.device)


def _full_config(exp: Experiment):
    """The full model's config when a checkpoint or a config file gives it (None: ``size`` with growlib's own)."""
    from transformers import AutoConfig

    if exp.target_config is not None:
        with open(exp.target_config) as f:
            return AutoConfig.for_model(**json.load(f))
    if exp.init_from is None:
        return None
    config = AutoConfig.from_pretrained(exp.init_from)
    if exp.size is not None:
        adapter = adapter_named(exp.family)
        config = adapter.config_at(config, _size_dims(parse_size(exp.size), adapter.dims(config)))
    return config


def full_layers(exp: Experiment) -> int:
    """The full model's layer count, without building it (the schedules are built, and checked, first)."""
    if exp.size is not None:
        return parse_size(exp.size)["layers"]
    return adapter_named(exp.family).dims(_full_config(exp))["layers"]


def starting_from(stages: list, folder: str) -> list:
    """``stages`` with the first one's model given the weights saved in ``folder`` when it is entered (a dry run
    checks the sizes only); InputError naming the sizes that differ from that stage's model."""
    first = stages[0]

    def enter(state: RunState):
        transition = first.enter(state)
        _require_same_sizes(folder, transition.model, first.name)
        if not state.dry_run:
            source, _ = load_pretrained(folder)
            transition.model.load_state_dict(source.state_dict())
        return transition

    return [dataclasses.replace(first, enter=enter), *stages[1:]]


def _require_same_sizes(folder: str, model: torch.nn.Module, stage: str) -> None:
    from transformers import AutoConfig

    adapter = adapter_for(model)
    want, have = adapter.dims(AutoConfig.from_pretrained(folder)), adapter.dims(model.config)
    differ = [f"{role} {want[role]} there, {have.get(role)} here" for role in want if want[role] != have.get(role)]
    if differ:
        raise InputError(f"init_from: the model in {folder} does not fit the schedule's first stage ({stage!r}): "
                         f"{'; '.join(differ)}.  Choose the full size and the schedule's options so that its first "
                         "stage has the checkpoint's sizes (`growlib schedules` lists the options)")


def check_start(exp: Experiment, stages: list) -> None:
    """With ``init_from``, check before any data is read that the checkpoint fits the first stage: the stage is
    entered on a full model built on the meta device (no memory, no weights)."""
    if exp.init_from is None or not exp.init_weights:
        return
    with torch.device("meta"):
        model = full_model(dataclasses.replace(exp, device="meta"), exp.vocab_size)
    stages[0].enter(RunState(model, dry_run=True))


def require_vocabulary_fits(model: torch.nn.Module, prepared: PreparedData) -> None:
    """The data's token ids must index the model's embedding, and a model that knows a pad id (BERT's attention,
    RoBERTa's positions, which count from it) must know the tokenizer's: refuse a tokenizer and a model that
    disagree."""
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and prepared.vocab_size > vocab:
        raise InputError(f"the data's tokenizer has {prepared.vocab_size} tokens, but the model's vocabulary holds "
                         f"{vocab}: the checkpoint, the tokenizer and the data must share one vocabulary "
                         "(--tokenizer: the checkpoint's own)")
    model_pad, tokenizer = getattr(model.config, "pad_token_id", None), prepared.tokenizer
    tokenizer_pad = tokenizer.hf.pad_token_id if isinstance(tokenizer, D.HFTokenizer) else None
    if model_pad is not None and tokenizer_pad is not None and model_pad != tokenizer_pad:
        raise InputError(f"the tokenizer pads with id {tokenizer_pad}, but the {type(model).__name__} is built for "
                         f"pad id {model_pad}: start from a checkpoint made with this tokenizer (--init-from), or "
                         "use a tokenizer whose pad id is the model's")


def starting_points(exp: Experiment) -> dict:
    """What a run starts from besides its settings, for its identity: the checkpoint's files and the
    tokenizer's (by content: a folder overwritten in place is another run), and the target config."""
    tokenizer = exp.tokenizer if exp.tokenizer is not None else (exp.init_from if exp.init_from else None)
    target = None
    if exp.target_config is not None:
        with open(exp.target_config) as f:
            target = json.load(f)
    return {"init_from": None if exp.init_from is None else folder_digest(exp.init_from),
            "init_weights": exp.init_weights,
            "tokenizer": None if tokenizer is None else folder_digest(tokenizer, TOKENIZER_FILES),
            "target_config": target}


def build_stages(exp: Experiment, schedule: str, total_steps: int, options: dict | None) -> list:
    """The schedule's stages for the experiment's full model; with ``init_from`` (and ``init_weights``) its first
    stage starts from the checkpoint's weights, which must have that stage's sizes."""
    stages = build_schedule(schedule, total_steps, full_layers(exp), **(options or {}))
    if exp.init_from is None or not exp.init_weights:
        return stages
    return starting_from(stages, exp.init_from)


def checkpoint_is_full(exp: Experiment) -> bool:
    """Whether ``init_from``'s model has the full model's sizes (else it is a growth schedule's small model)."""
    from transformers import AutoConfig

    adapter = adapter_named(exp.family)
    return adapter.dims(AutoConfig.from_pretrained(exp.init_from)) == adapter.dims(_full_config(exp))


def _batches(exp: Experiment, prepared: PreparedData, seed: int, subset: int = 0,
             subsets: int = 1) -> tuple[Callable[[int], dict], list[dict]]:
    """Training batches by step (each rank of a distributed run draws its own: step * world + rank) and the
    fixed validation batches (subset ``subset`` of ``subsets`` disjoint ones: see ``data.validation_batches``)."""
    cfg, device = exp.config, torch.device(exp.device)
    spread = {"subset": subset, "subsets": subsets}
    rank, world = rank_and_world()

    def to_device(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items()}

    if exp.task == "image_classification":
        def train_batch(step):
            return to_device(D.image_batch(*prepared.train, step * world + rank, cfg.batch_size, seed))
        evals = D.image_validation_batches(*prepared.validation, cfg.batch_size, cfg.eval_batches, **spread)
    elif exp.task == "masked_lm":
        def train_batch(step):
            return to_device(D.mlm_batch(prepared.train, step * world + rank, cfg.batch_size, cfg.seq_len, seed,
                                         prepared.tokenizer))
        evals = D.mlm_validation_batches(prepared.validation, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                         prepared.tokenizer, **spread)
    else:
        def train_batch(step):
            return to_device(D.causal_lm_batch(prepared.train, step * world + rank, cfg.batch_size, cfg.seq_len, seed))
        evals = D.validation_batches(prepared.validation, cfg.batch_size, cfg.seq_len, cfg.eval_batches, **spread)
    return train_batch, [to_device(b) for b in evals]


def run(exp: Experiment, schedule: str, seed: int = 0, options: dict | None = None,
        prepared: PreparedData | None = None, out_dir: str | None = None, resume: bool = False,
        checkpoint_every: int = 50, progress: Callable[[dict], None] | None = None,
        deepspeed: dict | None = None, overwrite: bool = False, fsdp: bool = False,
        fsdp_transitions: str = "shard-local") -> RunResult:
    """Train ``schedule`` on the experiment; metrics and checkpoints go to ``out_dir`` when given;
    ``deepspeed`` (a DeepSpeed config dict) trains through DeepSpeed engines; ``fsdp``
    shards every stage's model with FSDP2 (under torchrun), its transitions shard-local where the stage allows
    or gathered (``fsdp_transitions``: growlib.train.loop.run_schedule).

    The run's folder is ``out_dir/<schedule>-seed<seed>`` (growlib.train.runs): ``resume`` continues the run
    it holds, which must be this very run (same identity) with a checkpoint; otherwise it must hold no run,
    unless ``overwrite`` deletes it.  One process at a time trains in a folder.  A run in a folder ends with its
    final model (and tokenizer) exported to its model/ (growlib.train.export; ``load_run`` reads it back)."""
    return train(exp, schedule, seed, options, prepared, out_dir, resume, checkpoint_every, progress, deepspeed,
                 overwrite, fsdp, fsdp_transitions)[0]


def run_identity(exp: Experiment, prepared: PreparedData, schedule: str, seed: int, options: dict | None,
                 deepspeed: dict | None = None, fsdp: bool = False) -> dict:
    """Every setting that changes what a run trains (see growlib.train.runs), as JSON-able values."""
    return json.loads(json.dumps({
        "growlib": growlib.__version__, "checkpoint_version": CHECKPOINT_VERSION, "model": exp.family,
        "size": None if exp.size is None else parse_size(exp.size), **starting_points(exp),
        "vocab_size": prepared.vocab_size, "data_fingerprint": prepared.fingerprint,
        "schedule": schedule, "schedule_args": options or {}, "steps": exp.total_steps, "seed": seed,
        "training": run_identity_config(exp.config), "processes": rank_and_world()[1],
        "device": torch.device(exp.device).type, "deepspeed": deepspeed,
        **({"fsdp": True} if fsdp else {})}, sort_keys=True, default=str))  # runs from before --fsdp resume


def train(exp: Experiment, schedule: str, seed: int = 0, options: dict | None = None,
          prepared: PreparedData | None = None, out_dir: str | None = None, resume: bool = False,
          checkpoint_every: int = 50, progress: Callable[[dict], None] | None = None,
          deepspeed: dict | None = None, overwrite: bool = False, fsdp: bool = False,
          fsdp_transitions: str = "shard-local") -> tuple[RunResult, torch.nn.Module]:
    """``run``, returning the trained model too (``compare`` measures the evaluation's noise on it).

    The schedule and its options are checked first, then the data is prepared and the run folder checked
    against the run's identity, and only then is a model built."""
    require_engine_supports(schedule, options or {}, deepspeed, fsdp)
    if fsdp and rank_and_world()[1] <= 1:
        raise InputError("fsdp shards the model across processes: run under torchrun with a process group")
    if fsdp_transitions not in FSDP_TRANSITIONS:
        raise InputError(f"fsdp_transitions must be one of {FSDP_TRANSITIONS}, got {fsdp_transitions!r}")
    if fsdp_transitions != "shard-local" and not fsdp:
        raise InputError(f"fsdp_transitions={fsdp_transitions!r} chooses how FSDP2 runs make transitions: set "
                         "fsdp=True")
    stages = build_stages(exp, schedule, exp.total_steps, options)
    check_start(exp, stages)
    prepared = prepared or prepare_data(exp)
    identity = run_identity(exp, prepared, schedule, seed, options, deepspeed, fsdp)
    folder = RunFolder(run_folder(out_dir, schedule, seed)) if out_dir else None
    tokenizer = hf_tokenizer(prepared.tokenizer, exp.config.seq_len) if folder else None
    main_rank = rank_and_world()[0] == 0
    with contextlib.ExitStack() as hold:
        if folder is not None:
            if main_rank:
                hold.enter_context(folder.locked())
            folder.start(identity, resume=resume, overwrite=overwrite, write=False)  # every rank, same verdict
            _barrier()
            if main_rank:
                folder.start(identity, resume=resume, overwrite=overwrite)  # --overwrite deletes model/ too
        torch.manual_seed(seed)
        model = full_model(exp, prepared.vocab_size)
        require_vocabulary_fits(model, prepared)
        require_engine_supports(schedule, options or {}, deepspeed, fsdp, model)
        train_batch, eval_batches = _batches(exp, prepared, seed)
        tokens_per_step = exp.config.batch_size * exp.config.grad_accum

        def flops(m):
            return step_flops(m, tokens_per_step, _seq_len(exp)).total

        state = RunState(model)
        result = run_schedule(stages, state, exp.config, train_batch=train_batch, eval_batches=eval_batches,
                              step_flops=flops, metrics=MetricsLog(folder.metrics if folder else None),
                              checkpoint_path=folder.checkpoint if folder else None,
                              checkpoint_every=checkpoint_every if folder else 0, resume=resume,
                              schedule_name=schedule, progress=progress, deepspeed=deepspeed, fsdp=fsdp,
                              fsdp_transitions=fsdp_transitions,
                              tokens_per_sample=step_flops(model, 1, _seq_len(exp)).seq_len, identity=identity)
        if folder is not None:
            if main_rank and not os.path.isdir(export_path(folder.path)):
                export_model(folder.path, state.model, tokenizer)  # the final model, also when read back
            _barrier()
    return result, state.model


def require_engine_supports(schedule: str, options: dict, deepspeed: dict | None, fsdp: bool,
                            model: torch.nn.Module | None = None) -> None:
    """Refuse, before anything trains, what the chosen engine cannot run: FSDP2 with DeepSpeed or on a torch
    older than 2.6; ode_multilevel's coherence term (it multiplies whole parameters) on sharded parameters; and,
    given the model, MSLT's fused forward-only stack under ZeRO-3, which partitions the weights it reads (it runs
    by default when the embeddings freeze, i.e. for untied models)."""
    from growlib.schedules.progressive import uses_frozen_stack

    zero_stage = (deepspeed or {}).get("zero_optimization", {}).get("stage", 0)
    if fsdp and deepspeed is not None:
        raise InputError("--fsdp and --deepspeed exclude each other: choose one engine")
    if fsdp and tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6):
        raise InputError(f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard, DTensor's distribute_tensor with "
                         f"src_data_rank), found {torch.__version__}")
    if (fsdp or zero_stage == 3) and options.get("coherence"):
        raise InputError(f"{'--fsdp' if fsdp else 'ZeRO stage 3'} does not support ode_multilevel's coherence=true "
                         "(its term multiplies whole parameters, which are sharded there): drop one of them")
    if model is not None and zero_stage == 3 and schedule == "mslt" and uses_frozen_stack(
            model, options.get("frozen_forward"), options.get("freeze_embeddings")):
        raise InputError("--schedule mslt runs its frozen layers through a fused forward-only stack that reads "
                         "their weights directly, which ZeRO stage 3 partitions: pass --schedule-args "
                         "frozen_forward=false (the frozen layers then run as ordinary layers without gradients)")


def run_folder(out_dir: str, schedule: str, seed: int) -> str:
    """Where a run of ``schedule`` with ``seed`` keeps its files under ``out_dir``."""
    return os.path.join(out_dir, f"{schedule}-seed{seed}")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _seq_len(exp: Experiment) -> int | None:
    """The sequence length FLOPs are counted at: ViT's is fixed by its patches (None: from the config)."""
    return None if exp.task == "image_classification" else exp.config.seq_len


BUDGETS = ("steps", "flops")


def schedule_flops(exp: Experiment, schedule: str, total_steps: int, options: dict | None,
                   vocab_size: int) -> float:
    """The FLOPs a schedule will spend in one process, counted by the code that runs it without training
    (growlib.train.loop.planned_flops): each stage entered as the loop enters it, on untrained weights, its
    freezing applied, charged its transition (maps, reported work such as fitting LiGO, optimizer state
    mapped) and its steps at the FLOPs per step of its shapes and frozen parts."""
    torch.manual_seed(0)
    model = full_model(exp, vocab_size)
    stages = build_stages(exp, schedule, total_steps, options)
    tokens_per_step = exp.config.batch_size * exp.config.grad_accum
    return planned_flops(stages, RunState(model), exp.config,
                         lambda m: step_flops(m, tokens_per_step, _seq_len(exp)).total)


class EvalNoise(NamedTuple):
    """How much one evaluation's loss moves with the validation text it happens to see: the same model on
    ``len(losses)`` disjoint validation subsets, each as large as the evaluation the runs use."""

    std: float
    losses: list[float]
    tokens_per_subset: int

    def describe(self) -> str:
        return (f"eval noise: std {self.std:.3f} of one evaluation ({self.tokens_per_subset} tokens) over "
                f"{len(self.losses)} disjoint validation subsets, the baseline's final model")


NOISE_SUBSETS = 8


def evaluation_noise(exp: Experiment, prepared: PreparedData, model: torch.nn.Module,
                     subsets: int = NOISE_SUBSETS) -> EvalNoise | None:
    """``EvalNoise`` of ``model`` over ``subsets`` disjoint validation subsets as large as the runs' evaluation
    (fewer subsets where the split holds fewer; None below 2)."""
    batch = exp.config.batch_size
    wanted = batch * exp.config.eval_batches
    available = (len(prepared.validation[1]) if isinstance(prepared.validation, tuple)
                 else len(prepared.validation) // exp.config.seq_len)
    subsets = min(subsets, available // wanted)
    if subsets < 2:
        return None
    losses = [evaluate(model, _batches(exp, prepared, seed=0, subset=k, subsets=subsets)[1]) for k in range(subsets)]
    tokens = wanted * (_seq_len(exp) or step_flops(model, 1, None).seq_len)
    return EvalNoise(statistics.stdev(losses), losses, tokens)


def _arm(exp: Experiment, steps: int, lr: float, warmup_steps: int | None = None) -> Experiment:
    """The experiment as one arm trains it: its own step count (same FLOPs) and learning rate."""
    config = dataclasses.replace(exp.config, lr=lr,
                                 warmup_steps=exp.config.warmup_steps if warmup_steps is None else warmup_steps)
    return dataclasses.replace(exp, total_steps=steps, config=config)


def _tuning_settings(exp: Experiment, prepared: PreparedData, schedule: str, seed: int,
                     options: dict | None) -> dict:
    """Everything that decides a tuning run's result, for its cache name: the experiment (its data by path and
    by the fingerprint of its tokens, so edited data is a new run), the schedule and its options, the seed."""
    return {"growlib": growlib.__version__, "family": exp.family, "size": exp.size, **starting_points(exp),
            "steps": exp.total_steps,
            "config": dataclasses.asdict(exp.config), "data": os.path.abspath(exp.data) if exp.data else None,
            "data_fingerprint": prepared.fingerprint,
            "vocab_size": prepared.vocab_size, "device": torch.device(exp.device).type, "schedule": schedule,
            "options": options or {}, "seed": seed}


def _tuning_run(exp: Experiment, prepared: PreparedData, schedule: str, seed: int, options: dict | None,
                cache_dir: str, log: Callable[[str], None], plan: RunPlan,
                progress: Callable[[str], Callable[[dict], None]] | None) -> RunResult:
    """One run of the sweep, from the cache when it was run before with exactly these settings.  A run whose
    loss or gradients turn non-finite counts as diverged (final loss NaN, which never wins the sweep)."""
    settings = _tuning_settings(exp, prepared, schedule, seed, options)
    path = os.path.join(cache_dir, schedule, f"lr{exp.config.lr:g}-seed{seed}-{T.fingerprint(settings)}.json")
    cached = T.load_result(path, settings)
    if cached is not None:
        plan.finished(schedule, exp.total_steps, 0.0, trained=False)
        return cached
    label = f"[{plan.position()}] tuning {schedule} lr {exp.config.lr:g} seed {seed}"
    try:
        result = run(exp, schedule, seed, options, prepared, progress=progress(label) if progress else None)
    except FloatingPointError:
        result = RunResult(steps=0, flops=0.0, wall_seconds=0.0, final_val_loss=float("nan"), evals=[])
    T.save_result(path, result, settings)
    plan.finished(schedule, exp.total_steps, result.wall_seconds, trained=result.steps > 0)
    log(f"{'tuning ' + schedule:>22} lr {exp.config.lr:g} seed {seed}: {result.steps} steps, "
        f"val loss {result.final_val_loss:.3f}, {result.wall_seconds:.1f} s  [{plan.done()}]")
    return result


class ScheduleFailures(RuntimeError):
    """Some schedules of a comparison failed; the others were summarised (``table``) all the same."""

    def __init__(self, message: str, table: str):
        super().__init__(message)
        self.table = table


def _check_compare_arguments(schedules, seeds, budget, tuning) -> None:
    if budget not in BUDGETS:
        raise InputError(f"budget must be one of {BUDGETS}, got {budget!r}")
    unknown = [name for name in schedules if name not in SCHEDULES]
    if not schedules or unknown:
        raise InputError(f"schedules must be a non-empty list of {sorted(SCHEDULES)}, got {list(schedules)!r}")
    if not seeds or not all(is_int(s) for s in seeds):
        raise InputError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    for what, items in (("schedules", schedules), ("seeds", seeds)):
        repeated = sorted({item for item in items if list(items).count(item) > 1}, key=str)
        if repeated:
            raise InputError(f"{what} lists {repeated} more than once (each run has one folder): {list(items)!r}")
    if tuning is not None:
        if not isinstance(tuning, T.Tuning):
            raise TypeError(f"tuning must be a growlib.train.tuning.Tuning or None, got {type(tuning).__name__}")
        tuning.check_disjoint(list(seeds))


def _how_to_start(folder: RunFolder, identity: dict, overwrite: bool, ignore: tuple[str, ...] = ()) -> str:
    """'fresh', 'resume' (this very run, checkpointed: a finished one resumes with nothing left to train) or
    'restart' (this run, stopped before its first checkpoint); RunFolderError if the folder holds another run.
    ``ignore``: identity fields not known yet (checked again when they are)."""
    state = folder.state()
    if overwrite or state.empty:
        return "restart" if not state.empty else "fresh"
    recorded, requested = dict(state.identity or {}), dict(identity)
    for key in ignore:
        section, _, field_name = key.partition(".")
        for settings in (recorded, requested):
            if isinstance(settings.get(section), dict):
                settings[section] = {k: v for k, v in settings[section].items() if k != field_name}
    differences = identity_differences(recorded, requested) if state.identity is not None else [
        f"files of a run without {IDENTITY_FILE} (an earlier growlib's?)"]
    if differences:
        raise RunFolderError(f"{folder.path} holds another run than this comparison's: {'; '.join(differences)}. "
                             "Re-run with the settings it was made with, choose another --out, or pass --overwrite "
                             "to train every run again (tuning runs stay cached)")
    return "resume" if state.has_checkpoint else "restart"


def compare(exp: Experiment, schedules: list[str], seeds: list[int], out_dir: str,
            options: dict[str, dict] | None = None, budget: str = "flops",
            log: Callable[[str], None] = print, tuning: T.Tuning | None = T.Tuning(),
            overwrite: bool = False, checkpoint_every: int = 50,
            progress: Callable[[str], Callable[[dict], None]] | None = None) -> str:
    """Run every schedule with every seed on the same data, each at its own tuned learning rate; write
    summary.md / summary.csv, tuning.md / tuning.csv and the loss curves; return the markdown table.

    ``budget='steps'`` gives every schedule the baseline's ``total_steps`` (the same tokens);
    ``budget='flops'`` stretches each schedule's steps so it spends the baseline's FLOPs, which is how
    compute saved is measured: the FLOPs each method needs to reach the baseline's final loss.

    ``tuning`` (``growlib.train.tuning.Tuning``) sweeps every arm's learning rate the same way on seeds that
    are not reported, and each arm then runs at its best; its runs are cached under ``out_dir/tuning`` and
    reused.  ``tuning=None`` runs every arm at ``exp.config.lr``, and every table says it is untuned.  The
    baseline's final model (first seed) is also evaluated on disjoint validation subsets, so the table states
    how much one evaluation moves with the text it sees.

    Resumable: run again with the same arguments, finished runs are read back from their final checkpoints,
    interrupted ones resume from their last checkpoint, and only the rest trains.  A folder holding a run of
    other settings is refused before anything trains, unless ``overwrite`` (every run trains again).  Every
    schedule, seed list and budget is checked before anything trains.

    ``log`` gets a line per finished run, with which run of how many it was and an ETA for the comparison;
    ``progress(label)``, if given, makes the per-step callback of each run (e.g. growlib.train.progress's
    StepProgress).  A schedule that fails (a numerical
    fault, a bug) does not stop the others: they are summarised, then ScheduleFailures names what failed."""
    _check_compare_arguments(schedules, seeds, budget, tuning)
    if "baseline" not in schedules:
        schedules = ["baseline"] + list(schedules)
    options = options or {}
    bases = {name: exp for name in schedules}
    if exp.init_from is not None and not checkpoint_is_full(exp):
        bases["baseline"] = dataclasses.replace(exp, init_weights=False)
        log(f"baseline: the full model from scratch (the model in {exp.init_from} is smaller: the other schedules "
            "grow from it)")
    steps = _steps_per_schedule(bases, options, budget, tuning, exp.vocab_size)  # before the data
    with RunFolder(out_dir).locked():
        return _compare(bases, list(seeds), out_dir, options, budget, log, tuning, overwrite, checkpoint_every,
                        progress, steps)


def _steps_per_schedule(bases, options, budget, tuning, vocab_size) -> dict[str, int]:
    """Each schedule's steps: the baseline's, or as many as spend the baseline's FLOPs.  Every schedule is
    built at its budgets (its tuning runs' too), so one too small for it fails before anything trains.
    ``bases``: the experiment each schedule's arms are made from."""
    baseline_flops = schedule_flops(bases["baseline"], "baseline", bases["baseline"].total_steps, None, vocab_size)
    steps = {}
    for name, exp in bases.items():
        try:
            steps[name] = exp.total_steps
            if budget == "flops" and name != "baseline":
                own = schedule_flops(exp, name, exp.total_steps, options.get(name), vocab_size)
                steps[name] = round(exp.total_steps * baseline_flops / own)
            budgets = [steps[name]] + ([tuning.scaled(steps[name], exp.config.warmup_steps)[0]] if tuning else [])
            for total in budgets:
                build_stages(exp, name, total, options.get(name))
        except ValueError as error:
            raise InputError(f"schedule {name!r} cannot run on this budget (the baseline's {exp.total_steps} steps"
                             f"{', its tuning runs a fraction of it' if tuning else ''}): {error}") from error
    return steps


def _compare(bases, seeds, out_dir, options, budget, log, tuning, overwrite, checkpoint_every, progress,
             steps) -> str:
    exp, schedules = bases["baseline"], list(bases)
    prepared = prepare_data(exp)
    if prepared.vocab_size != exp.vocab_size:  # the tokenizer found fewer distinct tokens than asked
        steps = _steps_per_schedule(bases, options, budget, tuning, prepared.vocab_size)
    for name in schedules:  # a folder of another run is refused now, not after hours of training
        for seed in seeds:
            identity = run_identity(_arm(bases[name], steps[name], exp.config.lr), prepared, name, seed,
                                    options.get(name))
            _how_to_start(RunFolder(run_folder(out_dir, name, seed)), identity, overwrite, ignore=("training.lr",))

    plan = RunPlan()
    for name in schedules:
        if tuning is not None:
            plan.add(name, tuning.scaled(steps[name], exp.config.warmup_steps)[0],
                     len(tuning.lr_grid) * len(tuning.seeds))
        plan.add(name, steps[name], len(seeds))
    lrs, sweep, failures = {name: exp.config.lr for name in schedules}, {}, {}
    if tuning is not None:
        for name in schedules:
            tune_steps, tune_warmup = tuning.scaled(steps[name], exp.config.warmup_steps)
            sweep[name] = {}
            def sweep_at(multiplier: float) -> float:
                arm = _arm(bases[name], tune_steps, exp.config.lr * multiplier, tune_warmup)
                return T.mean_final_loss([_tuning_run(arm, prepared, name, seed, options.get(name),
                                                      os.path.join(out_dir, "tuning"), log, plan, progress)
                                          for seed in tuning.seeds])

            try:
                for multiplier in tuning.lr_grid:
                    sweep[name][multiplier] = sweep_at(multiplier)
                while (multiplier := tuning.next_multiplier(sweep[name])) is not None:
                    plan.add(name, tune_steps, len(tuning.seeds))
                    sweep[name][multiplier] = sweep_at(multiplier)
                best = T.best_multiplier(sweep[name])
            except T.CachedRunMismatch:
                raise  # the cache folder is not this comparison's: no schedule can be tuned in it
            except Exception as error:  # noqa: BLE001 -- one schedule's failure must not lose the others
                failures[name] = f"tuning: {type(error).__name__}: {error}"
                plan.abandon(name)
                log(f"{name:>15}: FAILED while tuning: {failures[name]}  [{plan.done()}]")
                continue
            lrs[name] = exp.config.lr * best
            log(f"{name:>15}: best lr {lrs[name]:g} (x{best:g})")

    results: dict[str, list[RunResult]] = {}
    noise = None
    for name in schedules:
        if name in failures:
            continue
        for seed in seeds:
            arm = _arm(bases[name], steps[name], lrs[name])
            try:
                how = _how_to_start(RunFolder(run_folder(out_dir, name, seed)),
                                    run_identity(arm, prepared, name, seed, options.get(name)), overwrite)
                label = f"[{plan.position()}] {name} seed {seed}"
                result, model = train(arm, name, seed, options.get(name), prepared, out_dir, resume=how == "resume",
                                      overwrite=how == "restart", checkpoint_every=checkpoint_every,
                                      progress=progress(label) if progress else None)
            except Exception as error:  # noqa: BLE001 -- one schedule's failure must not lose the others
                failures[name] = f"seed {seed}: {type(error).__name__}: {error}"
                plan.abandon(name)
                log(f"{name:>15} seed {seed}: FAILED: {type(error).__name__}: {error}  [{plan.done()}]")
                results.pop(name, None)
                break
            if name == "baseline" and noise is None:
                noise = evaluation_noise(arm, prepared, model)
            resumed = " (read back from its checkpoint)" if how == "resume" else ""
            plan.finished(name, steps[name], result.wall_seconds, trained=how != "resume")
            log(f"{name:>15} seed {seed}: {result.steps} steps, lr {lrs[name]:g}, val loss "
                f"{result.final_val_loss:.3f}, {result.flops:.3g} FLOPs, {result.wall_seconds:.1f} s{resumed}  "
                f"[{plan.done()}]")
            results.setdefault(name, []).append(result)
    failed = "; ".join(f"{name} {why}" for name, why in failures.items())
    if "baseline" in failures:
        raise ScheduleFailures(f"the baseline failed, so nothing can be compared: {failed}", "")
    protocol = tuning.describe(exp.config.lr) if tuning is not None else T.untuned_label(exp.config.lr)
    header = (f"{exp.family} {exp.size}, baseline {exp.total_steps} steps x {exp.config.batch_size} x "
              f"{exp.config.seq_len} tokens, budget: same {budget}, seeds {seeds}, data {exp.data or 'python stdlib'}; "
              f"{protocol}; {noise.describe() if noise else 'eval noise: not measured (validation split too small)'}"
              + (f"; starting from {exp.init_from}" + ("" if exp.init_weights else " (the baseline: from scratch)")
                 if exp.init_from else "")
              + (f"; FAILED (not in the table): {failed}" if failures else ""))
    table = write_summary(summarize(results, lrs=lrs), out_dir, header)
    if tuning is not None:
        write_tuning_table({k: v for k, v in sweep.items() if v}, exp.config.lr, out_dir, protocol)
    try:
        plot_curves(results, out_dir,
                    title=f"{exp.family} {exp.size}: {', '.join(results)}; budget: same {budget} as the baseline "
                          f"({exp.total_steps} steps); seeds {seeds}\n"
                          + ("LR tuned per arm (tuning.md)" if tuning is not None else T.untuned_label(exp.config.lr)))
    except ImportError:
        log("matplotlib is not installed: skipping loss_vs_flops.png / loss_vs_time.png (pip install matplotlib)")
    if failures:
        raise ScheduleFailures(f"{len(failures)} schedule(s) failed: {failed}; the others are summarised in "
                               f"{os.path.join(out_dir, 'summary.md')}", table)
    return table
