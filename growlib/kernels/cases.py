"""Every kernel-versus-reference case, defined once: ``growlib check-kernels`` runs them, and so does tests/kernels.

A case runs one op's public function on the Triton backend, with seeded random inputs at an awkward
shape (size 1, primes, just over a block), and compares each output with

* ``ref64``: the op's PyTorch reference (``<op>_reference``) in float64 on the kernel's own, already rounded,
  inputs: the oracle;
* ``torch``: the same reference run in the inputs' dtype: what PyTorch itself gets in fp16 / bf16.

The rule (``Tolerance``), with ``s = max(1, |ref64|)`` per element (per tensor, ``max(1, max |ref64|)``, for
the Kronecker expansion, whose outputs are sums over whole layers: their rounding error follows the size of
the terms, not of the sum):

* float32:          ``|kernel - ref64| <= atol * s``
* float16/bfloat16: ``|kernel - ref64| <= k * |torch - ref64| + atol * s``   (the three-way rule, k = 2)

so a half-precision kernel may be at most twice as far from the truth as PyTorch in the same dtype, plus about
one unit in the last place (Triton's interpreter truncates where a GPU rounds).  Inputs are drawn on the CPU
and then moved, so a case sees the same numbers on every device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from growlib import names
from growlib.kernels.backend import use_backend
from growlib.kernels.frozen.activation import ACTIVATIONS, bias_activation, gated_activation
from growlib.kernels.frozen.add_norm import add_norm
from growlib.kernels.frozen.rope_split_qkv import rope_split_qkv
from growlib.kernels.kron_expand import (kron_expand, kron_expand_reference, kron_expand_vector,
                                         kron_expand_vector_reference)
from growlib.kernels.structured_map import structured_map_, structured_map_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# The comparison rule
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """The rule a kernel's outputs are judged by (see the module docstring); ``atol`` per dtype, relative to
    ``s``, which is per element unless ``per_tensor_scale``."""

    atol: Mapping[torch.dtype, float]
    per_tensor_scale: bool = False
    k: float = 2.0

    def describe(self, dtype: torch.dtype) -> str:
        """The bound on |kernel - ref64| for ``dtype``, as printed in check-kernels' table."""
        scale = "max(1,max|ref64|)" if self.per_tensor_scale else "max(1,|ref64|)"
        bound = f"{self.atol[dtype]:.0e}*{scale}"
        return bound if dtype == torch.float32 else f"{self.k:g}*|torch-ref64| + {bound}"


STRUCTURED_MAP_TOLERANCE = Tolerance({torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3})
KRON_TOLERANCE = Tolerance({torch.float32: 2e-6, torch.bfloat16: 8e-3}, per_tensor_scale=True)
FUSED_TOLERANCE = Tolerance({torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3})


@dataclass(frozen=True)
class Comparison:
    """One output of one case, judged.  ``worst_error`` is max |kernel - ref64| / s and ``worst_ratio`` max
    |kernel - ref64| / allowed (at most 1 when passed); both are None for exact and property checks."""

    label: str
    passed: bool
    worst_error: float | None = None
    worst_ratio: float | None = None
    backward: bool = False
    detail: str = ""

    def describe(self) -> str:
        if self.worst_ratio is not None:
            return f"{self.label}: worst |err|/s {self.worst_error:.3g}, err/allowed {self.worst_ratio:.3g}"
        return f"{self.label}: {self.detail or ('ok' if self.passed else 'failed')}"


