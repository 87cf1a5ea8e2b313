"""Maps between models that FSDP2 shards, without gathering either model whole.

FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every parameter of a layer by rows across the ranks (a
DTensor placed ``Shard(0)``).  A growth map computes each parameter of the new model from the parameters of
the same name in the layers its depth row reads, so every rank can build its own shard of the new model one
parameter at a time: gather that parameter's sources (``full_tensor``, the same collective on every rank, in
the same order), run ``apply_map`` on schemas holding just those tensors (the arithmetic of the whole-model
operators, so the result is bit-identical to theirs), keep this rank's rows, free the rest.  A rank never
holds more than one parameter's sources and result whole beside its shards: the *shard-local* transition.
The new model itself is built with its parameters on the meta device and sharded before they get memory.

The operators (``map_model``, ``interpolate_``, ``prolong_``) take this path when either model is sharded;
``shard_model`` is the sharding the training loop's FSDP2 backend uses, so a model built here is sharded as
that backend would have sharded it."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

from growlib.apply import apply_map_to_slots, depth_sources, slots_by_parameter, source_slots, uncounted_maps
from growlib.schema import GrowthMap


def _fsdp_module_class() -> type | None:
    """FSDP2's mark of a sharded module (``fully_shard`` makes the module's class a subclass of it); None while
    torch.distributed.fsdp was never imported, when nothing can be sharded."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return None if fsdp is None else fsdp.FSDPModule


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 has sharded ``model``."""
    marker = _fsdp_module_class()
    return marker is not None and isinstance(model, marker)


def unsharded_class(model: torch.nn.Module) -> type:
    """``model``'s class, or for a model FSDP2 sharded, the class ``fully_shard`` made its class from."""
    marker = _fsdp_module_class()
    return next(c for c in type(model).__mro__ if marker is None or not issubclass(c, marker))


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter FSDP2 shards: each rank holds its rows of it)."""
    return hasattr(tensor, "full_tensor")


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole on this rank: gathered from every rank if it is sharded (a collective)."""
    return tensor.full_tensor() if is_sharded_tensor(tensor) else tensor


def shard_model(model: torch.nn.Module, *, on_cuda: bool, whole_layers: tuple = ()) -> None:
    """Shard ``model`` in place as growlib's FSDP2 training does: every layer, then the rest at the root; bf16
    compute with fp32 gradient reduction on the GPU.  ``whole_layers`` stay whole on every rank (MSLT's
    forward-only stack reads their weights directly)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from growlib.operators.common import layer_stack

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_cuda
              else MixedPrecisionPolicy())
    whole = {id(layer) for layer in whole_layers}
    for layer in layer_stack(model):
        if id(layer) not in whole:
            fully_shard(layer, mp_policy=policy)
    ignored = {p for layer in whole_layers for p in layer.parameters()}
    fully_shard(model, mp_policy=policy, ignored_params=ignored or None)


def reshard(model: torch.nn.Module) -> None:
    """Free the whole parameters FSDP2 keeps after a forward (the root's, after evaluation), so that every
    parameter is its shard again."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put each parameter on the meta device as it is registered (one parameter's memory
    at a time), their buffers where they were made: a model to shard before its weights get memory."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        register(module, name, parameter)
        if parameter is not None and not parameter.is_meta:  # a meta one may be tied to another: kept as it is
            module._parameters[name] = torch.nn.Parameter(parameter.to("meta"), parameter.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def new_sharded_model(adapter, like: torch.nn.Module, dims: dict[str, int],
                      set_trainable=None) -> torch.nn.Module:
    """A model of ``like``'s class at ``dims``, sharded as ``like`` is, its parameters' shards allocated but not
    written (a map writes them).  ``set_trainable(model)`` marks its frozen parameters before sharding."""
    return build_sharded(unsharded_class(like), adapter.config_at(like.config, dims), like,
                         adapter.build_options(like), set_trainable)


def build_sharded(model_class: type, config, like: torch.nn.Module, options: dict | None = None,
                  set_trainable=None) -> torch.nn.Module:
    """``model_class(config, **options)`` on ``like``'s device and dtype, in its training mode, sharded, its
    parameters' shards allocated but not written (a map or a checkpoint writes them)."""
    from growlib.models.base import build_uninitialised, take_settings_of

    reference = next(like.parameters())
    with _parameters_on_meta():
        model = build_uninitialised(model_class, config, reference.device, **(options or {}))
    take_settings_of(model, like)
    if set_trainable is not None:
        set_trainable(model)
    shard_model(model, on_cuda=reference.is_cuda)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=reference.device)  # allocates every rank's shards (and empties the buffers)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return model


