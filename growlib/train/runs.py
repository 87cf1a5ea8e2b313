"""Run folders a user can trust: a run has an identity, a folder holds one run, one process trains in it.

A run folder (``--out`` of ``growlib train``, ``OUT/<schedule>-seed<n>`` under ``compare``) holds:

* ``run.json``: the run's identity -- every setting that changes what is trained (model family and size,
  vocabulary, a fingerprint of the tokenized data, schedule and its options, budget, training settings,
  seed, processes, device, growlib version and checkpoint format).  Resuming with any of them different is
  refused, naming the setting and both values.
* ``checkpoint.pt`` and ``metrics.jsonl``: never deleted implicitly.  Starting a fresh run where another run's
  files lie is refused unless the caller asks to ``overwrite``.
* ``model/``: the finished run's model and tokenizer as a Hugging Face folder (growlib.train.export), written
  whole or not at all; replaced when the run is started over.
* ``.lock``: an advisory lock (``fcntl.flock``) held while a process trains there; the kernel drops it when
  the process dies, so a killed run never leaves a stale lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

IDENTITY_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
#: the exported model's folder (growlib.train.export writes it)
EXPORT_DIR = "model"
#: the engine checkpoints of FSDP2 and DeepSpeed (each rank's shards of model and optimizer state), beside
#: growlib's checkpoint
ENGINE_DIR = "engine"
#: what makes a folder hold a run
RUN_FILES = (IDENTITY_FILE, CHECKPOINT_FILE, METRICS_FILE, EXPORT_DIR, ENGINE_DIR)

#: How each identity field is set on the command line, for messages a user can act on.
SETTING_NAMES = {
    "growlib": "growlib version", "checkpoint_version": "checkpoint format version", "model": "--model",
    "size": "--size", "vocab_size": "--vocab-size", "data_fingerprint": "--data (the tokenized data)",
    "schedule": "--schedule", "schedule_args": "--schedule-args", "steps": "--steps / --tokens",
    "seed": "--seed", "processes": "number of processes (torchrun --nproc_per_node)", "device": "device",
    "deepspeed": "--deepspeed", "fsdp": "--fsdp", "training.lr": "--lr", "training.warmup_steps": "--warmup",
    "training.batch_size": "--batch-size", "training.seq_len": "--seq-len", "training.eval_every": "--eval-every",
    "training.eval_batches": "--eval-batches", "training.lr_schedule": "--lr-schedule",
    "init_from": "--init-from (the checkpoint's files)", "tokenizer": "--tokenizer (the tokenizer's files)",
    "target_config": "--target-config",
}


def folder_digest(folder: str, names: tuple[str, ...] | None = None) -> str:
    """SHA-256 over a folder's files (only those of ``names`` that are there, when given), by name and content:
    the same folder rewritten with other weights has another digest.  Remembered per (path, size, mtime) of
    every file, so a comparison's many runs read a large checkpoint once."""
    folder = os.path.abspath(folder)
    files = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))
                   and (names is None or name in names) and not name.startswith("."))
    stats = tuple((name, info.st_size, info.st_mtime_ns)
                  for name, info in ((name, os.stat(os.path.join(folder, name))) for name in files))
    return _digest(folder, stats)