def compare(label: str, got: torch.Tensor | None, exact: torch.Tensor | None, same_dtype: torch.Tensor | None,
            dtype: torch.dtype, tolerance: Tolerance, *, backward: bool = False) -> Comparison:
    """Judge ``got`` (the kernel's output, expected in ``dtype``) against ``exact`` (ref64) by ``tolerance``;
    ``same_dtype`` is the reference run in ``dtype`` (the three-way rule's baseline; None drops the k-term,
    which only makes the rule stricter).  ``exact`` None means no output is expected (a frozen input's
    gradient), and ``got`` must be None too."""
    if exact is None or got is None:
        passed = exact is None and got is None
        return Comparison(label, passed, backward=backward,
                          detail="" if passed else "missing" if got is None else "computed for a frozen input")
    if got.dtype != dtype or got.shape != exact.shape:
        return Comparison(label, False, backward=backward, detail=f"got {got.dtype} {tuple(got.shape)}, expected "
                                                                  f"{dtype} {tuple(exact.shape)}")
    if got.numel() == 0:
        return Comparison(label, True, 0.0, 0.0, backward)
    exact = exact.double()
    err = (got.double() - exact).abs()
    if tolerance.per_tensor_scale:
        scale = exact.abs().max().clamp_min(1.0)
    else:
        scale = exact.abs().clamp_min(1.0)
    allowed = tolerance.atol[dtype] * scale
    if dtype != torch.float32 and same_dtype is not None:
        allowed = allowed + tolerance.k * (same_dtype.double() - exact).abs()
    nan = torch.isnan(err)
    ratio = torch.where(nan, torch.inf, err / allowed)
    worst_error = float(torch.where(nan, torch.inf, err / scale).max())
    return Comparison(label, bool((err <= allowed).all()), worst_error, float(ratio.max()), backward)


def compare_exact(label: str, got: torch.Tensor, expected: torch.Tensor) -> Comparison:
    """``got`` must equal ``expected`` bit for bit (values a kernel only copies)."""
    passed = got.dtype == expected.dtype and torch.equal(got, expected)
    return Comparison(label, passed, detail="bit-exact" if passed else "differs from a plain copy")


def require(label: str, condition: bool, detail: str) -> Comparison:
    """A property of the kernel's output that no tolerance expresses (shape, sign)."""
    return Comparison(label, bool(condition), detail=detail if condition else f"violated: {detail}")


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelCase:
    """``op``: the op's public function; ``kernel``: check-kernels' table row (the op with its epilogue);
    ``variant``: shape and options; ``check(device)`` runs the case and returns its comparisons."""

    op: str
    kernel: str
    variant: str
    dtype: torch.dtype
    tolerance: Tolerance
    check: Callable[[torch.device], list[Comparison]]
    quick: bool = False

    @property
    def id(self) -> str:
        return f"{self.kernel}/{self.variant}/{dtype_name(self.dtype)}"

    def run(self, device: torch.device) -> list[Comparison]:
        return self.check(device)


def failures(comparisons: Sequence[Comparison]) -> list[str]:
    """The failed comparisons, described (what a test asserts to be empty)."""
    return [c.describe() for c in comparisons if not c.passed]


# ----------------------------------------------------------------------------------------------------------
# Structured maps
# ----------------------------------------------------------------------------------------------------------

# One task of size 1; three tasks of prime sizes (one a 65 x 1 column, just over a 64-row tile); two tasks just
# over the 64 x 64 tile.  Each task is ((rows, cols), (source rows, source cols)).
STRUCTURED_MAP_SHAPES = {
    "one": [((1, 1), (1, 1))],
    "primes": [((5, 7), (3, 11)), ((65, 1), (13, 1)), ((2, 67), (2, 31))],
    "over-block": [((66, 65), (33, 65)), ((13, 17), (26, 34))],
}
STRUCTURED_MAP_EPILOGUES = {"plain": "structured_map", "blend": "structured_map+blend",
                            "rms": "structured_map+rms", "rms-blend": "structured_map+rms+blend"}


def random_table(generator: torch.Generator, sizes_out_in, k: int):
    """One (index, weight) table holding a random sparse-row map per (n_out, n_in) pair; returns starts."""
    index, weight, starts, start = [], [], [], 0
    for n_out, n_in in sizes_out_in:
        index.append(torch.randint(0, n_in, (n_out, k), generator=generator, dtype=torch.int32))
        w = torch.randn(n_out, k, generator=generator)
        w[torch.rand(n_out, k, generator=generator) < 0.2] = 0.0  # padding entries
        weight.append(w)
        starts.append(start)
        start += n_out
    return torch.cat(index), torch.cat(weight), starts


