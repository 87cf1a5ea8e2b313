"""``growlib grow --stream``: grow a safetensors checkpoint into another without ever holding either model.

Every parameter of the grown model is one group of schema slots (a fused QKV weight: three), and a growth map
computes each slot from the source slots of the same name in the layers its depth row reads.  So the grown
checkpoint is written parameter by parameter: allocate it, read the source tensors its slots need from the
source files, run the map (``apply_map`` on schemas holding just those tensors, the same code and arithmetic as
the in-memory operators, so the result is bit-identical), write its bytes, free it.  Peak memory is the largest
such group, whatever the checkpoint's size.  Both models exist only on the meta device, for their names,
shapes and schemas."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from growlib.apply import apply_map_to_slots, slots_by_parameter, source_slots
from growlib.errors import InputError
from growlib.safetensors_files import PlannedTensor, StoredTensor, index_checkpoint, read_tensor, write_checkpoint
from growlib.schema import GrowthMap

_progress = logging.getLogger("growlib.grow")

#: HF's default shard size for save_pretrained
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


@dataclass
class StreamedGrowth:
    """What a streamed growth wrote: the files, the parameters, and the most bytes one group held at once."""

    files: list[str]
    parameters: int
    largest_group_bytes: int


def growth_map(dims: dict, target: dict, width_method: str, depth_method: str, seed: int) -> GrowthMap:
    """Width growth, then depth growth, as one map: the width map of ``widen_map`` with the depth map of
    ``grow_depth_map`` (a depth copy weighs each layer by 1, so this equals running the two one after the
    other, bit for bit)."""
    from growlib.operators.depth import grow_depth_map
    from growlib.operators.width import widen_map

    if width_method == "bert2bert_aki":
        raise InputError("--stream runs one growth map, and bert2bert_aki is no single map (it copies rows between "
                         "layers after FPI): use --width-method bert2bert_fpi, or grow without --stream")
    width = widen_map(dims, target["model"], target["ffn"], target["heads"], width_method, seed)
    depth = grow_depth_map(width.target_dims, target["layers"], depth_method)
    return GrowthMap(source_dims=width.source_dims, target_dims=depth.target_dims, width=width.width,
                     depth=depth.depth)


def meta_model(adapter, architecture: str, config, **options) -> torch.nn.Module:
    """A model of ``config`` on the meta device: its parameter names, shapes and ties, no memory."""
    from growlib.models.base import build_uninitialised

    return build_uninitialised(adapter.model_class(architecture), config, torch.device("meta"), **options)


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name in the model: the name save_pretrained stores it under} (transformers renames some
    families' weights on saving, e.g. ViT's ``layers.0.attention.q_proj`` -> ``encoder.layer.0...query``).
    Only renamings are followed; a family whose saving converts tensors (splits, fuses) is refused."""
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())
    saved = revert_weight_conversion(model, dict(params))
    by_identity = {id(tensor): name for name, tensor in saved.items()}
    names = {name: by_identity.get(id(tensor)) for name, tensor in params.items()}
    converted = sorted(name for name, saved_name in names.items() if saved_name is None)
    if converted or len(saved) != len(params):
        raise InputError(f"--stream: transformers converts {type(model).__name__}'s tensors on saving (not only "
                         f"renames them: {converted or sorted(saved)}); grow it without --stream")
    return names


def stream_grow(source: str, out_folder: str, adapter, architecture: str, config, gmap: GrowthMap,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> StreamedGrowth:
    """Write the model ``gmap`` grows from the checkpoint in ``source`` into ``out_folder`` (weights and config),
    one parameter at a time (see the module doc)."""
    stored = index_checkpoint(source)
    source_model = meta_model(adapter, architecture, config)
    options = adapter.build_options(source_model)
    target_config = adapter.config_at(config, gmap.target_dims)
    target_model = meta_model(adapter, architecture, target_config, **options)
    got = adapter.dims(target_config)
    for role, size in gmap.target_dims.items():
        if got.get(role) != size:
            raise InputError(f"cannot build a {adapter.family} model with {role}={size}: its config gives "
                             f"{role}={got.get(role)}")
    source_schema, target_schema = adapter.schema(source_model), adapter.schema(target_model)  # coverage checked
    source_files = _source_tensors(stored, source_model, source)
    dtype = _one_dtype(source_files, source)

    target_names = checkpoint_names(target_model)
    target_params = dict(target_model.named_parameters())
    specs_of = slots_by_parameter(target_schema, target_model)
    planned = [PlannedTensor(target_names[name], tuple(target_params[name].shape), dtype) for name in target_params]
    memory_name = {target_names[name]: name for name in target_params}
    largest = 0

    def produce(tensor: PlannedTensor) -> torch.Tensor:
        nonlocal largest
        name = memory_name[tensor.name]
        storage = torch.empty(tensor.shape, dtype=dtype)
        specs = specs_of[id(target_params[name])]
        source_specs = source_slots(gmap, source_schema, specs)
        loaded = {param: read_tensor(source_files[param]) for param in {spec.source for spec in source_specs}}
        largest = max(largest, storage.nbytes + sum(t.nbytes for t in loaded.values()))
        apply_map_to_slots(gmap, source_schema, source_specs, loaded, target_schema, specs, storage)
        return storage

    files = write_checkpoint(out_folder, planned, produce, max_shard_bytes)
    target_config.architectures = [architecture]
    target_config.dtype = dtype
    target_config.save_pretrained(out_folder)
    generation_config = os.path.join(source, "generation_config.json")
    if os.path.isfile(generation_config):
        with open(generation_config) as f, open(os.path.join(out_folder, "generation_config.json"), "w") as g:
            g.write(f.read())
    return StreamedGrowth(files=files, parameters=sum(t.numel() for t in target_params.values()),
                          largest_group_bytes=largest)


def _source_tensors(stored: dict[str, StoredTensor], model: torch.nn.Module, source: str) -> dict[str, StoredTensor]:
    """{parameter name (every alias of a shared tensor): where its bytes lie} for every parameter of the source
    model, found under the name save_pretrained gives it, the parameter's own name, or either without the base
    model's prefix; a missing one or one of another shape is refused."""
    saved_names = checkpoint_names(model)
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else None
    found_by_tensor, missing = {}, []
    for name, param in model.named_parameters():
        candidates = [saved_names[name], name]
        if prefix:  # a base model's checkpoint (hub GPT-2's ``h.0...``), as from_pretrained also reads it
            candidates += [c.removeprefix(prefix) for c in candidates if c.startswith(prefix)]
        entry = next((stored[c] for c in candidates if c in stored), None)
        if entry is None:
            missing.append(saved_names[name])
        elif entry.shape != tuple(param.shape):
            raise InputError(f"SRC {source!r}: tensor {saved_names[name]!r} has shape {entry.shape}, but the "
                             f"config gives {tuple(param.shape)}")
        else:
            found_by_tensor[id(param)] = entry
    if missing:
        raise InputError(f"SRC {source!r} lacks the tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"that a {type(model).__name__} of its config has")
    return {name: found_by_tensor[id(param)] for name, param in model.named_parameters(remove_duplicate=False)}


def _one_dtype(tensors: dict[str, StoredTensor], source: str) -> torch.dtype:
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    if len(dtypes) != 1 or not next(iter(tensors.values())).dtype.is_floating_point:
        raise InputError(f"SRC {source!r} stores its weights as {dtypes}: --stream writes one floating dtype, "
                         f"so it needs a checkpoint of one")
    return next(iter(tensors.values())).dtype