def rebuilt(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a sharded model built anew, each rank its shard (an identity map; not charged as a
    transition's FLOPs: one process makes no such copy).  FSDP2 fixes a layer's gradient dtypes (bf16 compute,
    fp32 reduction on the GPU) when the model first runs with that layer frozen; the copy trains every layer
    that is trainable when it first runs."""
    from growlib.models import adapter_for
    from growlib.operators.common import depth_identity, map_model

    dims = adapter_for(model).dims(model.config)
    identity = GrowthMap(source_dims=dims, target_dims=dims, width={}, depth=depth_identity(dims["layers"]))
    with uncounted_maps():
        return map_model(model, identity)


class RankDivergenceError(RuntimeError):
    """The processes of a distributed run hold different models where they must hold the same one."""


def map_across_shards(gmap: GrowthMap, source: torch.nn.Module, target: torch.nn.Module, *,
                      alpha: float | None = None) -> None:
    """``apply_map(gmap, schema(source), schema(target), alpha=alpha)`` one target parameter at a time, where
    either model may be sharded (see the module doc).  Every rank must call it with the same models.  The
    ranks then compare checksums of the whole parameters they computed (RankDivergenceError names the first
    that differs): each keeps only its rows, so rows computed differently would otherwise mix silently."""
    from growlib.models import adapter_for

    adapter = adapter_for(target)
    reshard(source)
    reshard(target)
    source_schema, target_schema = adapter.schema(source), adapter.schema(target)  # shapes only
    source_params = dict(source.named_parameters(remove_duplicate=False))
    specs_of = slots_by_parameter(target_schema, target)
    checked: list[tuple[str, torch.Tensor]] = []
    with torch.no_grad():
        for name, parameter in target.named_parameters():
            specs = [spec for spec in specs_of[id(parameter)] if depth_sources(gmap, spec) is not None]
            if not specs:
                continue  # the map leaves this parameter as it is
            source_specs = source_slots(gmap, source_schema, specs)
            sources = {param: whole_tensor(source_params[param])
                       for param in sorted({s.source for s in source_specs})}
            sharded = is_sharded_tensor(parameter)
            blended = alpha is not None or len(specs) < len(specs_of[id(parameter)])
            whole = (whole_tensor(parameter) if sharded and blended  # a gathered copy, written freely
                     else torch.empty(parameter.shape, dtype=parameter.dtype, device=parameter.device) if sharded
                     else parameter.detach())
            apply_map_to_slots(gmap, source_schema, source_specs, sources, target_schema, specs, whole, alpha=alpha)
            if sharded:
                checked.append((name, _checksum(whole)))
                _keep_own_rows(parameter, whole)
            del sources, whole  # before the next parameter's are gathered
    _require_ranks_agree(checked)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum (in float64), maximum and minimum: reductions that allocate nothing the size of ``tensor``."""
    return torch.stack([tensor.sum(dtype=torch.float64), tensor.amax().double(), tensor.amin().double()])


def disagreeing_rows(checksums: torch.Tensor) -> list[int]:
    """The rows of ``checksums`` (one row per tensor, computed on every rank) whose values differ between the
    ranks (all-reduce MAX and MIN; a NaN on every rank agrees)."""
    high = checksums.clone()
    low = checksums.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    return ((high != low) & ~(high.isnan() & low.isnan())).any(dim=1).nonzero().flatten().tolist()


def _require_ranks_agree(checked: list[tuple[str, torch.Tensor]]) -> None:
    """Raise RankDivergenceError if the ranks' checksums of one parameter differ."""
    if not checked:
        return
    differing = disagreeing_rows(torch.stack([checksum for _, checksum in checked]))
    if differing:
        raise RankDivergenceError(
            f"the ranks computed different values of parameter {checked[differing[0]][0]!r} (and "
            f"{len(differing) - 1} more) while each built its shard of the new model: the map must give every "
            "rank the same result from the same gathered weights")


def _keep_own_rows(parameter: torch.Tensor, whole: torch.Tensor) -> None:
    """Write this rank's shard of ``parameter`` (a DTensor) from the whole tensor every rank computed."""
    from torch.distributed.tensor import distribute_tensor

    parameter.copy_(distribute_tensor(whole, parameter.device_mesh, parameter.placements, src_data_rank=None))