@functools.lru_cache(maxsize=16)
def _digest(folder: str, stats: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stats:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key in ("training",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_differences(recorded: dict, requested: dict) -> list[str]:
    """One phrase per setting that differs: its flag (or name), the run's value and the requested one."""
    old, new = _flatten(recorded), _flatten(requested)
    differences = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            name = SETTING_NAMES.get(key, f"TrainConfig.{key.split('.', 1)[1]}" if key.startswith("training.") else key)
            differences.append(f"{name}: the run has {old.get(key, '(unset)')!r}, this command has "
                               f"{new.get(key, '(unset)')!r}")
    return differences


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (another run's files, nothing to resume, a different identity)."""


class RunFolderBusy(RunFolderError):
    """Another live process trains in this run folder."""


@dataclass
class FolderState:
    """What a run folder holds, read without changing it."""

    identity: dict | None  # run.json's identity, None if there is no run.json
    has_checkpoint: bool
    has_metrics: bool
    has_export: bool = False  # model/: a finished run's exported model

    @property
    def empty(self) -> bool:
        return self.identity is None and not self.has_checkpoint and not self.has_metrics and not self.has_export


class RunFolder:
    """One run's folder.  ``with folder.locked():`` holds its lock; ``start`` checks and records the identity."""

    def __init__(self, path: str):
        self.path = path
        self.checkpoint = os.path.join(path, CHECKPOINT_FILE)
        self.metrics = os.path.join(path, METRICS_FILE)
        self.identity_file = os.path.join(path, IDENTITY_FILE)

    def state(self) -> FolderState:
        identity = None
        if os.path.exists(self.identity_file):
            try:
                with open(self.identity_file) as f:
                    identity = json.load(f)["identity"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise RunFolderError(f"run folder {self.path}: {IDENTITY_FILE} is unreadable ({error}); it is not a "
                                     "run growlib can resume: use another folder, or --overwrite") from None
        return FolderState(identity, os.path.exists(self.checkpoint), os.path.exists(self.metrics),
                           os.path.exists(os.path.join(self.path, EXPORT_DIR)))

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock (created if needed); RunFolderBusy if a live process holds it."""
        os.makedirs(self.path, exist_ok=True)
        handle = open(os.path.join(self.path, LOCK_FILE), "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunFolderBusy(f"run folder {self.path} is in use by another growlib process (pid {holder}): "
                                    "one process per run folder; wait for it, or use another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield self
        finally:
            handle.close()  # closing releases the lock

    def start(self, identity: dict, *, resume: bool, overwrite: bool = False, write: bool = True) -> bool:
        """Check the folder against this run and record its identity; returns True when a checkpoint is to be
        resumed.  Hold ``locked()`` around it.  ``resume``: the folder must hold this very run (same identity)
        with a checkpoint.  Otherwise the folder must hold no run, unless ``overwrite`` deletes it.
        ``write=False`` checks only (the other ranks of a distributed run)."""
        state = self.state()
        if resume and overwrite:
            raise RunFolderError("resume and overwrite exclude each other: --resume continues the run in the "
                                 "folder, --overwrite deletes it")
        if resume:
            self._check_resumable(state, identity)
        elif not state.empty:
            if not overwrite:
                held = [name for name in RUN_FILES if os.path.exists(os.path.join(self.path, name))]
                raise RunFolderError(f"run folder {self.path} already holds a run ({', '.join(held)}): --resume "
                                     "continues it, --overwrite deletes it and starts over, or choose another --out")
            if write:
                for name in RUN_FILES:
                    path = os.path.join(self.path, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
        if write:
            for stale in glob.glob(glob.escape(self.path) + os.sep + "*.tmp-*"):
                os.remove(stale)  # half-written files of a process that died (we hold the lock: none is live)
            _write_json_atomically(self.identity_file, {"identity": identity})
        return resume

    def _check_resumable(self, state: FolderState, identity: dict) -> None:
        if state.identity is None:
            if state.has_checkpoint:
                raise RunFolderError(f"cannot resume {self.path}: its checkpoint has no {IDENTITY_FILE} beside it "
                                     "(written by an earlier growlib, or copied in), so what it trained cannot be "
                                     "checked; start over with --overwrite")
            raise RunFolderError(f"nothing to resume in {self.path}: it holds no run (a mistyped --out?); drop "
                                 "--resume to start one")
        differences = identity_differences(state.identity, identity)
        if differences:
            raise RunFolderError(f"cannot resume {self.path}, another run than this command's: "
                                 + "; ".join(differences)
                                 + ". Resume with the run's own settings, or start over with --overwrite")
        if not state.has_checkpoint:
            raise RunFolderError(f"nothing to resume in {self.path}: the run stopped before its first checkpoint; "
                                 "start it over with --overwrite (its metrics.jsonl is replaced)")


def _write_json_atomically(path: str, payload: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
