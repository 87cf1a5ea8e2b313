"""The multi-level framework's operators (Zou et al., ICLR 2024): coalesce, de-coalesce, interpolate.

Coalescing merges neuron j with neuron j + d/w of every role (for heads: head i with head i + H/w,
dimension-wise, head size kept) and each group of ``depth`` layers; de-coalescing (copy rows, copy-and-divide
columns, copy layers) is its right inverse: ``coalesce(decoalesce(c)) == c`` exactly, while
``decoalesce(coalesce(m))`` keeps only what the merged units had in common.  Unlike the original code,
de-coalescing a pre-LN model with tied embeddings is function-preserving: the embedding is copied unscaled and
the factor 1/w is folded into the norm feeding the tied head (see models.base.head_norm_side)."""

from __future__ import annotations

import torch

from growlib.models import adapter_for
from growlib.operators.common import (RESIZABLE, copy_map, depth_copy, map_dims, map_into, map_model, merge_map,
                                      require_same_device, resized_dims)
from growlib.schema import DepthMap, GrowthMap
from growlib.validate import require_fraction, require_int

DEPTH_PAIRINGS = ("adjacent", "stack")


def _check_pairing(depth_pairing: str) -> None:
    if depth_pairing not in DEPTH_PAIRINGS:
        raise ValueError(f"depth_pairing must be one of {DEPTH_PAIRINGS}, got {depth_pairing!r}")


def _fine_layer_groups(coarse_layers: int, depth: int, depth_pairing: str) -> list[list[int]]:
    """Which fine layers merge into each coarse layer."""
    if depth_pairing == "adjacent":
        return [[i * depth + m for m in range(depth)] for i in range(coarse_layers)]
    return [[i + m * coarse_layers for m in range(depth)] for i in range(coarse_layers)]