def random_tasks(seed: int, dtype: torch.dtype, shapes, kd: int, k: int, device: torch.device,
                 transpose_every: int = 2):
    """Tasks mapping random sources (src_rows, src_cols) to outputs (rows, cols): every other output
    transposed, sources strided views or transposed copies; (dst, src, depth_weight, row_start, col_start,
    table_index, table_weight) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for (rows, cols), (src_rows, src_cols) in shapes:
        pairs += [(rows, src_rows), (cols, src_cols)]
    table_index, table_weight, starts = random_table(g, pairs, k)
    dst, src = [], []
    for t, ((rows, cols), (src_rows, src_cols)) in enumerate(shapes):
        out = torch.randn(cols, rows, generator=g).t() if t % transpose_every else torch.randn(rows, cols, generator=g)
        dst.append(out.to(dtype))
        sources = []
        for d in range(kd):
            s = torch.randn(src_rows, src_cols + 3, generator=g)[:, 1:1 + src_cols]  # strided view
            sources.append(s.to(dtype) if d % 2 == 0 else s.t().contiguous().t().to(dtype))
        src.append(sources)
    depth_weight = torch.randn(len(shapes), kd, generator=g)
    row_start = torch.tensor(starts[0::2], dtype=torch.int64)
    col_start = torch.tensor(starts[1::2], dtype=torch.int64)
    return ([t.to(device) for t in dst], [[s.to(device) for s in row] for row in src],
            *(t.to(device) for t in (depth_weight, row_start, col_start, table_index, table_weight)))


def _structured_map_through(backend: str, dst, *args, **kwargs) -> list[torch.Tensor]:
    out = [t.clone() for t in dst]
    with use_backend(backend):
        structured_map_(out, *args, **kwargs)
    return out


def _check_structured_map(shape: str, epilogue: str, dtype: torch.dtype, device: torch.device) -> list[Comparison]:
    kd, k = (1, 1) if shape == "one" else (3, 2)
    dst, src, dw, rs, cs, ti, tw = random_tasks(7, dtype, STRUCTURED_MAP_SHAPES[shape], kd, k, device)
    rms = epilogue.startswith("rms")
    if rms:  # second moments are non-negative
        src = [[s.abs() for s in row] for row in src]
        dst = [t.abs() for t in dst]
    alpha = 0.3 if epilogue.endswith("blend") else None
    kernel = _structured_map_through("triton", dst, src, dw, rs, cs, ti, tw, alpha=alpha, rms=rms)
    same_dtype = _structured_map_through("torch", dst, src, dw, rs, cs, ti, tw, alpha=alpha, rms=rms)
    oracle = [t.double() for t in dst]  # fp64 on the same device: the kernel's inputs, computed exactly
    structured_map_reference(oracle, [[s.double() for s in row] for row in src], dw, rs, cs, ti, tw,
                             alpha=alpha, rms=rms)
    comparisons = [compare(f"dst[{t}]", got, exact, torch_got, dtype, STRUCTURED_MAP_TOLERANCE)
                   for t, (got, exact, torch_got) in enumerate(zip(kernel, oracle, same_dtype))]
    if rms:
        comparisons.append(require("rms output", all(bool((t >= 0).all()) for t in kernel), "non-negative"))
    return comparisons


def _structured_map_cases() -> list[KernelCase]:
    return [KernelCase("structured_map", kernel, shape, dtype, STRUCTURED_MAP_TOLERANCE,
                       functools.partial(_check_structured_map, shape, epilogue, dtype), quick=shape == "primes")
            for epilogue, kernel in STRUCTURED_MAP_EPILOGUES.items()
            for shape in STRUCTURED_MAP_SHAPES for dtype in FLOAT_DTYPES]


# ----------------------------------------------------------------------------------------------------------
# Kronecker-factored (LiGO) expansion, forward and backward
# ----------------------------------------------------------------------------------------------------------

KRON_DTYPES = (torch.float32, torch.bfloat16)
KRON_NAMES = ("W", "E", "F", "D")
# (L1, O1, I1) -> (L2, O2, I2): the 48x80 -> 97x131 (on strided and transposed views), size 1, primes,
# just over the 64-wide interpreter tile, and a shrinking depth (the depth mix runs first).
KRON_SHAPES = {
    "issue": ((3, 48, 80), (5, 97, 131)),
    "size-one": ((1, 1, 3), (2, 1, 2)),
    "primes": ((2, 7, 13), (3, 17, 11)),
    "over-block": ((2, 65, 33), (3, 66, 65)),
    "shrink": ((5, 40, 24), (2, 17, 30)),
}
# Per-layer width maps (LiGO's tie='paper': E (L2, O2, O1) and/or F (L2, I2, I1), one per output layer, so the
# depth mix must run first): (shapes, which maps are per layer).  Both maps at size 1 and just over the tile;
# E alone at primes, where the shared F may still run before the depth mix; F alone on strided views.
KRON_PER_LAYER_SHAPES = {
    "size-one": (((1, 1, 3), (2, 1, 2)), "EF"),
    "primes": (((2, 7, 13), (3, 17, 11)), "E"),
    "over-block": (((2, 65, 33), (3, 66, 65)), "EF"),
    "views": (((3, 19, 5), (5, 23, 7)), "F"),
}
# (L1, O1) -> (L2, O2) of the 1-D form
KRON_VECTOR_SHAPES = {"size-one": ((1, 1), (3, 2)), "over-block": ((3, 70), (4, 67))}


def _width_map(g: torch.Generator, size_out: int, size_in: int, layers: int | None, views: bool) -> torch.Tensor:
    """A random width map scaled by 1 / sqrt(size_in): (size_out, size_in), or (layers, size_out, size_in) per
    output layer; with ``views`` a transposed (and, per layer, permuted) view rather than a contiguous tensor."""
    if layers is None and views:
        matrix = torch.randn(size_in, size_out, generator=g).mT
    elif layers is None:
        matrix = torch.randn(size_out, size_in, generator=g)
    elif views:
        matrix = torch.randn(size_in, layers, size_out, generator=g).permute(1, 2, 0)
    else:
        matrix = torch.randn(layers, size_out, size_in, generator=g)
    return matrix / size_in ** 0.5


def kron_inputs(seed: int, dtype: torch.dtype, small, large, device: torch.device, views: bool = False,
                per_layer: str = ""):
    """W, E, F, D scaled so that outputs and gradients are of order one, and an output gradient.  With
    ``views`` they are strided and transposed views rather than contiguous tensors; ``per_layer`` names the
    width maps ('E', 'F' or 'EF') given one per output layer."""
    (l1, o1, i1), (l2, o2, i2) = small, large
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(l1, o1, i1 + 2, generator=g)[:, :, 1:-1] if views else torch.randn(l1, o1, i1, generator=g)
    E = _width_map(g, o2, o1, l2 if "E" in per_layer else None, views)
    F = _width_map(g, i2, i1, l2 if "F" in per_layer else None, views)
    D = torch.randn(l2, l1, generator=g) / l1 ** 0.5
    grad_out = torch.randn(l2, o2, i2, generator=g)
    return [t.to(device, dtype) for t in (W, E, F, D)], grad_out.to(device, dtype)


def value_and_grads(fn: Callable, inputs, grad_out, wanted=KRON_NAMES) -> list[torch.Tensor | None]:
    """fn's output and the gradients of the ``wanted`` inputs (None for the others, which are frozen)."""
    leaves = [t.detach().requires_grad_(name in wanted) for name, t in zip(KRON_NAMES, inputs)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)
    by_name = dict(zip([n for n in KRON_NAMES if n in wanted], grads))
    return [out.detach()] + [by_name.get(name) for name in KRON_NAMES]


