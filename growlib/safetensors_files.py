"""Read and write safetensors checkpoints one tensor at a time, so a model larger than memory can be grown.

The safetensors library maps a whole file into memory and writes a shard from a dict holding all its tensors;
both make the memory a process touches grow with the checkpoint.  Here a tensor is read with one ``readinto``
from its byte range, and a shard's header (every name, dtype, shape and offset) is written first, from the
plan, then each tensor's bytes as it is produced and released.  The files are ordinary safetensors files and
HF's ``model.safetensors.index.json`` (``from_pretrained`` and ``safetensors.safe_open`` read them).

Format: an 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes), the data."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from growlib.errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: a header larger than this is no safetensors header (the library's own limit)
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie: its file, dtype, shape and byte range in that file."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: str) -> tuple[dict, int]:
    """(the header's tensor entries, where the data begins) of one safetensors file, checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{path} is not a safetensors file: {size} bytes")
        (header_bytes,) = struct.unpack("<Q", raw)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise InputError(f"{path} is not a safetensors file: its header claims {header_bytes} bytes")
        try:
            header = json.loads(f.read(header_bytes))
        except ValueError as error:
            raise InputError(f"{path} is not a safetensors file: its header is no JSON ({error})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, not an "
                         "object")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise InputError(f"{path} is not a safetensors file: the header's entry {key!r} lacks dtype, shape or "
                             "data_offsets")
    return header, 8 + header_bytes


def index_checkpoint(folder: str) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors checkpoint in ``folder`` (one file or HF's sharded index), by name."""
    single, index = os.path.join(folder, SINGLE_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError(f"{index} is no safetensors index: it needs a JSON object with a weight_map of "
                                 "tensor names to file names") from None
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise InputError(f"{index} names files that are not in {folder!r}: {missing}")
    elif os.path.isfile(single):
        files = [SINGLE_FILE]
    else:
        raise InputError(f"SRC {folder!r} holds no {SINGLE_FILE} or {INDEX_FILE}: streaming reads safetensors "
                         f"checkpoints only (save the model with save_pretrained(..., safe_serialization=True))")
    stored: dict[str, StoredTensor] = {}
    for name in files:
        path = os.path.join(folder, name)
        header, data_start = _read_header(path)
        file_size = os.path.getsize(path)
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            dtype = DTYPES.get(entry["dtype"])
            if dtype is None:
                raise InputError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which growlib does not read")
            shape = tuple(entry["shape"])
            expected = _numel(shape) * dtype.itemsize
            if not 0 <= start <= end or data_start + end > file_size or end - start != expected:
                raise InputError(f"{path}: tensor {key!r} claims bytes [{start}, {end}) for shape {shape} "
                                 f"{entry['dtype']} ({expected} bytes) in a file of {file_size} bytes")
            stored[key] = StoredTensor(path, dtype, shape, data_start + start, data_start + end)
    return stored


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    """One tensor, read from its byte range into fresh memory (no file mapping)."""
    buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
    with open(stored.path, "rb") as f:
        f.seek(stored.start)
        if stored.nbytes and f.readinto(buffer.numpy()) != stored.nbytes:
            raise InputError(f"{stored.path} ended inside a tensor: the file is truncated")
    return buffer.view(stored.dtype).reshape(stored.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype, known before its values are."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors split, in order, into shards of at most ``max_shard_bytes`` (a larger tensor alone in its own)."""
    if max_shard_bytes < 1:
        raise InputError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[PlannedTensor]] = [[]]
    filled = 0
    for tensor in tensors:
        if shards[-1] and filled + tensor.nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(tensor)
        filled += tensor.nbytes
    return shards


def write_checkpoint(folder: str, tensors: list[PlannedTensor], produce: Callable[[PlannedTensor], torch.Tensor],
                     max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` into ``folder`` as HF names them (one ``model.safetensors``, or numbered shards and the
    index), asking ``produce`` for each tensor's values only when its bytes are due; returns the files written.
    A produced tensor of another shape or dtype than planned raises: the header already promised them."""
    shards = plan_shards(tensors, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        _write_shard(os.path.join(folder, name), shard, produce)
    if len(shards) > 1:
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}, f,
                      indent=2)
    return names


def _write_shard(path: str, shard: list[PlannedTensor], produce: Callable[[PlannedTensor], torch.Tensor]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for tensor in shard:
        header[tensor.name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in shard:
            values = produce(tensor)
            if tuple(values.shape) != tensor.shape or values.dtype != tensor.dtype:
                raise ValueError(f"{tensor.name}: produced {tuple(values.shape)} {values.dtype}, planned "
                                 f"{tensor.shape} {tensor.dtype}")
            f.write(values.detach().contiguous().view(torch.uint8).reshape(-1).numpy().data)
            del values