def coalesce_map(source, width: int = 2, depth: int = 2, depth_pairing: str = "adjacent") -> GrowthMap:
    """The coalescing map from ``source`` (a Schema or its dims) to a model ``width`` times narrower and
    ``depth`` times shallower."""
    dims = map_dims(source, "source")
    require_int("width", width)
    require_int("depth", depth)
    _check_pairing(depth_pairing)
    for role, label in (("model", "hidden size"), ("ffn", "intermediate size"), ("heads", "attention heads"),
                        ("kv_heads", "key/value heads")):
        if dims[role] % width:
            raise ValueError(f"width={width} must divide the {label} ({role}={dims[role]})")
    if dims["layers"] % depth:
        raise ValueError(f"depth={depth} must divide the number of layers ({dims['layers']}): coalescing "
                         f"merges groups of {depth} layers")
    target = resized_dims(dims, model=dims["model"] // width, ffn=dims["ffn"] // width,
                          heads=dims["heads"] // width, kv_heads=dims["kv_heads"] // width,
                          layers=dims["layers"] // depth)
    widths = {}
    for role in ("model", "ffn", "attn", "kv"):
        small = target[role]
        widths[role] = merge_map([[i + m * small for m in range(width)] for i in range(small)], dims[role])
    groups = _fine_layer_groups(target["layers"], depth, depth_pairing)
    depth_map = DepthMap(tuple(tuple((j, 1.0 / depth) for j in g) for g in groups), dims["layers"])
    return GrowthMap(source_dims=dict(dims), target_dims=target, width=widths, depth=depth_map)


def decoalesce_map(coarse, fine, depth_pairing: str = "adjacent") -> GrowthMap:
    """The de-coalescing map from ``coarse`` up to ``fine`` (each a Schema or its dims): a right inverse of
    coalescing (coalescing its result gives the coarse model back), not a left one (coalescing loses what the
    merged units did not share)."""
    coarse_dims, fine_dims = map_dims(coarse, "coarse"), map_dims(fine, "fine")
    _check_pairing(depth_pairing)
    if coarse_dims["head_dim"] != fine_dims["head_dim"]:
        raise ValueError(f"like has head size {fine_dims['head_dim']} but the coarse model has "
                         f"{coarse_dims['head_dim']}: coalescing keeps the head size")
    widths_factor = {r: fine_dims[r] / coarse_dims[r] for r in ("model", "ffn", "heads", "kv_heads")}
    factors = set(widths_factor.values())
    if len(factors) != 1 or not float(next(iter(factors))).is_integer():
        raise ValueError(f"like must be an integer multiple of the coarse model in every width "
                         f"(hidden, intermediate, heads, kv heads); got ratios {widths_factor}")
    depth_ratio = fine_dims["layers"] / coarse_dims["layers"]
    if not depth_ratio.is_integer():
        raise ValueError(f"like has {fine_dims['layers']} layers, not an integer multiple of the coarse "
                         f"model's {coarse_dims['layers']}")
    depth = int(depth_ratio)
    widths = {}
    for role in ("model", "ffn", "attn", "kv"):
        small = coarse_dims[role]
        widths[role] = copy_map([j % small for j in range(fine_dims[role])], small)
    coarse_layers = coarse_dims["layers"]
    if depth_pairing == "adjacent":
        source_layer = [l // depth for l in range(fine_dims["layers"])]
    else:
        source_layer = [l % coarse_layers for l in range(fine_dims["layers"])]
    target = resized_dims(coarse_dims, model=fine_dims["model"], ffn=fine_dims["ffn"], heads=fine_dims["heads"],
                          kv_heads=fine_dims["kv_heads"], layers=fine_dims["layers"])
    return GrowthMap(source_dims=dict(coarse_dims), target_dims=target, width=widths,
                     depth=depth_copy(source_layer, coarse_layers))


def coalesce(model: torch.nn.Module, width: int = 2, depth: int = 2,
             depth_pairing: str = "adjacent") -> torch.nn.Module:
    """A new HF model of the same class, ``width`` times narrower and ``depth`` times shallower.

    Rows of merged neurons are averaged, merged input columns summed, norms averaged; ``adjacent`` pairs
    layers (2i, 2i+1), ``stack`` pairs (i, i + L/2)."""
    dims = adapter_for(model).dims(model.config)
    return map_model(model, coalesce_map(dims, width, depth, depth_pairing))


def _dims_of_like(adapter, like, coarse_dims: dict[str, int]) -> dict[str, int]:
    """The sizes ``like`` asks for; only the resizable ones may differ from the coarse model's (vocabulary,
    positions, ... are kept)."""
    if isinstance(like, torch.nn.Module):
        try:
            adapter_for(like)
        except TypeError:
            raise TypeError(f"like must be a {adapter.family} model or config, got {type(like).__name__}") from None
    config = like.config if isinstance(like, torch.nn.Module) else like
    if isinstance(like, torch.nn.Module) and adapter_for(like) is not adapter:
        raise ValueError(f"like is a {type(like).__name__}, not a model of the coarse model's family "
                         f"({adapter.family})")
    try:
        dims = adapter.dims(config)
    except AttributeError as err:
        raise ValueError(f"like must be a {adapter.family} model or config, got {type(config).__name__}") from err
    kept = {name: (dims[name], coarse_dims[name]) for name in dims
            if name not in RESIZABLE and name in coarse_dims and dims[name] != coarse_dims[name]}
    if kept:
        raise ValueError("like asks for sizes de-coalescing does not change (it keeps the coarse model's): "
                         + ", ".join(f"{name} {want} (the coarse model has {have})"
                                     for name, (want, have) in kept.items()))
    return dims


def decoalesce(coarse: torch.nn.Module, like, depth_pairing: str = "adjacent") -> torch.nn.Module:
    """A new HF model shaped like ``like`` (a model or config), de-coalesced from ``coarse``.

    Rows are copied, columns copied and divided, layers copied: a right inverse of ``coalesce``
    (``coalesce(decoalesce(c)) == c`` exactly, not the other way round), and width-only de-coalescing
    preserves the model's function."""
    adapter = adapter_for(coarse, "coarse")
    coarse_dims = adapter.dims(coarse.config)
    gmap = decoalesce_map(coarse_dims, _dims_of_like(adapter, like, coarse_dims), depth_pairing)
    return map_model(coarse, gmap)


def interpolate_(fine: torch.nn.Module, coarse: torch.nn.Module, alpha: float,
                 depth_pairing: str = "adjacent") -> torch.nn.Module:
    """In place ``fine <- (1 - alpha) * fine + alpha * decoalesce(coarse)`` in one fused pass; returns ``fine``.

    The de-coalesced model is never materialised: de-coalescing is the kernel's gather, the blend its epilogue.
    The end points are exact, whatever the other side holds: ``alpha=0`` leaves ``fine`` bit-identical (even
    where ``coarse`` holds NaN), ``alpha=1`` overwrites it with ``decoalesce(coarse)`` (even where ``fine``
    holds inf: 0 * inf would be NaN in a blend)."""
    require_fraction("alpha", alpha, allow_zero=True)
    adapter = adapter_for(fine, "fine")
    if adapter_for(coarse, "coarse") is not adapter:
        raise ValueError(f"coarse is a {type(coarse).__name__} but fine is a {type(fine).__name__}")
    if coarse is fine:
        raise ValueError("fine and coarse are the same model: interpolate_ blends a coarse model into another one")
    require_same_device(fine=fine, coarse=coarse)
    gmap = decoalesce_map(adapter.dims(coarse.config), adapter.dims(fine.config), depth_pairing)
    if alpha == 0.0:
        return fine
    map_into(gmap, coarse, fine, alpha=None if alpha == 1.0 else float(alpha))
    return fine