def kron_through(backend: str) -> Callable:
    """``kron_expand`` on one backend, as a function of (W, E, F, D)."""
    def expand(W, E, F, D):
        with use_backend(backend):
            return kron_expand(W, E, F, D)
    return expand


def kron_same_dtype(W, E, F, D):
    """The einsum chain a user would write, in the inputs' own dtype: the bf16 baseline of the three-way rule."""
    rows = torch.einsum("loa,lab->lob" if E.dim() == 3 else "oa,lab->lob", E, torch.einsum("lj,jab->lab", D, W))
    return torch.einsum("lob,lib->loi" if F.dim() == 3 else "lob,ib->loi", rows, F)


def kron_comparisons(inputs, grad_out, wanted=KRON_NAMES) -> list[Comparison]:
    """The Triton expansion's output and the gradients of ``wanted`` (forward and backward kernels), judged
    against the float64 reference; the other inputs are frozen and must get no gradient."""
    dtype = inputs[0].dtype
    got = value_and_grads(kron_through("triton"), inputs, grad_out, wanted)
    oracle = value_and_grads(kron_expand_reference, [t.double() for t in inputs], grad_out.double(), wanted)
    same_dtype = value_and_grads(kron_same_dtype, inputs, grad_out, wanted)
    labels = ("out",) + tuple(f"grad {name}" for name in KRON_NAMES)
    return [compare(label, g, e, s, dtype, KRON_TOLERANCE, backward=label != "out")
            for label, g, e, s in zip(labels, got, oracle, same_dtype)]


