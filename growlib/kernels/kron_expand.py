"""Kronecker-factored (LiGO) expansion ``out[l] = sum_j D[l, j] * E @ W[j] @ F^T``, forward and backward.

The expansion is a chain of three linear maps, each acting on its own axis of the stack W (L, R, C):

* ``depth``: Y = D @ X.reshape(L, R * C)   one GEMM over the flattened stack, which reads every layer once
  (never once per output layer) and forms no per-(l, j) product;
* ``rows``:  Y[l] = E @ X[l]                all layers in one launch, E shared (batch stride 0);
* ``cols``:  Y[l] = X[l] @ F^T              likewise.

A width map may also be given per output layer (E (L2, O2, O1): Y[l] = E[l] @ X[l], LiGO's per-layer maps):
the same launch with a real batch stride, whose gradient is per layer too (dE[l], not summed over layers).

The maps act on different axes, so they commute, except that a per-layer map acts on the output layers and
so needs the depth mix before it: ``cheapest_order`` runs them in the valid order with the fewest
multiply-adds.  Every step's backward is two GEMMs of the step's own size, so the forward count ranks the
backward too.  For growth (L2 > L1) that usually puts the depth mix last, where the width GEMMs run on L1
layers instead of L2; when depth shrinks or stays, it comes first, on the small matrices.  The intermediate
stacks are (layers, rows, cols) with each axis at its input or output size: nothing larger than one of the
chain's stacks is ever formed.

Every step is one launch of ``_batched_matmul_kernel``: one program per (batch, output tile), or, for the
gradients of E, F and D, one program per output tile that loops over all layers itself and sums them in its
fp32 accumulator (no atomics).  When those reductions have too few output tiles to fill the GPU, their K
range is split over more programs, each writing an fp32 partial that the host adds up.

This module holds the op whole: the Triton kernel, its launchers (``expand``, ``expand_backward``) and
``cheapest_order``; the PyTorch reference ``kron_expand_reference`` (the CPU path, the tests' oracle, the
benchmarks' baseline); and the public ``kron_expand`` / ``kron_expand_vector``, which validate, pick the
backend and run through the custom ops ``growlib::kron_expand`` / ``growlib::kron_expand_backward`` with an
autograd formula.  Its cases: growlib/kernels/cases.py; its tests: tests/kernels/test_kron_expand.py; its
benchmark: perf/bench_kron_expand.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import triton
import triton.language as tl

from growlib.kernels import launch
from growlib.kernels.backend import compute_dtype, resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
STEPS = ("depth", "rows", "cols")  # ties in cheapest_order go to the earlier order in this sequence's permutations

# fp32 GEMMs run as 3xTF32 on the GPU's tensor cores: each operand is split into a TF32 part and a TF32
# remainder, and three tensor-core products recover nearly fp32 accuracy (about 2^-21 relative error a product,
# against 2^-24).  Exact fp32 dots ("ieee") run as FMAs, and on an H200 they took 3.5x as long as eager PyTorch's
# cuBLAS fp32 GEMMs (perf/results/gpu/h200-2026-11-29/kron_expand.csv).  bf16 dots ignore this setting.
DOT_INPUT_PRECISION = "tf32x3"


@triton.jit
def _dot_k_block(acc, a_batch, b_batch, offs_m, offs_n, m_ok, n_ok, k0, k_end,
                 stride_am, stride_ak, stride_bk, stride_bn,
                 INTERPRETER: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[offs_m, k0:k0 + BLOCK_K] @ B[k0:k0 + BLOCK_K, offs_n] for one batch entry, K masked at k_end."""
    offs_k = tl.cast(k0, tl.int64) + tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_end
    a = tl.load(a_batch + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(b_batch + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    if INTERPRETER:  # Triton's interpreter multiplies bf16 bit patterns as if they were other numbers in tl.dot
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)


@triton.jit
def _dot_k_range(acc, a_ptr, b_ptr, z, stride_ab, stride_bb, offs_m, offs_n, m_ok, n_ok, k_start, k_end,
                 stride_am, stride_ak, stride_bk, stride_bn,
                 INTERPRETER: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[z][offs_m, k_start:k_end] @ B[z][k_start:k_end, offs_n]."""
    a_batch = a_ptr + tl.cast(z, tl.int64) * stride_ab
    b_batch = b_ptr + tl.cast(z, tl.int64) * stride_bb
    if INTERPRETER:
        # Triton 3.6's interpreter cannot iterate a range whose bounds are tensors (numpy 2.5 refuses int() of
        # its 1-element arrays); a while loop only compares them.
        k0 = k_start
        while k0 < k_end:
            acc = _dot_k_block(acc, a_batch, b_batch, offs_m, offs_n, m_ok, n_ok, k0, k_end,
                               stride_am, stride_ak, stride_bk, stride_bn, INTERPRETER, INPUT_PRECISION, BLOCK_K)
            k0 += BLOCK_K
    else:
        for k0 in range(k_start, k_end, BLOCK_K):  # a for loop, whose loads Triton pipelines
            acc = _dot_k_block(acc, a_batch, b_batch, offs_m, offs_n, m_ok, n_ok, k0, k_end,
                               stride_am, stride_ak, stride_bk, stride_bn, INTERPRETER, INPUT_PRECISION, BLOCK_K)
    return acc


@triton.jit
def _batched_matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K, batch, k_per_split,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cz, stride_cm, stride_cn,           # stride_cz: C's batch stride, or its split stride with SUM_BATCH
    SUM_BATCH: tl.constexpr, INTERPRETER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[z] = A[z] @ B[z] for z < batch, or, with SUM_BATCH, C[split] = sum_z A[z] @ B[z] over the split's
    K range.  Program axis 0 runs over (batch, tile) (tiles only with SUM_BATCH), axis 1 over K splits."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    if SUM_BATCH:
        tile = pid
        c_slot = tl.cast(split, tl.int64)
    else:
        tile = pid % (tiles_m * tiles_n)
        c_slot = tl.cast(pid // (tiles_m * tiles_n), tl.int64)  # this program's batch entry
    # GROUP_M row tiles side by side share their B columns while those are still in L2.
    group_size = GROUP_M * tiles_n
    first_m = (tile // group_size) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group_size) % group_rows
    pid_n = (tile % group_size) // group_rows

    offs_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.cast(pid_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not SUM_BATCH:
        acc = _dot_k_range(acc, a_ptr, b_ptr, c_slot, stride_ab, stride_bb, offs_m, offs_n, m_ok, n_ok, k_start, k_end,
                           stride_am, stride_ak, stride_bk, stride_bn, INTERPRETER, INPUT_PRECISION, BLOCK_K)
    elif INTERPRETER:  # a while loop, not range(batch): see _dot_k_range
        z = 0
        while z < batch:
            acc = _dot_k_range(acc, a_ptr, b_ptr, z, stride_ab, stride_bb, offs_m, offs_n, m_ok, n_ok, k_start,
                               k_end, stride_am, stride_ak, stride_bk, stride_bn, INTERPRETER, INPUT_PRECISION,
                               BLOCK_K)
            z += 1
    else:
        for z in range(0, batch):
            acc = _dot_k_range(acc, a_ptr, b_ptr, z, stride_ab, stride_bb, offs_m, offs_n, m_ok, n_ok, k_start,
                               k_end, stride_am, stride_ak, stride_bk, stride_bn, INTERPRETER, INPUT_PRECISION,
                               BLOCK_K)
    if INTERPRETER:
        if c_ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter's fp32 -> bf16 cast truncates; round to nearest even first, as the GPU's cast does.
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            acc = bits.to(tl.float32, bitcast=True)
    c = c_ptr + c_slot * stride_cz + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class GemmConfig:
    """One launch of ``_batched_matmul_kernel``: its tiles, warps, pipeline stages and register budget (None:
    ptxas's choice), and how a summed (batch reduction) GEMM's K range is split over programs."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    max_registers: int | None
    splits: int
    k_per_split: int

    def shared_bytes(self, element_size: int) -> int:
        """An upper bound on the shared memory the compiled kernel uses: one A and one B tile per stage, or the
        output tile (at most fp32) passing through shared memory to change layout before the store, whichever
        is larger (a 128 x 128 x 16 bf16 GEMM needs 24 KB of stages but 32 KB for its output).  fp32's 3xTF32
        dot may also stage its B tile split in two (TF32 part and remainder) for wgmma: one more pair of B tiles
        (a 64 x 128 x 16 fp32 GEMM compiled to 40 KB on sm_90, against 36 KB of stages).
        tests/kernels/test_launch_configs.py compiles every configuration for sm_80 and sm_90 and checks."""
        stages = self.num_stages * (self.block_m * self.block_k + self.block_k * self.block_n) * element_size
        if element_size == 4:
            stages += 2 * self.block_k * self.block_n * element_size
        return max(stages, self.block_m * self.block_n * 4)


def _largest_tiles(dtype: torch.dtype,
                   capability: tuple[int, int] | None) -> tuple[int, int, int, int, int, int | None]:
    """(largest BLOCK_M, BLOCK_N, BLOCK_K, num_warps, preferred num_stages, register budget).

    bf16 uses 128 x 128 tensor-core tiles.  fp32 (3xTF32, see ``DOT_INPUT_PRECISION``) holds each operand tile
    twice in registers, split into its TF32 part and remainder, so it gets half the output area and half the K
    depth: 128 x 64 x 16 over 8 warps.  Its register budget is pinned at 255, the most a thread can have:
    left to choose, ptxas capped the 32 x 256 tiles of short-M GEMMs at 128 registers and spilled 4-16 bytes.
    At 128 x 128 x 32, 3xTF32 spilled up to 1.4 KB a thread.  tests/kernels/test_launch_configs.py compiles
    every configuration for sm_80 and sm_90 and checks that nothing spills.
    The interpreter (capability None) gets 64-wide tiles, few programs, and no pipelining."""
    if capability is None:
        return 64, 64, 64, 4, 1, None
    if dtype == torch.bfloat16:
        return 128, 128, 64, 8, 3, None
    return 128, 64, 16, 8, 3, 255


def _block(size: int, largest: int) -> int:
    """A power-of-two block covering ``size`` up to ``largest``; at least 16, the smallest tl.dot operand."""
    return min(largest, max(16, triton.next_power_of_2(size)))


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, capability: tuple[int, int] | None, *,
                sum_batch: bool = False, target_programs: int = 4) -> GemmConfig:
    """The launch configuration of one (M, N, K) GEMM of ``dtype`` on a device of compute ``capability``
    (None: Triton's interpreter), a pure function so that it can be checked for any GPU without one.

    Tiles come from ``_largest_tiles``; the pipeline then keeps as many of its preferred stages as fit the
    capability's shared memory (``launch.max_shared_bytes``: 163 KB on sm_80, 227 KB on sm_90, 99 KB on
    sm_86/89), so a tile choice that suits one GPU cannot fail to launch on another.  With ``sum_batch`` the
    K range is split until about ``target_programs`` programs run."""
    largest_m, largest_n, largest_k, num_warps, num_stages, max_registers = _largest_tiles(dtype, capability)
    block_m = _block(m, largest_m)
    # A short M (the depth mix has M = L2) widens the tile to the same area, and K blocks grow or shrink so
    # that neither operand tile outgrows its usual size: fewer, fuller programs at the same shared memory.
    block_n = _block(n, largest_n * (largest_m // block_m))
    block_k = _block(k, max(16, min(largest_k * largest_n // block_n, largest_k * largest_m // block_m)))
    tiles = launch.ceil_div(m, block_m) * launch.ceil_div(n, block_n)
    splits = 1
    if sum_batch:
        splits = max(1, min(launch.ceil_div(target_programs, tiles), launch.ceil_div(k, block_k)))
    k_per_split = launch.ceil_div(launch.ceil_div(k, splits), block_k) * block_k
    splits = launch.ceil_div(k, k_per_split)
    config = GemmConfig(block_m, block_n, block_k, num_warps, num_stages, max_registers, splits, k_per_split)
    if capability is not None:
        element_size = dtype.itemsize
        limit = launch.max_shared_bytes(capability)
        while config.num_stages > 1 and config.shared_bytes(element_size) > limit:
            config = dataclasses.replace(config, num_stages=config.num_stages - 1)
        if config.shared_bytes(element_size) > limit:
            raise ValueError(f"no pipeline depth fits {block_m}x{block_n}x{block_k} {dtype} tiles into the "
                             f"{limit // 1024} KB of shared memory of compute capability {capability}")
    return config


def _target_programs(device: torch.device) -> int:
    """Programs a reduction should be split into to occupy the device: two per SM on a GPU; a few under the
    interpreter, so that tests cover the split path at small sizes."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def batched_matmul(a: torch.Tensor, b: torch.Tensor, *, sum_batch: bool = False) -> torch.Tensor:
    """``a[z] @ b[z]`` for 3-D strided views a (Z, M, K) and b (Z, K, N) of one dtype -> (Z, M, N), or with
    ``sum_batch`` their sum over z -> (M, N).  A zero batch stride (``expand``) shares an operand across the
    batch without copying it; transposes are just strides.  fp32 accumulation, output in the inputs' dtype."""
    batch, m, k = a.shape
    n = b.shape[2]
    out = torch.empty((m, n) if sum_batch else (batch, m, n), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if batch == 0 or k == 0:
        return out.zero_()
    capability = launch.device_capability(a.device)  # None: the interpreter
    config = gemm_config(m, n, k, a.dtype, capability, sum_batch=sum_batch,
                         target_programs=_target_programs(a.device))
    tiles = launch.ceil_div(m, config.block_m) * launch.ceil_div(n, config.block_n)
    target = out.unsqueeze(0) if sum_batch else out
    if config.splits > 1:  # fp32 partials, one per K range, added up below
        target = torch.empty((config.splits, m, n), dtype=torch.float32, device=a.device)
    grid = (tiles if sum_batch else batch * tiles, config.splits)
    launch.note("kron_gemm", dtype=str(a.dtype).removeprefix("torch."), SUM_BATCH=sum_batch,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_registers,
                splits=config.splits)
    # Triton launches on the current CUDA device: make it the tensors' device.
    with torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext():
        _batched_matmul_kernel[grid](
            a, b, target,
            m, n, k, batch, config.k_per_split,
            *a.stride(), *b.stride(), *target.stride(),
            SUM_BATCH=sum_batch, INTERPRETER=capability is None, INPUT_PRECISION=DOT_INPUT_PRECISION,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=8,
            num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_registers,
        )
    if config.splits > 1:
        out.copy_(target.sum(0))
    return out


# ----------------------------------------------------------------------------------------------------------
# The chain: depth, rows and cols steps on a stack X (L, R, C)
# ----------------------------------------------------------------------------------------------------------

def per_layer(matrix: torch.Tensor) -> bool:
    """Whether a width map is one matrix per output layer (L2, size_out, size_in) rather than one shared."""
    return matrix.dim() == 3


def _over_layers(matrix: torch.Tensor, layers: int) -> torch.Tensor:
    """A width map as a batch of ``layers`` matrices: per-layer maps as they are, a shared one broadcast (batch
    stride 0, no copy)."""
    return matrix if per_layer(matrix) else matrix.expand(layers, *matrix.shape)


def _apply_step(step: str, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    layers, rows, cols = x.shape
    if step == "depth":
        flat = batched_matmul(matrix.unsqueeze(0), x.reshape(1, layers, rows * cols))
        return flat.reshape(matrix.shape[0], rows, cols)
    if step == "rows":  # Y[l] = E[l] @ X[l]
        return batched_matmul(_over_layers(matrix, layers), x)
    return batched_matmul(x, _over_layers(matrix, layers).mT)  # Y[l] = X[l] @ F[l]^T


def _matrix_grad(step: str, grad: torch.Tensor, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Gradient of the step's matrix: a shared matrix's summed over layers inside the kernel, a per-layer
    matrix's one per layer."""
    layers, rows, cols = x.shape
    if step == "depth":  # dD = dY (L2, R*C) @ X^T (R*C, L)
        return batched_matmul(grad.reshape(1, grad.shape[0], rows * cols),
                              x.reshape(1, layers, rows * cols).mT, sum_batch=True)
    summed = not per_layer(matrix)
    if step == "rows":  # dE[l] = dY[l] @ X[l]^T (dE = the sum over l when shared)
        return batched_matmul(grad, x.mT, sum_batch=summed)
    return batched_matmul(grad.mT, x, sum_batch=summed)  # dF[l] = dY[l]^T @ X[l]


def _input_grad(step: str, grad: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    layers, rows, cols = grad.shape
    if step == "depth":  # dX = D^T @ dY, over the flattened stack
        flat = batched_matmul(matrix.mT.unsqueeze(0), grad.reshape(1, layers, rows * cols))
        return flat.reshape(matrix.shape[1], rows, cols)
    if step == "rows":  # dX[l] = E[l]^T @ dY[l]
        return batched_matmul(_over_layers(matrix, layers).mT, grad)
    return batched_matmul(grad, _over_layers(matrix, layers))  # dX[l] = dY[l] @ F[l]


def chain_shapes(stack_shape: Sequence[int], maps: Mapping[str, torch.Tensor],
                 order: Sequence[str]) -> list[tuple[int, ...]]:
    """The shape (L, R, C) of the stack before each step of ``order`` and after the last, with ``maps`` keyed by
    step ('depth' (D), 'rows' (E), 'cols' (F); each matrix (size_out, size_in), a width map possibly one per
    output layer (L2, size_out, size_in)): what the output and the saved inputs of ``expand`` will be."""
    shapes = [tuple(stack_shape)]
    for step in order:
        shape = list(shapes[-1])
        shape[STEPS.index(step)] = maps[step].shape[-2]
        shapes.append(tuple(shape))
    return shapes


def step_costs(stack_shape: Sequence[int], maps: Mapping[str, torch.Tensor], order: Sequence[str]) -> list[int]:
    """Multiply-adds of each step of ``order`` on a stack of ``stack_shape`` (L, R, C) (``maps`` as in
    ``chain_shapes``): size_out * size_in * the other two axes, whether the map is shared or per layer.  A
    step's backward costs the same again for its matrix's gradient and once more for its input's."""
    shapes = chain_shapes(stack_shape, maps, order)
    return [maps[step].shape[-2] * math.prod(shape) for step, shape in zip(order, shapes)]


def valid_orders(maps: Mapping[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """The orders in which the steps of ``maps`` can run: a per-layer width map acts on the output layers, so
    the depth mix must come before it."""
    steps = [step for step in STEPS if step in maps]
    return [order for order in itertools.permutations(steps)
            if all(order.index("depth") < order.index(step) for step in order
                   if step != "depth" and per_layer(maps[step]))]


def cheapest_order(stack_shape: Sequence[int], maps: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The valid order of the steps in ``maps`` with the fewest multiply-adds (see ``step_costs``); ties go to
    the earliest.  A plain loop rather than ``min(key=...)``, which torch.compile cannot trace."""
    best, best_cost = None, None
    for order in valid_orders(maps):
        cost = sum(step_costs(stack_shape, maps, order))
        if best_cost is None or cost < best_cost:
            best, best_cost = order, cost
    return best


def expand(stack: torch.Tensor, maps: Mapping[str, torch.Tensor],
           order: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the steps of ``order`` (one of ``valid_orders``) on ``stack`` (L1, O1, I1) with ``maps``
    {'depth': D, 'rows': E, 'cols': F}, E and F shared or per output layer; returns the output and the input
    of every step (what the backward needs).  Callers validate shapes
    (``kron_expand`` does); all tensors share one dtype among SUPPORTED_DTYPES and one device."""
    x = stack.contiguous()
    stages = []
    for step in order:
        stages.append(x)
        x = _apply_step(step, x, maps[step])
    return x, stages


def expand_backward(grad_out: torch.Tensor, stages: Sequence[torch.Tensor], maps: Mapping[str, torch.Tensor],
                    order: Sequence[str], wanted: set[str],
                    need_stack_grad: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Gradients of ``expand``: (d stack or None, {step: d matrix} for the steps in ``wanted``).  Runs the
    chain backwards and stops as soon as nothing earlier needs a gradient."""
    grad = grad_out.contiguous()
    grads = {}
    for position in reversed(range(len(order))):
        step = order[position]
        if step in wanted:
            grads[step] = _matrix_grad(step, grad, stages[position], maps[step])
        if not (need_stack_grad or any(earlier in wanted for earlier in order[:position])):
            return None, grads
        grad = _input_grad(step, grad, maps[step])
    return grad, grads

# ----------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------

def _reference_step(step: str, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """One step of the chain with torch's own matmuls (a shared width map broadcast over the layers, no copy)."""
    layers, rows, cols = x.shape
    if step == "depth":
        return (matrix @ x.reshape(layers, rows * cols)).reshape(matrix.shape[0], rows, cols)
    if step == "rows":
        return matrix @ x
    return x @ matrix.mT


def kron_expand_reference(W: torch.Tensor, E: torch.Tensor, F: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Reference of ``kron_expand``: ``out[l] = E_l (sum_j D[l, j] W[j]) F_l^T``.

    W (L1, O1, I1), D (L2, L1), E (O2, O1) shared by all layers or (L2, O2, O1) one per output layer, F
    likewise (I2, I1) or (L2, I2, I1) -> (L2, O2, I2) in W's dtype.  Computed in fp32 (fp64 for fp64 inputs) so
    that it is an oracle for the kernels rather than a second bf16 computation; autograd through it gives the
    gradients of all four inputs.  The three steps run in the kernel's order (``cheapest_order``: the fewest
    multiply-adds, e.g. both width products on the L1 small layers before the depth mix when growing), which is
    also the CPU's fastest."""
    return _reference_chain(W, {"depth": D, "rows": E, "cols": F})


def kron_expand_vector_reference(w: torch.Tensor, E: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Reference of ``kron_expand_vector``, the 1-D form for biases and norms:
    ``out[l] = E_l sum_j D[l, j] w[j]``; w (L1, O1), D (L2, L1), E (O2, O1) or (L2, O2, O1) -> (L2, O2) in w's
    dtype, computed like ``kron_expand_reference``."""
    return _reference_chain(w.unsqueeze(-1), {"depth": D, "rows": E}).squeeze(-1)


def _reference_chain(stack: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
    compute = compute_dtype(stack.dtype)
    x = stack.to(compute)
    for step in cheapest_order(stack.shape, maps):
        x = _reference_step(step, x, maps[step].to(compute))
    return x.to(stack.dtype)


# ----------------------------------------------------------------------------------------------------------
# The op: validation, backend dispatch, torch.library registration, autograd
# ----------------------------------------------------------------------------------------------------------

_KRON_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _validate_kron(W, E, F, D) -> None:
    """Shapes, dtypes and devices of ``kron_expand`` (F is None for the 1-D form, whose stack is named w)."""
    stack_name, stack_axes, stack_ndim = ("w", "(L1, O1)", 2) if F is None else ("W", "(L1, O1, I1)", 3)
    named = [(stack_name, W), ("E", E), ("D", D)] + ([] if F is None else [("F", F)])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if W.dim() != stack_ndim:
        raise ValueError(f"{stack_name} must be {stack_ndim}-D {stack_axes}, got shape {tuple(W.shape)}")
    if D.dim() != 2 or D.shape[1] != W.shape[0]:
        raise ValueError(f"D must be 2-D (L2, L1) with L1={W.shape[0]} ({stack_name}.shape[0]), got shape "
                         f"{tuple(D.shape)}")
    layers_out = D.shape[0]
    width_maps = [("E", E, "O", 1)] + ([] if F is None else [("F", F, "I", 2)])
    for name, t, axis, stack_axis in width_maps:
        size_in, size_name = W.shape[stack_axis], f"{axis}1={W.shape[stack_axis]} ({stack_name}.shape[{stack_axis}])"
        if t.dim() == 2 and t.shape[1] != size_in:
            raise ValueError(f"{name} must be 2-D ({axis}2, {axis}1) with {size_name}, got shape {tuple(t.shape)}")
        if t.dim() == 3 and (t.shape[0] != layers_out or t.shape[2] != size_in):
            raise ValueError(f"{name} must be 3-D (L2, {axis}2, {axis}1), one map per output layer, with "
                             f"L2={layers_out} (D.shape[0]) and {size_name}, got shape {tuple(t.shape)}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be 2-D ({axis}2, {axis}1), shared by all layers, or 3-D "
                             f"(L2, {axis}2, {axis}1), one map per output layer, got shape {tuple(t.shape)}")
    if W.dtype not in _KRON_DTYPES:
        raise TypeError(f"{stack_name} must be float32, bfloat16 or float64, got {W.dtype}")
    for name, t in named[1:]:
        if t.dtype != W.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {stack_name} has {W.dtype}: all inputs must share "
                            f"one dtype (cast {name} with .to({stack_name}.dtype))")
        if t.device != W.device:
            raise ValueError(f"{name} is on {t.device} but {stack_name} is on {W.device}: all inputs must share "
                             "a device")


def _kron_maps(E, F, D) -> dict[str, torch.Tensor]:
    """The chain's maps by step; no 'cols' step for the 1-D form (F None)."""
    return {"depth": D, "rows": E} if F is None else {"depth": D, "rows": E, "cols": F}


@torch.library.custom_op("growlib::kron_expand", mutates_args=())
def _kron_expand_op(W: torch.Tensor, E: torch.Tensor, F: torch.Tensor | None, D: torch.Tensor) -> list[torch.Tensor]:
    """The Triton expansion of W (L1, O1, I1) (the 1-D form as (L1, O1, 1) with F None), its steps in
    ``cheapest_order``: [out, the input of every step after the first].  Those inputs are what the backward
    needs (as autograd would save them for the same chain of matmuls), so the backward recomputes nothing."""
    maps = _kron_maps(E, F, D)
    out, stages = expand(W, maps, cheapest_order(W.shape, maps))
    return [out, *stages[1:]]


@_kron_expand_op.register_fake
def _(W, E, F, D):
    maps = _kron_maps(E, F, D)
    shapes = chain_shapes(W.shape, maps, cheapest_order(W.shape, maps))
    return [W.new_empty(shape) for shape in [shapes[-1], *shapes[1:-1]]]


@torch.library.custom_op("growlib::kron_expand_backward", mutates_args=())
def _kron_expand_backward_op(grad_out: torch.Tensor, stages: list[torch.Tensor], E: torch.Tensor,
                             F: torch.Tensor | None, D: torch.Tensor, wanted: list[bool]) -> list[torch.Tensor]:
    """The Triton backward of ``growlib::kron_expand``: the gradients of those of (W, E, F, D) that ``wanted``
    flags, in that order.  ``stages``: W and the step inputs the forward returned."""
    maps = _kron_maps(E, F, D)
    need_W, need_E, need_F, need_D = wanted
    steps = {step for step, need in (("rows", need_E), ("cols", need_F), ("depth", need_D)) if need}
    grad_W, grads = expand_backward(grad_out, stages, maps, cheapest_order(stages[0].shape, maps), steps, need_W)
    computed = (grad_W, grads.get("rows"), grads.get("cols"), grads.get("depth"))
    return [grad for grad, need in zip(computed, wanted) if need]


@_kron_expand_backward_op.register_fake
def _(grad_out, stages, E, F, D, wanted):
    return [t.new_empty(t.shape) for t, need in zip((stages[0], E, F, D), wanted) if need]


def _kron_setup_context(ctx, inputs, output) -> None:
    W, E, F, D = inputs
    ctx.mark_non_differentiable(*output[1:])  # the saved step inputs are returned only for the backward
    ctx.save_for_backward(W, *output[1:], E, F, D)


def _kron_backward(ctx, grads):
    W, *step_inputs, E, F, D = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad)  # F is None for the 1-D form and never needs one
    computed = iter(torch.ops.growlib.kron_expand_backward(grads[0], [W, *step_inputs], E, F, D, wanted))
    return tuple(next(computed) if need else None for need in wanted)


def _kron_no_double_backward(ctx, grads):
    raise RuntimeError("kron_expand's Triton backward is not differentiable itself (no double backward): use "
                       "backend 'torch' for higher-order gradients")


_kron_expand_op.register_autograd(_kron_backward, setup_context=_kron_setup_context)
_kron_expand_backward_op.register_autograd(_kron_no_double_backward)


def _kron_dispatch(W, E, F, D) -> torch.Tensor:
    _validate_kron(W, E, F, D)
    if resolve_backend(W.device) == "torch":
        if F is None:
            return kron_expand_vector_reference(W, E, D)
        return kron_expand_reference(W, E, F, D)
    if W.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton backend supports {SUPPORTED_DTYPES} for {'w' if F is None else 'W'}, got "
                        f"{W.dtype}; use backend 'torch' for other dtypes")
    if F is None:
        return _kron_expand_op(W.unsqueeze(-1), E, None, D)[0].squeeze(-1)
    return _kron_expand_op(W, E, F, D)[0]


def kron_expand(W: torch.Tensor, E: torch.Tensor, F: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """LiGO's Kronecker-factored expansion of one tensor name stacked over layers:
    ``out[l] = E_l (sum_j D[l, j] W[j]) F_l^T``, in one chain of batched GEMMs however many layers there are.

    W (L1, O1, I1), D (L2, L1), E (O2, O1) shared by all output layers or (L2, O2, O1) one per output layer,
    F likewise (I2, I1) or (L2, I2, I1); all of one dtype (float32 or bfloat16; float64 on the torch backend)
    and one device -> (L2, O2, I2) in that dtype.  Differentiable with respect to all four (the Triton
    backend's backward once, the torch backend's to any order).  The Triton backend is the custom op
    ``growlib::kron_expand`` (with ``growlib::kron_expand_backward``), so ``torch.compile`` keeps it whole."""
    return _kron_dispatch(W, E, F, D)


def kron_expand_vector(w: torch.Tensor, E: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The 1-D form of ``kron_expand`` for biases and norms: ``out[l] = E_l sum_j D[l, j] w[j]``.

    w (L1, O1), D (L2, L1), E (O2, O1) or (L2, O2, O1) -> (L2, O2).  Dtypes and backward as ``kron_expand``:
    differentiable with respect to all three."""
    return _kron_dispatch(w, E, None, D)
