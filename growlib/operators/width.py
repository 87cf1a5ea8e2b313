"""Function-preserving width growth: Net2Net (random copies), bert2BERT's FPI and AKI, and HyperCloning (each
unit copied n times).

Heads are copied whole (head size kept) so every attention pattern survives; with grouped-query attention
whole groups (a key/value head and its query heads) are copied.  Input columns are divided by how often
their unit was copied, so linear layers compute the same function.  HyperCloning copies every unit equally
often and is exactly function-preserving, LayerNorm included; Net2Net's uneven copies change LayerNorm
statistics, so it is only approximately function-preserving in transformers (tests report its error).

bert2BERT's function-preserving initialisation (FPI, Chen et al. 2022) is Net2Net applied to a transformer
with one residual-stream map shared by every layer, whole heads copied and the copies chosen at random.  In
this framework that is exactly what ``net2net`` already does, so ``bert2bert_fpi`` is the same map (same
seed, same copies); the name exists so schedules can say which paper they follow.

bert2BERT's advanced knowledge initialisation (AKI) gives the new units of layer l the FPI rows of layer
l + 1 (the top layer keeps its own), which breaks the symmetry between a unit and its copy.  A row then
reads a different source layer than its neighbours, so AKI is not one width map per role times one depth
map: ``widen_map`` refuses it and ``widen`` runs FPI and then this layer-coupled row copy."""

from __future__ import annotations

import torch

from growlib import names
from growlib.models import adapter_for
from growlib.operators.common import copy_map, depth_identity, expand_heads, map_dims, map_model, resized_dims
from growlib.schema import GrowthMap, WIDTH_ROLES
from growlib.validate import require_int

WIDEN_METHODS = names.WIDTH_METHODS
#: Methods that are a single growth map (every method but the layer-coupled AKI).
WIDEN_MAP_METHODS = ("net2net", "bert2bert_fpi", "hypercloning")


def _unit_sources(old: int, new: int, method: str, generator: torch.Generator, what: str) -> list[int]:
    if new < old:
        raise ValueError(f"{what} must be >= the current {old} to widen, got {new}")
    if method == "hypercloning":
        if new % old:
            raise ValueError(f"hypercloning copies every unit equally often, so {what}={new} must be a "
                             f"multiple of {old}")
        return [j % old for j in range(new)]
    extra = torch.randint(0, old, (new - old,), generator=generator).tolist()
    return list(range(old)) + extra


def widen_map(source, hidden: int | None = None, intermediate: int | None = None,
              heads: int | None = None, method: str = "net2net", seed: int = 0) -> GrowthMap:
    """The width-growth map from ``source`` (a Schema or its dims) to the given sizes (None keeps a size; heads
    default to the hidden ratio).

    Under ``net2net`` / ``bert2bert_fpi`` the old units keep their positions and the new ones follow them."""
    dims = map_dims(source, "source")
    if method == "bert2bert_aki":
        raise ValueError("method='bert2bert_aki' takes the new units of layer l from layer l + 1, which is no "
                         "single growth map (one width map per role times one depth map): use "
                         "growlib.widen(..., method='bert2bert_aki'), which runs FPI and then that row copy")
    if method not in WIDEN_MAP_METHODS:
        raise ValueError(f"method must be one of {WIDEN_MAP_METHODS}, got {method!r}")
    hidden = dims["model"] if hidden is None else require_int("hidden", hidden)
    intermediate = dims["ffn"] if intermediate is None else require_int("intermediate", intermediate)
    for name, new, role in (("hidden", hidden, "model"), ("intermediate", intermediate, "ffn")):
        if new < dims[role]:
            raise ValueError(f"{name} must be >= the current {dims[role]} to widen, got {new}")
    if heads is None:
        if (hidden * dims["heads"]) % dims["model"]:
            raise ValueError(f"pass heads: hidden={hidden} is not a multiple of the head-to-hidden ratio "
                             f"{dims['heads']}/{dims['model']}")
        heads = hidden * dims["heads"] // dims["model"]
    require_int("heads", heads)
    group = dims["heads"] // dims["kv_heads"]
    if heads % group:
        raise ValueError(f"heads={heads} must be a multiple of the {group} query heads per key/value head")
    generator = torch.Generator().manual_seed(require_int("seed", seed, minimum=0))
    model_source = _unit_sources(dims["model"], hidden, method, generator, "hidden")
    ffn_source = _unit_sources(dims["ffn"], intermediate, method, generator, "intermediate")
    kv_heads = heads // group
    kv_source = _unit_sources(dims["kv_heads"], kv_heads, method, generator, "key/value heads")
    q_source = [kv * group + r for kv in kv_source for r in range(group)]
    hd = dims["head_dim"]
    widths = {
        "model": copy_map(model_source, dims["model"]),
        "ffn": copy_map(ffn_source, dims["ffn"]),
        "attn": copy_map(expand_heads(q_source, hd), dims["attn"]),
        "kv": copy_map(expand_heads(kv_source, hd), dims["kv"]),
    }
    target = resized_dims(dims, model=hidden, ffn=intermediate, heads=heads, kv_heads=kv_heads,
                          layers=dims["layers"])
    return GrowthMap(source_dims=dict(dims), target_dims=target, width=widths,
                     depth=depth_identity(dims["layers"]))


def widen(model: torch.nn.Module, hidden: int | None = None, intermediate: int | None = None,
          heads: int | None = None, method: str = "net2net", seed: int = 0) -> torch.nn.Module:
    """A wider HF model of the same class, grown from ``model`` (see module doc)."""
    if method not in WIDEN_METHODS:
        raise ValueError(f"method must be one of {WIDEN_METHODS}, got {method!r}")
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    fpi_method = "bert2bert_fpi" if method == "bert2bert_aki" else method
    grown = map_model(model, widen_map(dims, hidden, intermediate, heads, fpi_method, seed))
    if method == "bert2bert_aki":
        _take_new_rows_from_next_layer(adapter.schema(grown), dims)
    return grown


def _take_new_rows_from_next_layer(schema, small_dims: dict[str, int]) -> None:
    """AKI: in every layer below the top, the rows of new units (positions past the small model's size on a
    tensor's first, out-side axis) become the FPI rows of the layer above.  Layers are visited bottom-up, so
    layer l reads layer l + 1 before its own rows change."""
    with torch.no_grad():
        for layer in range(schema.num_layers - 1):
            for spec in schema.specs:
                if spec.layer != layer or spec.axes[0].role not in WIDTH_ROLES:
                    continue
                old = small_dims[spec.axes[0].role]
                upper = schema.tensor(spec.name, layer + 1)
                if spec.head_split:  # (heads, head_dim, ...): the new units are whole new heads
                    old //= small_dims["head_dim"]
                schema.tensor(spec.name, layer)[old:].copy_(upper[old:])
