"""A finished run's model in the format everyone reads: ``<run folder>/model/`` holds the final model as
``save_pretrained`` writes it (safetensors), the run's tokenizer as a Hugging Face tokenizer, and a copy of the
run's ``run.json``.  ``load_run`` reads it back; growlib's own checkpoint stays what ``--resume`` needs (the
optimizer and the schedule's state), not what a user of the trained model should have to parse."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from growlib.train.checkpoint import CheckpointWriteError
from growlib.train.runs import EXPORT_DIR, IDENTITY_FILE

#: The temporary folder an export is written into before it is renamed to model/.
_PARTIAL_PREFIX = ".model-export-"
_MODEL_CONFIG = "config.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"


def export_path(run_path: str) -> str:
    """Where the run in ``run_path`` keeps its exported model."""
    return os.path.join(run_path, EXPORT_DIR)


def hf_tokenizer(tokenizer, model_max_length: int):
    """``tokenizer`` as a Hugging Face tokenizer (growlib's BPE becomes a fast tokenizer with the same vocabulary,
    merges and special tokens); None stays None.  Called when a run starts, so an export cannot fail on it."""
    from growlib.train.data import SPECIAL_TOKENS, BPETokenizer, HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.hf
    if tokenizer is None or hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"tokenizer must be a growlib BPETokenizer, a Hugging Face tokenizer or None to be exported "
                        f"with the model, got {type(tokenizer).__name__}")
    from transformers import PreTrainedTokenizerFast

    pad, mask, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer, pad_token=pad, mask_token=mask,
                                   bos_token=bos, eos_token=eos, model_max_length=model_max_length)


def export_model(run_path: str, model: torch.nn.Module, tokenizer) -> None:
    """Write ``run_path/model/`` (which must not exist): ``model.save_pretrained`` (transformers 5 writes
    safetensors only), the tokenizer's ``save_pretrained`` files unless it is None, and the run's run.json.

    Written into a temporary folder that is renamed into place once every file is on disk, so model/ is whole
    or absent; what a killed export left is removed first (the caller holds the run folder's lock).  A failed
    write raises CheckpointWriteError: the final checkpoint is intact and --resume exports it again."""
    for leftover in glob.glob(os.path.join(glob.escape(run_path), _PARTIAL_PREFIX + "*")):
        shutil.rmtree(leftover)
    partial = tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=run_path)
    if tokenizer is not None:  # so that generate() stops at the tokenizer's own end of text, not at id 0
        for role in ("bos", "eos", "pad"):
            setattr(model.config, f"{role}_token_id", getattr(tokenizer, f"{role}_token_id"))
    try:
        with quiet_progress_bars():  # a one-shard bar per run would fill compare's log
            model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        shutil.copyfile(os.path.join(run_path, IDENTITY_FILE), os.path.join(partial, IDENTITY_FILE))
        for name in os.listdir(partial):
            _fsync(os.path.join(partial, name))
        os.rename(partial, export_path(run_path))
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise CheckpointWriteError(error.errno, f"could not export the model to {export_path(run_path)}: "
                                       f"{error.strerror or error}; the final checkpoint is intact, and --resume "
                                       "writes the export again") from error
        raise
    _fsync(run_path)  # the rename itself durable


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' progress bars off for the duration, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _fsync(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@dataclass
class LoadedRun:
    """A finished run as Hugging Face objects: ``model`` (on the CPU, in eval mode), ``tokenizer`` (None for a
    run without one: ViT, a pre-tokenized .bin file) and ``identity``, the run's settings as run.json has them."""

    model: torch.nn.Module
    tokenizer: object | None
    identity: dict


def load_run(path: str | os.PathLike) -> LoadedRun:
    """The model, tokenizer and identity a finished run exported; ``path`` is its run folder (``--out`` of
    ``growlib train`` plus ``<schedule>-seed<seed>``, as ``compare`` lays them out too) or that folder's model/.
    The model's class is the one config.json names, among the classes growlib trains."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_run: path {path!r} is not a folder; expected a growlib run folder "
                                f"(OUT/<schedule>-seed<seed>) or its {EXPORT_DIR}/")
    folder = next((f for f in (path, export_path(path)) if all(
        os.path.isfile(os.path.join(f, name)) for name in (_MODEL_CONFIG, IDENTITY_FILE))), None)
    if folder is None and os.path.isfile(os.path.join(path, IDENTITY_FILE)):
        raise FileNotFoundError(f"load_run: run folder {path} holds no exported model ({EXPORT_DIR}/): the run has "
                                "not finished (interrupted, still training, or its export failed); run its command "
                                "again with --resume (growlib train) or the same growlib compare command, which "
                                f"finishes it and writes {EXPORT_DIR}/")
    if folder is None:
        raise FileNotFoundError(f"load_run: {path} is not a growlib run folder: expected {EXPORT_DIR}/ with "
                                f"{_MODEL_CONFIG} and {IDENTITY_FILE} (a finished run's export), or the path of "
                                "such an export")
    from transformers import AutoConfig, AutoTokenizer

    from growlib.models import adapter_of_class, supported_class_names

    architecture = (AutoConfig.from_pretrained(folder).architectures or [None])[0]
    adapter = adapter_of_class(architecture)
    if adapter is None:
        raise ValueError(f"load_run: {os.path.join(folder, _MODEL_CONFIG)} names architecture {architecture!r}; "
                         f"expected one of the model classes growlib trains: {supported_class_names()}")
    with quiet_progress_bars():  # transformers' per-tensor loading bar
        model = adapter.finish(adapter.model_class(architecture).from_pretrained(folder))
    has_tokenizer = os.path.isfile(os.path.join(folder, _TOKENIZER_CONFIG))
    with open(os.path.join(folder, IDENTITY_FILE)) as f:
        identity = json.load(f)["identity"]
    return LoadedRun(model, AutoTokenizer.from_pretrained(folder) if has_tokenizer else None, identity)
