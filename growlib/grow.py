"""Grow a saved Hugging Face model into a larger one (``growlib grow``): load a ``save_pretrained`` folder of any
supported family, grow it (depth: stack, interleave, copy_top; width: hypercloning, net2net, bert2bert_fpi,
bert2bert_aki; or LiGO fitted on data), measure how much of its function survived on a batch, and save an
ordinary HF checkpoint (config, safetensors weights, the source's tokenizer files) that ``from_pretrained`` loads.

The output folder is written whole or not at all: everything goes to a temporary folder beside it, renamed into
place at the end; an existing folder is replaced only when asked (``overwrite``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch

from growlib.errors import InputError
from growlib.grow_stream import DEFAULT_MAX_SHARD_BYTES, growth_map, meta_model, stream_grow
from growlib.operators.depth import GROW_METHODS
from growlib.operators.width import WIDEN_METHODS
from growlib.validate import require_choice, require_int

#: the files of an HF tokenizer that ``grow`` copies from the source folder when they are there
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")
#: what ``grow`` writes beside the weights: how the model was grown and what was measured
REPORT_FILE = "growlib_grow.json"

_progress = logging.getLogger("growlib.grow")


@dataclass
class GrowReport:
    """What ``grow_checkpoint`` did: the sizes before and after, the method, and the function-preservation
    error measured on ``checked_on`` (max |logits_grown - logits_source| / max |logits_source|)."""

    source: str
    architecture: str
    source_dims: dict
    target_dims: dict
    method: str
    relative_logit_error: float | None
    checked_on: str
    parameters: int
    seconds: float
    streamed: bool = False
    #: streamed: the most bytes of tensors held at once (one grown parameter and the source tensors it reads)
    largest_group_bytes: int | None = None


def read_source(folder: str):
    """(config, adapter, architecture) of a ``save_pretrained`` folder of a family growlib supports, its weights
    not read; InputError naming the folder and the supported classes otherwise."""
    from transformers import AutoConfig

    from growlib.models import adapter_of_class, supported_class_names

    if not os.path.isfile(os.path.join(str(folder), "config.json")):
        raise InputError(f"SRC {folder!r} is not a save_pretrained folder: it has no config.json")
    config = AutoConfig.from_pretrained(folder)
    architecture = (config.architectures or [None])[0]
    adapter = adapter_of_class(architecture)
    if adapter is None:
        raise InputError(f"SRC {folder!r} holds a {architecture}; growlib grows {supported_class_names()}")
    return config, adapter, architecture


def load_pretrained(folder: str):
    """(model, adapter) from a ``save_pretrained`` folder of a family growlib supports (see ``read_source``)."""
    from growlib.train.export import quiet_progress_bars

    _, adapter, architecture = read_source(folder)
    with quiet_progress_bars():
        model = adapter.model_class(architecture).from_pretrained(folder)
    return adapter.finish(model).eval(), adapter


def _target_dims(dims: dict, layers: int | None, hidden: int | None, intermediate: int | None,
                 heads: int | None, width_method: str, seed: int) -> dict:
    """The grown sizes: each given one, else the source's (heads follow the hidden size, the head size kept, as
    ``growlib.widen`` chooses them); never smaller than the source's."""
    from growlib.operators.width import widen_map

    if layers is not None and require_int("layers", layers) < dims["layers"]:
        raise InputError(f"--layers must be >= the source's {dims['layers']}: grow only grows, got {layers}")
    map_method = "bert2bert_fpi" if width_method == "bert2bert_aki" else width_method
    width = widen_map(dims, hidden, intermediate, heads, map_method, seed).target_dims
    return {**width, "layers": dims["layers"] if layers is None else layers}


def _token_batch(adapter, model, tokenizer, data: str | None, batch_size: int, seq_len: int, seed: int):
    """Model inputs to measure function preservation on: ``data`` tokenized when given, else random tokens
    (random pixels for an image model); returns (inputs, description)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    if adapter.task == "image_classification":
        shape = (batch_size, config.num_channels, *((config.image_size,) * 2 if isinstance(config.image_size, int)
                                                    else config.image_size))
        return {"pixel_values": torch.randn(shape, generator=generator)}, f"{batch_size} random images"
    if data is not None:
        ids = torch.as_tensor(_tokenized(data, tokenizer).ids, dtype=torch.int64)
        if len(ids) >= batch_size * seq_len:
            return ({"input_ids": ids[:batch_size * seq_len].view(batch_size, seq_len)},
                    f"{batch_size} x {seq_len} tokens of {data}")
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids}, f"{batch_size} x {seq_len} random tokens"


def _tokenized(data: str, tokenizer):
    """``data``'s training texts as one token stream (a TokenData), tokenized as ``growlib train`` does."""
    from growlib.train.data import TokenData, load_texts

    if tokenizer is None:
        raise InputError("--data needs the source's tokenizer: SRC has no tokenizer files")
    train_texts, _ = load_texts(data)
    return TokenData.from_texts(train_texts, tokenizer)