def _check_kron(shape: str, dtype: torch.dtype, device: torch.device) -> list[Comparison]:
    inputs, grad_out = kron_inputs(3, dtype, *KRON_SHAPES[shape], device, views=shape == "issue")
    return kron_comparisons(inputs, grad_out)


def _check_kron_per_layer(shape: str, dtype: torch.dtype, device: torch.device) -> list[Comparison]:
    sizes, per_layer = KRON_PER_LAYER_SHAPES[shape]
    inputs, grad_out = kron_inputs(4, dtype, *sizes, device, views=shape == "views", per_layer=per_layer)
    return kron_comparisons(inputs, grad_out)


def _check_kron_vector(shape: str, per_layer: bool, dtype: torch.dtype, device: torch.device) -> list[Comparison]:
    (l1, o1), (l2, o2) = KRON_VECTOR_SHAPES[shape]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(l1, o1, generator=g).to(device, dtype)
    E = _width_map(g, o2, o1, l2 if per_layer else None, views=False).to(device, dtype)
    D = (torch.randn(l2, l1, generator=g) / l1 ** 0.5).to(device, dtype)
    grad_out = torch.randn(l2, o2, generator=g).to(device, dtype)

    def run(fn, args, grad):
        leaves = [t.detach().requires_grad_() for t in args]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad)]

    def through_triton(w, E, D):
        with use_backend("triton"):
            return kron_expand_vector(w, E, D)

    got = run(through_triton, (w, E, D), grad_out)
    oracle = run(kron_expand_vector_reference, [t.double() for t in (w, E, D)], grad_out.double())
    same_dtype = run(lambda w, E, D: torch.einsum("loa,la->lo" if per_layer else "oa,la->lo", E, D @ w), (w, E, D),
                     grad_out)
    return [compare(label, g, e, s, dtype, KRON_TOLERANCE, backward=label != "out")
            for label, g, e, s in zip(("out", "grad w", "grad E", "grad D"), got, oracle, same_dtype)]


def _kron_cases() -> list[KernelCase]:
    """Shared width maps, then per-layer ones (a row of their own in check-kernels' table)."""
    return ([KernelCase("kron_expand", "kron_expand", shape, dtype, KRON_TOLERANCE,
                        functools.partial(_check_kron, shape, dtype), quick=shape == "primes")
             for shape in KRON_SHAPES for dtype in KRON_DTYPES]
            + [KernelCase("kron_expand", "kron_expand+per-layer", shape, dtype, KRON_TOLERANCE,
                          functools.partial(_check_kron_per_layer, shape, dtype), quick=shape == "primes")
               for shape in KRON_PER_LAYER_SHAPES for dtype in KRON_DTYPES]
            + [KernelCase("kron_expand_vector", "kron_expand_vector" + ("+per-layer" if per_layer else ""), shape,
                          dtype, KRON_TOLERANCE, functools.partial(_check_kron_vector, shape, per_layer, dtype),
                          quick=shape == "over-block")
               for per_layer in (False, True) for shape in KRON_VECTOR_SHAPES for dtype in KRON_DTYPES])


# ----------------------------------------------------------------------------------------------------------
# Forward-only fused kernels of frozen layers
# ----------------------------------------------------------------------------------------------------------

