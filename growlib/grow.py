"""Grow a saved Hugging Face model into a larger one (``growlib grow``): load a ``save_pretrained`` folder of any
supported family, grow it (depth: stack, interleave, copy_top; width: hypercloning, net2net, bert2bert_fpi,
bert2bert_aki; or LiGO fitted on data), measure how much of its function survived on a batch, and save an
ordinary HF checkpoint (config, safetensors weights, the source's tokenizer files) that ``from_pretrained`` loads.

The output folder is written whole or not at all: everything goes to a temporary folder beside it, renamed into
place at the end; an existing folder is replaced only when asked (``overwrite``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch

from growlib.errors import InputError
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
    relative_logit_error: float
    checked_on: str
    parameters: int
    seconds: float


def load_pretrained(folder: str):
    """(model, adapter) from a ``save_pretrained`` folder of a family growlib supports; InputError naming the
    folder and the supported classes otherwise."""
    from transformers import AutoConfig

    from growlib.models import adapter_of_class, supported_class_names
    from growlib.train.export import quiet_progress_bars

    if not os.path.isfile(os.path.join(str(folder), "config.json")):
        raise InputError(f"SRC {folder!r} is not a save_pretrained folder: it has no config.json")
    architecture = (AutoConfig.from_pretrained(folder).architectures or [None])[0]
    adapter = adapter_of_class(architecture)
    if adapter is None:
        raise InputError(f"SRC {folder!r} holds a {architecture}; growlib grows {supported_class_names()}")
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
                    batch_size: int = 4, seq_len: int = 64, seed: int = 0, overwrite: bool = False) -> GrowReport:
    """Grow the model saved in ``source`` to the given sizes (each None: the source's) and save it to ``out``.

    Width first (``width_method``), then depth (``depth_method``); with ``ligo_steps`` > 0 LiGO instead, both
    methods as its initialisation, fitted for that many steps on ``data``.  The function-preservation error is
    measured on ``data`` (or random tokens) and written to ``out/growlib_grow.json`` with the sizes."""
    started = time.perf_counter()
    require_choice("depth_method", depth_method, GROW_METHODS)
    require_choice("width_method", width_method, WIDEN_METHODS)
    require_int("ligo_steps", ligo_steps, 0)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        require_int(name, value)
    if os.path.exists(out) and not overwrite:
        raise InputError(f"OUT {out!r} already exists: choose another folder, or pass --overwrite to replace it")
    if data is not None and not (data.startswith("hf:") or os.path.exists(data)):
        raise InputError(f"--data {data!r}: no such file or folder")

    import growlib
    from transformers import AutoTokenizer

    from growlib.train.data import HFTokenizer

    model, adapter = load_pretrained(source)
    dims = adapter.dims(model.config)
    seq_len = min(seq_len, adapter.max_seq_len(model.config) or seq_len)  # no longer than its positions serve
    target = _target_dims(dims, layers, hidden, intermediate, heads, width_method, seed)
    has_tokenizer = any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES)
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(source), source) if has_tokenizer else None
    _progress.info(f"grow: {source}: {type(model).__name__}, {dims['layers']} layers x {dims['model']}, "
                   f"ffn {dims['ffn']}, {dims['heads']} heads")

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
    _save(grown, source, out, report, overwrite)
    _progress.info(f"grow: saved {out} ({report.parameters / 1e6:.1f}M parameters, {report.seconds:.1f} s)")
    return report


def _save(model, source: str, out: str, report: GrowReport, overwrite: bool) -> None:
    """Write the model, the tokenizer files and the report into a temporary folder, then rename it to ``out``."""
    out = os.path.abspath(out)
    staging = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    from growlib.train.export import quiet_progress_bars

    try:
        with quiet_progress_bars():
            model.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(staging, name))
        with open(os.path.join(staging, REPORT_FILE), "w") as f:
            json.dump(asdict(report), f, indent=2)
        if os.path.exists(out) and overwrite:
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