def _relative_logit_error(source, grown, inputs) -> float:
    with torch.no_grad():
        reference = source(**inputs).logits.double()
        got = grown(**inputs).logits.double()
    return float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _fitted_ligo(model, adapter, target: dict, depth_method: str, width_method: str, tokenizer, data, steps: int,
                 batch_size: int, seq_len: int, seed: int):
    """LiGO from ``model`` to the target sizes, fitted for ``steps`` on ``data``; returns the large model."""
    from growlib.operators.ligo import LiGO
    from growlib.train import data as D

    if adapter.task != "causal_lm":
        raise InputError(f"--ligo-steps fits LiGO on next-token prediction; a {adapter.family} model is trained "
                         f"on {adapter.task}")
    if data is None:
        raise InputError("--ligo-steps needs --data to fit on")
    stream = _tokenized(data, tokenizer)
    batches = [D.causal_lm_batch(stream, step, batch_size, seq_len, seed) for step in range(steps)]
    ligo = LiGO(model, adapter.config_at(model.config, target), depth_init=depth_method, width_init=width_method,
                seed=seed)
    ligo.fit(batches, steps=steps)
    return ligo.materialize()


def grow_checkpoint(source: str, out: str, *, layers: int | None = None, hidden: int | None = None,
                    intermediate: int | None = None, heads: int | None = None, depth_method: str = "stack",
                    width_method: str = "hypercloning", ligo_steps: int = 0, data: str | None = None,
                    batch_size: int = 4, seq_len: int = 64, seed: int = 0, overwrite: bool = False,
                    stream: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> GrowReport:
    """Grow the model saved in ``source`` to the given sizes (each None: the source's) and save it to ``out``.

    Width first (``width_method``), then depth (``depth_method``); with ``ligo_steps`` > 0 LiGO instead, both
    methods as its initialisation, fitted for that many steps on ``data``.  The function-preservation error is
    measured on ``data`` (or random tokens) and written to ``out/growlib_grow.json`` with the sizes.

    ``stream``: never hold either model, for checkpoints larger than memory (``growlib.grow_stream``): the
    weights go from the source's safetensors files to ``out``'s parameter by parameter, bit-identical to the
    in-memory result, in shards of at most ``max_shard_bytes``; no function check runs (it needs both models).
    Without it, a growth that would not fit in the memory available is refused before any weight is read."""
    started = time.perf_counter()
    require_choice("depth_method", depth_method, GROW_METHODS)
    require_choice("width_method", width_method, WIDEN_METHODS)
    require_int("ligo_steps", ligo_steps, 0)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("max_shard_bytes", max_shard_bytes)):
        require_int(name, value)
    if os.path.exists(out) and not overwrite:
        raise InputError(f"OUT {out!r} already exists: choose another folder, or pass --overwrite to replace it")
    if data is not None and not (data.startswith("hf:") or os.path.exists(data)):
        raise InputError(f"--data {data!r}: no such file or folder")
    if stream and (ligo_steps or data is not None):
        raise InputError("--stream never holds the model, so it cannot fit LiGO (--ligo-steps) or check the "
                         "function on --data: drop those, or grow without --stream")

    config, adapter, architecture = read_source(source)
    dims = adapter.dims(config)
    target = _target_dims(dims, layers, hidden, intermediate, heads, width_method, seed)
    _progress.info(f"grow: {source}: {architecture}, {dims['layers']} layers x {dims['model']}, "
                   f"ffn {dims['ffn']}, {dims['heads']} heads")
    if stream:
        return _grow_streamed(source, out, config, adapter, architecture, target, width_method, depth_method,
                              seed, overwrite, max_shard_bytes, started)
    _require_memory_for(source, adapter, architecture, config, target,
                        streamable=not (ligo_steps or data is not None or width_method == "bert2bert_aki"))
    return _grow_in_memory(source, out, adapter, target, width_method, depth_method, ligo_steps, data, batch_size,
                           seq_len, seed, overwrite, started)


