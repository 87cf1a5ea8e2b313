"""Input checks shared by the frozen layers' forward-only ops (add_norm, the activations, rope_split_qkv)."""

from __future__ import annotations

import torch

from growlib.kernels.backend import resolve_backend

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_floating_tensor(name: str, t, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}: all tensors must share a device")


def check_vector(name: str, t, size: int, device: torch.device, what: str) -> torch.Tensor | None:
    """An optional per-feature vector (norm weight, bias) of length ``size``, made contiguous."""
    if t is None:
        return None
    check_floating_tensor(name, t, device)
    if tuple(t.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},) ({what}), got {tuple(t.shape)}")
    return t.contiguous()


def check_forward_only(op: str, **tensors) -> None:
    """These ops have no backward: refuse to silently cut a graph that autograd is recording."""
    if torch.is_grad_enabled():
        needing = [name for name, t in tensors.items() if t is not None and t.requires_grad]
        if needing:
            raise RuntimeError(f"{op} is forward-only (it has no backward), but {', '.join(needing)} requires grad: "
                               "call it under torch.no_grad() / torch.inference_mode(), or detach the inputs")


def fused_backend(x: torch.Tensor, name: str) -> str:
    backend = resolve_backend(x.device)
    if backend == "triton" and x.dtype not in FUSED_DTYPES:
        raise TypeError(f"the Triton backend supports {FUSED_DTYPES} for {name}, got {x.dtype}; use backend "
                        "'torch' for other dtypes")
    return backend


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, last axis) with contiguous columns: a view whenever the layout allows one."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def check_last_axis(name: str, x) -> int:
    check_floating_tensor(name, x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last axis, got shape {tuple(x.shape)}")
    return x.shape[-1]
