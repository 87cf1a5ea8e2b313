"""Building blocks shared by the operators: unit copy / merge maps, head-structured expansion, running a map
from one HF model into another."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from growlib.apply import apply_map
from growlib.models import adapter_for
from growlib.schema import DepthMap, GrowthMap, Schema, SparseRows, WidthMap
from growlib.sharded import is_sharded, map_across_shards, new_sharded_model


def schema_of(model: torch.nn.Module) -> Schema:
    """The parameter schema of a supported Hugging Face model (views into its parameters)."""
    return adapter_for(model).schema(model)


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer layers (``transformer.h``, ``model.layers``, ``encoder.layer``, ...): the
    first ModuleList whose every entry is one of the family's layers.  Found from the modules alone, so it also
    works on a model whose parameters FSDP has sharded."""
    adapter = adapter_for(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(map(adapter.is_layer, module)):
            return module
    raise TypeError(f"found no list of {adapter.layer_class_name} layers in {type(model).__name__}")


def copy_map(source_of: Sequence[int], n_in: int) -> WidthMap:
    """Unit i of the wider role copies unit ``source_of[i]``.

    Out side (E): rows are copied.  In side (F): each copy is divided by how often its unit was copied, so
    ``W' (E x) = E (W x)``: the grown network computes the same function on copied activations."""
    src = torch.as_tensor(list(source_of), dtype=torch.int64)
    counts = torch.bincount(src, minlength=n_in).to(torch.float64)
    if (counts == 0).any():
        raise ValueError("copy_map: every source unit must be copied at least once")
    ones = torch.ones(len(src), 1, dtype=torch.float64)
    return WidthMap(out_map=SparseRows(src.unsqueeze(1), ones, n_in),
                    in_map=SparseRows(src.unsqueeze(1), (1.0 / counts[src]).unsqueeze(1), n_in))


def merge_map(groups: Sequence[Sequence[int]], n_in: int) -> WidthMap:
    """Unit i of the narrower role merges the units ``groups[i]``: out side averages them, in side sums them.

    This is the exact left inverse of ``copy_map`` when every unit is copied equally often."""
    k = len(groups[0])
    index = torch.tensor([list(g) for g in groups], dtype=torch.int64)
    avg = torch.full((len(groups), k), 1.0 / k, dtype=torch.float64)
    return WidthMap(out_map=SparseRows(index, avg, n_in), in_map=SparseRows(index, avg * k, n_in))


def expand_heads(head_source_of: Sequence[int], head_dim: int) -> list[int]:
    """A per-head copy map as a per-unit one (head-major layout, head size kept)."""
    return [h * head_dim + t for h in head_source_of for t in range(head_dim)]


def depth_copy(source_of: Sequence[int], n_in: int) -> DepthMap:
    """Target layer l copies source layer ``source_of[l]``."""
    return DepthMap(tuple(((j, 1.0),) for j in source_of), n_in)


def depth_identity(layers: int) -> DepthMap:
    return depth_copy(range(layers), layers)


def require_same_device(**models: torch.nn.Module) -> None:
    """An in-place operator reads one model and writes another: both must live on one device."""
    devices = {name: next(model.parameters()).device for name, model in models.items()}
    if len(set(devices.values())) > 1:
        found = " but ".join(f"{name} is on {device}" for name, device in devices.items())
        raise ValueError(f"{found}: move them to one device first")


def map_model(model: torch.nn.Module, gmap: GrowthMap) -> torch.nn.Module:
    """A new model of ``model``'s class at ``gmap.target_dims``, its parameters computed by the map.

    Frozen stays frozen: a parameter of the new model is frozen when every parameter it is computed from
    was (so growing or coalescing a partly frozen model does not silently make it all trainable again).  A
    model FSDP2 shards gives a new model sharded alike, each rank building its own shard."""
    adapter = adapter_for(model)
    source_schema = adapter.schema(model)

    def carry_requires_grad(new: torch.nn.Module) -> None:
        _carry_requires_grad(model, source_schema, new, adapter.schema(new), gmap)

    if is_sharded(model):  # each rank builds its shard of the new model, frozen marked before sharding
        target = new_sharded_model(adapter, model, gmap.target_dims, set_trainable=carry_requires_grad)
    else:
        target = adapter.new_model(model, gmap.target_dims, initialise=False)  # the map writes every parameter
        carry_requires_grad(target)
    map_into(gmap, model, target)
    return target


def map_into(gmap: GrowthMap, source: torch.nn.Module, target: torch.nn.Module, *,
             alpha: float | None = None) -> None:
    """Write ``target``'s parameters in place from ``source``'s through ``gmap`` (with ``alpha``: blend them in,
    growlib.apply_map): all at once, or, where either model is sharded by FSDP2, one parameter at a time, each
    rank writing its shard (growlib.sharded)."""
    if is_sharded(source) or is_sharded(target):
        map_across_shards(gmap, source, target, alpha=alpha)
    else:
        adapter = adapter_for(target)
        apply_map(gmap, adapter.schema(source), adapter.schema(target), alpha=alpha)


def _carry_requires_grad(source: torch.nn.Module, source_schema, target: torch.nn.Module, target_schema,
                         gmap: GrowthMap) -> None:
    source_trainable = {name: p.requires_grad for name, p in source.named_parameters(remove_duplicate=False)}
    if all(source_trainable.values()):
        return
    by_key = {spec.key: spec.source for spec in source_schema.specs}
    trainable: dict[str, bool] = {}
    for spec in target_schema.specs:
        row = None if spec.layer is None else gmap.depth_for(spec.name).rows[spec.layer]
        if spec.layer is not None and row is None:
            computed = True  # a layer the map leaves freshly initialised
        else:
            sources = [by_key[spec.key]] if row is None else [by_key[(spec.name, j)] for j, _ in row]
            computed = any(source_trainable[s] for s in sources)
        trainable[spec.source] = trainable.get(spec.source, False) or computed
    for name, parameter in target.named_parameters(remove_duplicate=False):
        if name in trainable:
            parameter.requires_grad_(trainable[name])


#: The sizes an operator may change (``resized_dims`` gives them all); every map builder reads them.
RESIZABLE = ("model", "ffn", "heads", "kv_heads", "head_dim", "attn", "kv", "layers")


def resized_dims(dims: dict[str, int], *, model: int, ffn: int, heads: int, kv_heads: int,
                 layers: int) -> dict[str, int]:
    """The resizable sizes of a schema after an operator, head size kept."""
    head_dim = dims["head_dim"]
    return {"model": model, "ffn": ffn, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "attn": heads * head_dim, "kv": kv_heads * head_dim, "layers": layers}


def map_dims(shape, name: str) -> dict[str, int]:
    """The sizes a map builder works from, given a Schema or its ``dims`` dict: a growth map depends on sizes
    only, so every builder takes either."""
    if isinstance(shape, Schema):
        return dict(shape.dims)
    if not isinstance(shape, Mapping):
        raise TypeError(f"{name} must be a growlib.Schema or its dims dict (growlib.schema_of(model) or "
                        f"growlib.schema_of(model).dims), got {type(shape).__name__}")
    missing = [size for size in RESIZABLE if size not in shape]
    if missing:
        raise ValueError(f"{name} must be a Schema's dims dict, holding the sizes {list(RESIZABLE)}; missing "
                         f"{missing}")
    return dict(shape)