def _grow_in_memory(source, out, adapter, target, width_method, depth_method, ligo_steps, data, batch_size,
                    seq_len, seed, overwrite, started) -> GrowReport:
    import growlib
    from transformers import AutoTokenizer

    from growlib.train.data import HFTokenizer

    model, adapter = load_pretrained(source)
    dims = adapter.dims(model.config)
    seq_len = min(seq_len, adapter.max_seq_len(model.config) or seq_len)  # no longer than its positions serve
    has_tokenizer = any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES)
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(source), source) if has_tokenizer else None

    if ligo_steps:
        method = f"ligo ({ligo_steps} steps; init {width_method} + {depth_method})"
        _progress.info(f"grow: fitting LiGO to {target['layers']} layers x {target['model']} on {data}")
        grown = _fitted_ligo(model, adapter, target, depth_method, width_method, tokenizer, data, ligo_steps,
                             batch_size, seq_len, seed)
    else:
        grown, steps = model, []
        if (target["model"], target["ffn"], target["heads"]) != (dims["model"], dims["ffn"], dims["heads"]):
            _progress.info(f"grow: widening {dims['model']} -> {target['model']} ({width_method})")
            grown = growlib.widen(grown, hidden=target["model"], intermediate=target["ffn"],
                                  heads=target["heads"], method=width_method, seed=seed)
            steps.append(width_method)
        if target["layers"] != dims["layers"]:
            _progress.info(f"grow: {dims['layers']} -> {target['layers']} layers ({depth_method})")
            grown = growlib.grow_depth(grown, target["layers"], depth_method)
            steps.append(depth_method)
        method = " + ".join(steps) or "none (the sizes asked are the source's)"
    grown.eval()

    inputs, checked_on = _token_batch(adapter, model, tokenizer, data, batch_size, seq_len, seed)
    error = _relative_logit_error(model, grown, inputs)
    _progress.info(f"grow: max relative logit error {error:.2e} on {checked_on}")
    report = GrowReport(source=os.path.abspath(source), architecture=type(grown).__name__, source_dims=dims,
                        target_dims=adapter.dims(grown.config), method=method, relative_logit_error=error,
                        checked_on=checked_on, parameters=sum(p.numel() for p in grown.parameters()),
                        seconds=time.perf_counter() - started)
    from growlib.train.export import quiet_progress_bars

    with _staged(out, overwrite) as staging:
        with quiet_progress_bars():
            grown.save_pretrained(staging)
        _finish_folder(staging, source, report)
    _progress.info(f"grow: saved {out} ({report.parameters / 1e6:.1f}M parameters, {report.seconds:.1f} s)")
    return report


def _grow_streamed(source, out, config, adapter, architecture, target, width_method, depth_method, seed,
                   overwrite, max_shard_bytes, started) -> GrowReport:
    gmap = growth_map(adapter.dims(config), target, width_method, depth_method, seed)
    _progress.info(f"grow: streaming to {target['layers']} layers x {target['model']}, ffn {target['ffn']} "
                   f"({width_method} + {depth_method}), one parameter at a time")
    with _staged(out, overwrite) as staging:
        written = stream_grow(source, staging, adapter, architecture, config, gmap, max_shard_bytes)
        report = GrowReport(source=os.path.abspath(source), architecture=architecture,
                            source_dims=adapter.dims(config), target_dims=dict(gmap.target_dims),
                            method=f"{width_method} + {depth_method}", relative_logit_error=None,
                            checked_on="not checked: --stream never holds the model (the streamed weights equal "
                                       "the in-memory growth's bit for bit)",
                            parameters=written.parameters, seconds=time.perf_counter() - started,
                            streamed=True, largest_group_bytes=written.largest_group_bytes)
        _finish_folder(staging, source, report)
    _progress.info(f"grow: saved {out} ({report.parameters / 1e6:.1f}M parameters in {len(written.files)} "
                   f"file(s), at most {written.largest_group_bytes / 2**20:.0f} MiB of tensors held at once, "
                   f"{report.seconds:.1f} s)")
    return report


def _require_memory_for(source: str, adapter, architecture: str, config, target: dict, streamable: bool) -> None:
    """Refuse an in-memory growth that needs more than the memory available (source and grown model held
    together), naming both (and --stream, where it can do what was asked), rather than let the machine kill the
    process half-way."""
    available = _available_memory_bytes()
    if available is None:
        return
    source_model = meta_model(adapter, architecture, config)
    target_model = meta_model(adapter, architecture, adapter.config_at(config, target),
                              **adapter.build_options(source_model))
    growth = sum(p.numel() for p in target_model.parameters()) / sum(p.numel() for p in source_model.parameters())
    needed = _weights_bytes(source) * (1 + growth)
    if needed > available:
        remedy = ("pass --stream to grow it file to file" if streamable else
                  "LiGO, --data and bert2bert_aki need both models in memory: grow on a machine with more memory")
        raise InputError(f"growing {source!r} in memory holds the source and the grown model together, about "
                         f"{needed / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB are available: {remedy}")


def _weights_bytes(source: str) -> int:
    """The bytes of the source's weights: its safetensors checkpoint's tensors, else its pytorch_model*.bin
    files (a folder holding both formats, or other .bin files, is not counted twice)."""
    from growlib.safetensors_files import INDEX_FILE, SINGLE_FILE, index_checkpoint

    if os.path.isfile(os.path.join(source, SINGLE_FILE)) or os.path.isfile(os.path.join(source, INDEX_FILE)):
        return sum(t.nbytes for t in index_checkpoint(source).values())
    return sum(os.path.getsize(os.path.join(source, name)) for name in os.listdir(source)
               if name.startswith("pytorch_model") and name.endswith(".bin"))


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _staged(out: str, overwrite: bool):
    """A temporary folder beside ``out`` to write into, renamed to ``out`` when the block succeeds (replacing
    an existing ``out`` only with ``overwrite``) and removed either way."""
    out = os.path.abspath(out)
    staging = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        if os.path.exists(out) and overwrite:
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish_folder(staging: str, source: str, report: GrowReport) -> None:
    """The source's tokenizer files and the report, beside the weights."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(staging, name))
    with open(os.path.join(staging, REPORT_FILE), "w") as f:
        json.dump(asdict(report), f, indent=2)
