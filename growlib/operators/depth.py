"""Depth operators: progressive stacking (StackBERT, G_stack), interleaved duplication, MSLT's copy of the
top layers, and the ODE multilevel restriction / prolongation (Lauga et al.)."""

from __future__ import annotations

import torch

from growlib import names
from growlib.models import adapter_for
from growlib.operators.common import depth_copy, map_dims, map_into, map_model, require_same_device, resized_dims
from growlib.schema import DepthMap, GrowthMap
from growlib.validate import require_int

GROW_METHODS = names.DEPTH_METHODS
PARITIES = ("even", "odd")
#: The schema names of every residual branch's last projection, into which the ODE step size is folded.  All
#: adapters use these names and mark exactly these specs ``residual_out`` (tests/operators/test_map_builders.py),
#: so the maps need the sizes only; a name a model lacks (a bias-free Llama's) is never looked up.
RESIDUAL_OUT = ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias")


def grow_depth_map(source, layers: int, method: str = "stack") -> GrowthMap:
    """The depth-growth map from ``source`` (a Schema or its dims) to ``layers`` layers, widths unchanged.

    ``stack``: layer l copies layer l mod L (StackBERT, G_stack); ``interleave``: layer l copies layer
    floor(l L / layers), each layer repeated in place; ``copy_top``: the old layers stay and the new ones copy
    the top ``layers - L`` layers (MSLT)."""
    dims = map_dims(source, "source")
    require_int("layers", layers)
    if method not in GROW_METHODS:
        raise ValueError(f"method must be one of {GROW_METHODS}, got {method!r}")
    old = dims["layers"]
    if layers < old:
        raise ValueError(f"layers must be >= the model's {old} layers to grow it, got {layers}")
    if method == "stack":
        source_of = [l % old for l in range(layers)]
    elif method == "interleave":
        source_of = [l * old // layers for l in range(layers)]
    else:
        added = layers - old
        if added > old:
            raise ValueError(f"copy_top copies the top layers, so it can add at most {old} layers to this "
                             f"model; got layers={layers}")
        source_of = list(range(old)) + [old - added + i for i in range(added)]
    target = resized_dims(dims, model=dims["model"], ffn=dims["ffn"], heads=dims["heads"],
                          kv_heads=dims["kv_heads"], layers=layers)
    return GrowthMap(source_dims=dict(dims), target_dims=target, width={}, depth=depth_copy(source_of, old))


def grow_depth(model: torch.nn.Module, layers: int, method: str = "stack") -> torch.nn.Module:
    """A new HF model with ``layers`` layers grown from ``model`` (see ``grow_depth_map``)."""
    return map_model(model, grow_depth_map(adapter_for(model).dims(model.config), layers, method))


def _parity_offset(parity: str) -> int:
    if parity not in PARITIES:
        raise ValueError(f"parity must be one of {PARITIES}, got {parity!r}")
    return PARITIES.index(parity)


def restrict_map(source, parity: str = "even", step: float = 2.0) -> GrowthMap:
    """Coarse layer i = fine layer 2i (+1 for ``odd``) of ``source`` (the fine Schema or its dims), its residual
    branch scaled by ``step``."""
    dims = map_dims(source, "source")
    offset = _parity_offset(parity)
    if dims["layers"] % 2:
        raise ValueError(f"restrict halves the depth, so the model needs an even number of layers, got "
                         f"{dims['layers']}")
    coarse_layers = dims["layers"] // 2
    select = depth_copy([2 * i + offset for i in range(coarse_layers)], dims["layers"])
    target = resized_dims(dims, model=dims["model"], ffn=dims["ffn"], heads=dims["heads"],
                          kv_heads=dims["kv_heads"], layers=coarse_layers)
    return GrowthMap(source_dims=dict(dims), target_dims=target, width={}, depth=select,
                     depth_by_name={name: select.scaled(step) for name in RESIDUAL_OUT})


def prolong_map(fine, parity: str = "even", step: float = 2.0) -> GrowthMap:
    """Fine layer 2i (+1) = coarse layer i with its residual step restored; the other fine layers are kept.

    ``fine`` (the Schema or its dims) is the map's target: it alone fixes the coarse sizes."""
    fine_dims = map_dims(fine, "fine")
    offset = _parity_offset(parity)
    coarse_layers = fine_dims["layers"] // 2
    rows = [None] * fine_dims["layers"]
    for i in range(coarse_layers):
        rows[2 * i + offset] = ((i, 1.0),)
    write_back = DepthMap(tuple(rows), coarse_layers)
    source = resized_dims(fine_dims, model=fine_dims["model"], ffn=fine_dims["ffn"], heads=fine_dims["heads"],
                          kv_heads=fine_dims["kv_heads"], layers=coarse_layers)
    return GrowthMap(source_dims=source, target_dims=dict(fine_dims), width={}, depth=write_back,
                     depth_by_name={name: write_back.scaled(1.0 / step) for name in RESIDUAL_OUT})


def restrict(model: torch.nn.Module, parity: str = "even") -> torch.nn.Module:
    """The ODE multilevel coarse model: the even (or odd) layers, residual step doubled.

    The step h = 2 is folded into each block's residual output projections (weights and biases), which is
    exact for pre-LN models (x + 2 F(x)); for post-LN BERT it doubles the branch inside the LayerNorm.
    Embeddings and head are copied (shared with the fine model through ``prolong_``)."""
    adapter = adapter_for(model)
    return map_model(model, restrict_map(adapter.schema(model), parity))


def prolong_(fine: torch.nn.Module, coarse: torch.nn.Module, parity: str = "even") -> torch.nn.Module:
    """Write the trained coarse layers back into their fine slots (step h restored) and the shared embeddings
    and head into ``fine``; the other fine layers are unchanged.  Returns ``fine``."""
    adapter = adapter_for(fine, "fine")
    if adapter_for(coarse, "coarse") is not adapter:
        raise ValueError(f"coarse is a {type(coarse).__name__} but fine is a {type(fine).__name__}")
    require_same_device(fine=fine, coarse=coarse)
    fine_schema = adapter.schema(fine)
    if fine_schema.dims["layers"] != 2 * adapter.dims(coarse.config)["layers"]:
        raise ValueError(f"coarse must have half of fine's {fine_schema.dims['layers']} layers, got "
                         f"{adapter.dims(coarse.config)['layers']}")
    map_into(prolong_map(fine_schema, parity), coarse, fine)
    return fine