def randn(*shape, seed: int, device: torch.device, scale: float = 1.0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def rotary_tables(batch: int, seq: int, head_dim: int, seed: int, device: torch.device):
    """cos / sin as HF builds them: angles position * inv_freq, duplicated over the two halves."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 50, (batch, seq), generator=g).double()
    inv_freq = 1.0 / (1000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def fused_comparisons(fn: Callable, inputs: dict, dtype: torch.dtype, labels: Sequence[str],
                      **options) -> tuple[list[Comparison], tuple[torch.Tensor, ...]]:
    """Run ``fn`` (a forward-only op's public function) on the Triton kernel, on the reference in ``dtype``
    and on the reference in float64; judge each output; return the comparisons and the kernel's outputs."""
    cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k not in ("cos", "sin") else v)
            for k, v in inputs.items()}  # rotary tables stay fp32, as growlib.frozen passes them
    exact = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in cast.items()}
    with use_backend("triton"):
        kernel = _as_tuple(fn(**cast, **options))
    with use_backend("torch"):
        same_dtype = _as_tuple(fn(**cast, **options))
        oracle = _as_tuple(fn(**exact, **options))
    comparisons = [compare(label, got, ref, same, dtype, FUSED_TOLERANCE)
                   for label, got, ref, same in zip(labels, kernel, oracle, same_dtype)]
    return comparisons, kernel


# (leading shape, width): one element; a prime row count over a prime width; rows just over a row block
# (8 rows of 512 for width 257, which is just over a 256 block); a wide row.
NORM_SHAPES = {"one": ((1,), 1), "primes": ((3, 43), 37), "over-block": ((17,), 257), "wide": ((2,), 4100)}
NORM_VARIANTS = {
    "layernorm+residual+sum": dict(rms=False, residual=True, weight=True, bias=True, return_sum=True),
    "layernorm-plain": dict(rms=False, residual=False, weight=True, bias=True, return_sum=False),
    "rmsnorm+residual+sum": dict(rms=True, residual=True, weight=True, bias=False, return_sum=True),
    "rmsnorm-no-affine": dict(rms=True, residual=False, weight=False, bias=False, return_sum=True),
}
QUICK_NORM_VARIANTS = ("layernorm+residual+sum", "rmsnorm-no-affine")


def _check_add_norm(variant: str, shape: str, dtype: torch.dtype, device: torch.device) -> list[Comparison]:
    lead, n = NORM_SHAPES[shape]
    v = NORM_VARIANTS[variant]
    inputs = {
        "x": randn(*lead, n, seed=1, scale=3.0, device=device) + 0.5,  # an offset, so centring matters
        "residual": randn(*lead, n, seed=2, device=device) if v["residual"] else None,
        "weight": randn(n, seed=3, device=device) + 1.0 if v["weight"] else None,
        "bias": randn(n, seed=4, device=device) if v["bias"] else None,
    }
    comparisons, out = fused_comparisons(add_norm, inputs, dtype, ("out", "sum"), eps=1e-5, rms=v["rms"],
                                         return_sum=v["return_sum"])
    if v["return_sum"]:  # the sum, rounded once, with no three-way slack
        expected = inputs["x"].to(dtype).double()
        if inputs["residual"] is not None:
            expected = expected + inputs["residual"].to(dtype).double()
        comparisons.append(compare("sum of rounded inputs", out[1], expected, None, dtype, FUSED_TOLERANCE))
    return comparisons


# one element; a prime row count over a prime width; rows just over the 16-row tile, width just over the
# 256-column tile; a 3-D input
ACTIVATION_SHAPES = {"one": (1, 1), "primes": (43, 37), "over-block": (17, 257), "3d": (2, 5, 19)}
GATED_ACTIVATIONS = ("silu", "gelu_tanh")


def _check_bias_activation(activation: str, shape: str, dtype: torch.dtype,
                           device: torch.device) -> list[Comparison]:
    dims = ACTIVATION_SHAPES[shape]
    inputs = {"x": randn(*dims, seed=11, scale=3.0, device=device), "bias": randn(dims[-1], seed=12, device=device)}
    return fused_comparisons(bias_activation, inputs, dtype, ("out",), activation=activation)[0]


def _check_gated_activation(activation: str, shape: str, with_bias: bool, dtype: torch.dtype,
                            device: torch.device) -> list[Comparison]:
    *lead, n = ACTIVATION_SHAPES[shape]
    inputs = {"x": randn(*lead, 2 * n, seed=13, scale=3.0, device=device),
              "bias": randn(2 * n, seed=14, device=device) if with_bias else None}
    comparisons, (out,) = fused_comparisons(gated_activation, inputs, dtype, ("out",), activation=activation)
    return comparisons + [require("shape", out.shape == (*lead, n), f"(..., N) = {(*lead, n)}")]


