"""growlib: grow transformers from smaller ones, or train them through coarser versions of themselves.

Every operator is a linear map over a parameter schema (width maps per axis role, depth maps per tensor
name); the maps run as fused Triton kernels on the GPU and as PyTorch references on the CPU.

The names below are imported on first use, so that ``growlib --help`` and ``import growlib.cli`` do not pay
for torch and transformers."""

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_HOMES = {
    "apply_map": "growlib.apply",
    "FrozenStack": "growlib.frozen", "freeze_forward": "growlib.frozen",
    "grow_checkpoint": "growlib.grow", "GrowReport": "growlib.grow",
    "schema_of": "growlib.operators.common",
    "grow_depth": "growlib.operators.depth", "grow_depth_map": "growlib.operators.depth",
    "prolong_": "growlib.operators.depth", "prolong_map": "growlib.operators.depth",
    "restrict": "growlib.operators.depth", "restrict_map": "growlib.operators.depth",
    "LiGO": "growlib.operators.ligo",
    "load_run": "growlib.train.export", "LoadedRun": "growlib.train.export",
    "coalesce": "growlib.operators.multilevel", "coalesce_map": "growlib.operators.multilevel",
    "decoalesce": "growlib.operators.multilevel", "decoalesce_map": "growlib.operators.multilevel",
    "interpolate_": "growlib.operators.multilevel",
    "widen": "growlib.operators.width", "widen_map": "growlib.operators.width",
    "current_backend": "growlib.kernels.backend", "use_backend": "growlib.kernels.backend",
    "structured_map_": "growlib.kernels.structured_map",
    "kron_expand": "growlib.kernels.kron_expand", "kron_expand_vector": "growlib.kernels.kron_expand",
    "add_norm": "growlib.kernels.frozen.add_norm", "rope_split_qkv": "growlib.kernels.frozen.rope_split_qkv",
    "bias_activation": "growlib.kernels.frozen.activation", "gated_activation": "growlib.kernels.frozen.activation",
    "map_optimizer_state": "growlib.optim",
    "Axis": "growlib.schema", "DepthMap": "growlib.schema", "GrowthMap": "growlib.schema", "Schema": "growlib.schema",
    "SparseRows": "growlib.schema", "WidthMap": "growlib.schema",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'growlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
