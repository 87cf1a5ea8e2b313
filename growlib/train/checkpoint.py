"""A run's checkpoints on disk: one JSON header line (format, version, SHA-256 and length of the payload)
followed by the ``torch.save`` payload, written atomically (temporary file, fsync, rename) and verified before
anything is deserialised, so a damaged or foreign file is refused with a clear error and changes nothing.
Also how models travel in a checkpoint (their class, config and weights, rebuilt only as a model class growlib
supports) and the refusal of a checkpoint that belongs to another run.  What a run's checkpoint holds is
decided by the loop; this module only keeps it whole."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re

import torch

from growlib.train import faults
from growlib.train.runs import identity_differences

CHECKPOINT_FORMAT = "growlib-checkpoint"
#: Bumped whenever what a checkpoint holds changes: 3 added the run's identity (``run_schedule(identity=)``), 4 the
#: engine checkpoint (``engine``: the FSDP2 / DeepSpeed shards' tag and digests, the model's weights then there),
#: 5 kept models without weights (``state`` None: a sharded kept model, its shards in the engine checkpoint).
CHECKPOINT_VERSION = 5
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


def _rank_share(names: list[str]) -> tuple[list[str], int]:
    """This rank's share of ``names`` (every world-th one), and the number of ranks."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    return names[rank::world], world


def sync_engine_files(folder: str, tag: str) -> None:
    """fsync the files of an engine checkpoint (FSDP2's, DeepSpeed's), this rank its share, and the folder, so
    that growlib's checkpoint, written after them, never names files a crash could leave half-written."""
    root = os.path.join(folder, tag)
    share, _ = _rank_share(sorted(os.listdir(root)))
    for name in share:
        with open(os.path.join(root, name), "rb") as f:
            os.fsync(f.fileno())
    if hasattr(os, "O_DIRECTORY"):
        handle = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def engine_file_digests(folder: str, tag: str) -> dict[str, str]:
    """{file name: SHA-256} of every file of the engine checkpoint (FSDP2's or DeepSpeed's, every rank's shards)
    in ``folder/tag``, recorded in growlib's checkpoint so that a resumed run loads exactly them.  Under torchrun
    every rank hashes its share of the files and every rank gets them all (a collective: call it on every rank)."""
    root = os.path.join(folder, tag)
    share, world = _rank_share(sorted(os.listdir(root)) if os.path.isdir(root) else [])
    digests = {}
    for name in share:
        digest = hashlib.sha256()
        with open(os.path.join(root, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests[name] = digest.hexdigest()
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, digests)
        digests = {name: digest for part in parts for name, digest in part.items()}
    return dict(sorted(digests.items()))


def verified_engine_checkpoint(folder: str, record: dict) -> str:
    """The tag of the engine checkpoint ``record`` names, once every file it lists is found in ``folder/tag``
    with its SHA-256; ValueError naming the file otherwise (nothing is loaded).  Every rank decides alike."""
    tag = record["tag"]
    root = os.path.join(folder, tag)
    found = engine_file_digests(folder, tag)
    for name, digest in record["sha256"].items():
        if name not in found:
            raise ValueError(f"the engine checkpoint {root} lacks {name}, which the run's checkpoint names; "
                             "nothing was loaded (restore the folder, or start the run over)")
        if found[name] != digest:
            raise ValueError(f"the engine checkpoint file {os.path.join(root, name)} is corrupted (its SHA-256 "
                             "differs from the one the run's checkpoint recorded); nothing was loaded")
    return tag


#: the folders engine checkpoints are written to, ``engine/step<N>``
ENGINE_TAG = re.compile(r"step\d+")


def engine_tag(step: int) -> str:
    return f"step{step}"


def remove_engine_checkpoints(folder: str, keep: str) -> None:
    """Remove every engine checkpoint (``step<N>`` folder) in ``folder`` but ``keep``, the one growlib's
    checkpoint now names; other files (DeepSpeed's conversion scripts) stay."""
    import shutil

    for name in os.listdir(folder):
        if name != keep and ENGINE_TAG.fullmatch(name) and os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name))


def model_record(model: torch.nn.Module, weights: bool = True) -> dict:
    """What a checkpoint holds of a model: its class name (the HF class's, also for a model FSDP sharded), config
    and weights (None with ``weights=False``: a sharded engine's own checkpoint holds them)."""
    from growlib.models import adapter_of_class

    name = next((c.__name__ for c in type(model).__mro__ if adapter_of_class(c.__name__)), type(model).__name__)
    return {"class": name, "config": model.config.to_dict(), "state": model.state_dict() if weights else None}


def model_from_record(record: dict, like: torch.nn.Module, sharded: bool = False) -> torch.nn.Module:
    """Rebuild a checkpointed model of the same family as ``like`` (the schedule's initial model).  The class
    is looked up among the model classes growlib supports only: a checkpoint cannot name any other callable.
    ``sharded``: built as FSDP2 shards, never whole (its weights then load from the engine checkpoint)."""
    from growlib.models import adapter_of_class, supported_class_names

    adapter = adapter_of_class(record["class"])
    if adapter is None:
        raise ValueError(f"checkpoint model class {record['class']!r} is not one growlib supports "
                         f"({supported_class_names()})")
    cls = adapter.model_class(record["class"])
    config = type(like.config).from_dict(record["config"])
    if sharded:
        from growlib.sharded import build_sharded

        return build_sharded(cls, config, like)
    model = cls(config).to(next(like.parameters()).device)
    if record["state"] is not None:  # None: the engine's checkpoint restores the weights once it is built
        model.load_state_dict(record["state"], strict=True)
    if getattr(like, "loss_type", None):  # e.g. GPT-2's, which transformers cannot infer from its class name
        model.loss_type = like.loss_type
    return model


def require_same_run(checkpoint: dict, identity: dict, path: str) -> None:
    """Refuse (ValueError naming what differs) a checkpoint whose recorded identity is not ``identity``, the
    ``{"schedule", "stages", "config", "run"}`` of the run about to resume from it."""
    if checkpoint.get("identity") == identity:
        return
    recorded = checkpoint.get("identity") or {}
    differences = identity_differences(
        {**recorded.get("run", {}), "stages": recorded.get("stages"), "schedule": recorded.get("schedule"),
         "training": recorded.get("config")},
        {**identity["run"], "stages": identity["stages"], "schedule": identity["schedule"],
         "training": identity["config"]})
    raise ValueError(f"checkpoint {path} belongs to another run: {'; '.join(differences)}; resume "
                     "with the run's own schedule, steps and settings")