# (batch, seq, heads, kv_heads, head_dim, cos batch): the smallest case; GQA with shared tables; MHA with
# per-sequence tables and a rotary half (65) just over a power-of-two block; MQA over a prime seq
ROPE_SHAPES = {"one": (1, 1, 1, 1, 2, 1), "gqa": (3, 17, 4, 2, 8, 1), "over-block": (2, 5, 3, 3, 130, 2),
               "mqa": (2, 13, 5, 1, 6, 2)}


def _check_rope(shape: str, dtype: torch.dtype, device: torch.device) -> list[Comparison]:
    batch, seq, heads, kv_heads, head_dim, cos_batch = ROPE_SHAPES[shape]
    width = (heads + 2 * kv_heads) * head_dim
    qkv = randn(batch, seq, width + 3, seed=21, device=device)[..., 2:2 + width]  # tokens strided, as a slice
    cos, sin = rotary_tables(cos_batch, seq, head_dim, seed=22, device=device)
    comparisons, (q, k, v) = fused_comparisons(rope_split_qkv, {"qkv": qkv, "cos": cos, "sin": sin}, dtype,
                                               ("q", "k", "v"), num_heads=heads, num_kv_heads=kv_heads)
    split = qkv.to(dtype).reshape(batch, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    return comparisons + [
        require("shapes", q.shape == (batch, heads, seq, head_dim) and k.shape == v.shape
                == (batch, kv_heads, seq, head_dim), "q (B, H, S, D), k and v (B, KV, S, D)"),
        compare_exact("v copied", v, split[:, heads + kv_heads:]),
    ]


def _fused_cases() -> list[KernelCase]:
    cases = [KernelCase("add_norm", "add_norm", f"{variant}/{shape}", dtype, FUSED_TOLERANCE,
                        functools.partial(_check_add_norm, variant, shape, dtype),
                        quick=shape == "over-block" and variant in QUICK_NORM_VARIANTS)
             for variant in NORM_VARIANTS for shape in NORM_SHAPES for dtype in FLOAT_DTYPES]
    cases += [KernelCase("bias_activation", "bias_activation", f"{activation}/{shape}", dtype, FUSED_TOLERANCE,
                         functools.partial(_check_bias_activation, activation, shape, dtype),
                         quick=shape == "over-block")
              for activation in ACTIVATIONS for shape in ACTIVATION_SHAPES for dtype in FLOAT_DTYPES]
    cases += [KernelCase("gated_activation", "gated_activation",
                         f"{activation}/{shape}/{'bias' if with_bias else 'no-bias'}", dtype, FUSED_TOLERANCE,
                         functools.partial(_check_gated_activation, activation, shape, with_bias, dtype),
                         quick=shape == "over-block" and with_bias)
              for activation in GATED_ACTIVATIONS for shape in ACTIVATION_SHAPES for with_bias in (True, False)
              for dtype in FLOAT_DTYPES]
    cases += [KernelCase("rope_split_qkv", "rope_split_qkv", shape, dtype, FUSED_TOLERANCE,
                         functools.partial(_check_rope, shape, dtype), quick=shape == "over-block")
              for shape in ROPE_SHAPES for dtype in FLOAT_DTYPES]
    return cases


# ----------------------------------------------------------------------------------------------------------
# The list
# ----------------------------------------------------------------------------------------------------------

OPS = names.KERNEL_OPS


def all_cases() -> list[KernelCase]:
    """Every case, in check-kernels' table order (building the list allocates nothing)."""
    return _structured_map_cases() + _kron_cases() + _fused_cases()


def quick_cases() -> list[KernelCase]:
    """One awkward shape per kernel, epilogue and dtype: ``growlib check-kernels --quick``."""
    return [case for case in all_cases() if case.quick]


def cases_for(op: str, quick: bool = False) -> list[KernelCase]:
    """The cases of one op (see OPS)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return [case for case in (quick_cases() if quick else all_cases()) if case.op == op]
