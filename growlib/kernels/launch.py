"""What the launchers need to know about the GPU, and a record of what they launched.

* ``device_capability``: a CUDA device's compute capability, queried on first use (never at import time, since
  there may be no GPU, and the interpreter has no capability at all: it gives None off CUDA).
* ``MAX_SHARED_BYTES``: the shared memory one thread block may use, per capability, so that a launch
  configuration is chosen as a pure function of (capability, dtype, shape) and can be checked for an A100
  (sm_80, 163 KB) as well as a Hopper part (sm_90, 227 KB) on a machine without either.
* ``ceil_div``: grid and tile arithmetic on the host (``triton.cdiv`` is a constexpr function in recent Tritons,
  and a host call of it costs ~2 us under triton 3.9: 404 of them for a BERT-Large structured map).
* ``recorded`` / ``note``: the benchmarks write the configuration each Triton launch really used next to its
  timing, rather than a copy of the constants that could drift from the launchers.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

KB = 1024
# Dynamic shared memory per thread block (the opt-in maximum Triton requests), from the CUDA C++ Programming
# Guide's "Technical Specifications per Compute Capability".
MAX_SHARED_BYTES = {
    (7, 0): 96 * KB, (7, 2): 96 * KB, (7, 5): 64 * KB,
    (8, 0): 163 * KB, (8, 6): 99 * KB, (8, 7): 163 * KB, (8, 9): 99 * KB,
    (9, 0): 227 * KB,
    (10, 0): 227 * KB, (12, 0): 99 * KB,
}
DEFAULT_SHARED_BYTES = 48 * KB  # what every CUDA GPU gives a block without opting in


def ceil_div(numerator: int, denominator: int) -> int:
    """The smallest integer at least numerator / denominator, for positive denominators."""
    return -(-numerator // denominator)


def max_shared_bytes(capability: tuple[int, int]) -> int:
    """Shared memory a block may use on a device of ``capability``; for a capability missing from the table,
    the smallest of its major version's (48 KB when the major version is unknown too)."""
    if capability in MAX_SHARED_BYTES:
        return MAX_SHARED_BYTES[capability]
    same_major = [size for (major, _), size in MAX_SHARED_BYTES.items() if major == capability[0]]
    return min(same_major) if same_major else DEFAULT_SHARED_BYTES


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, cached per device; None for any other device (Triton's interpreter)."""
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------------------
# Launch records
# ----------------------------------------------------------------------------------------------------------

_recorders: list[list[dict]] = []


@contextlib.contextmanager
def recorded() -> Iterator[list[dict]]:
    """Collect a dict per Triton launch made inside the block: the kernel's name and its launch configuration."""
    records: list[dict] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.remove(records)


def note(kernel: str, **config) -> None:
    """Called by every launcher just before it launches; costs one list check when nothing records."""
    for records in _recorders:
        records.append({"kernel": kernel, **config})


def summarize(records: list[dict]) -> str:
    """The distinct configurations in ``records``, in order of first use, each with its launch count:
    ``kron_gemm(BLOCK_M=128,BLOCK_N=128,...) x3; ...`` (one CSV cell)."""
    counts: dict[str, int] = {}
    for record in records:
        settings = ",".join(f"{key}={value}" for key, value in record.items() if key != "kernel")
        label = f"{record['kernel']}({settings})"
        counts[label] = counts.get(label, 0) + 1
    return "; ".join(f"{label} x{count}" for label, count in counts.items())
