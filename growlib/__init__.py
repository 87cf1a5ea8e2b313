"""growlib: grow transformers from smaller ones, or train them through coarser versions of themselves.

Every operator is a linear map over a parameter schema (width maps per axis role, depth maps per tensor
name); the maps run as fused Triton kernels on the GPU and as PyTorch references on the CPU."""

from growlib.apply import apply_map
from growlib.frozen import FrozenStack, freeze_forward
from growlib.operators.common import schema_of
from growlib.operators.depth import grow_depth, grow_depth_map, prolong_, prolong_map, restrict, restrict_map
from growlib.operators.ligo import LiGO
from growlib.operators.multilevel import coalesce, coalesce_map, decoalesce, decoalesce_map, interpolate_
from growlib.operators.width import widen, widen_map
from growlib.ops import current_backend, use_backend
from growlib.optim import map_optimizer_state
from growlib.schema import Axis, DepthMap, GrowthMap, Schema, SparseRows, WidthMap

__version__ = "0.1.0"

__all__ = [
    "Axis", "DepthMap", "FrozenStack", "GrowthMap", "LiGO", "Schema", "SparseRows", "WidthMap",
    "apply_map", "coalesce", "coalesce_map", "current_backend", "decoalesce", "decoalesce_map", "freeze_forward",
    "grow_depth", "grow_depth_map", "interpolate_", "map_optimizer_state", "prolong_", "prolong_map", "restrict",
    "restrict_map", "schema_of", "use_backend", "widen", "widen_map",
]
