"""Compile every kernel's launch configuration for A100 (sm_80) and Hopper (sm_90) without a GPU.

Run as ``python -m tests.kernels.compile_targets`` from the repository root, WITHOUT ``TRITON_INTERPRET``
(compiled jit functions are needed); tests/kernels/test_launch_configs.py does so and checks the output.

Each launcher is called on CPU tensors at a shape that makes its configuration as large as it gets, with the
kernel's ``run`` replaced by a recorder, so the exact arguments, constexprs and launch options the launcher
chose are captured; the kron GEMM's configuration is chosen for the target's capability.  Then Triton's own
binder specialises the arguments as the JIT would on a GPU (16-byte alignment, unit strides) and
``triton.compile`` builds the kernel for the target, ptxas included.  One JSON line per (kernel, target):
the shared memory the compiled kernel uses, the target's limit, and growlib's own estimate where it has one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

from growlib.kernels import fused_activation, fused_norm, kron_expand, launch, rope, structured_map

CAPABILITIES = ((8, 0), (9, 0))


@contextlib.contextmanager
def captured(kernel):
    """Record each launch of ``kernel`` (positional args, keyword args) instead of running it."""
    launches = []
    kernel.run = lambda *args, grid, warmup, **kwargs: launches.append((args, kwargs))
    try:
        yield launches
    finally:
        del kernel.run


def compile_for(kernel, args, kwargs, capability):
    """``triton.compile`` of one captured launch for ``capability``, specialised as the JIT would."""
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def kron_launches(capability):
    """The GEMMs whose tiles are largest: bf16 and fp32 at full tiles, a short-M (depth mix) bf16 GEMM with its
    widened tile, and a summed (gradient) bf16 GEMM; each with growlib's estimate of its shared memory."""
    g = torch.Generator().manual_seed(0)
    # Sizes are multiples of 16, as model widths are: only then can the loads be pipelined (asynchronous copies
    # need 16-byte aligned rows), which is when shared memory is at its largest.
    shapes = [(torch.bfloat16, (2, 384, 256), (2, 256, 384), False), (torch.float32, (2, 384, 256), (2, 256, 384), False),
              (torch.bfloat16, (1, 16, 768), (1, 768, 3072), False), (torch.bfloat16, (3, 256, 384), (3, 384, 256), True)]
    for dtype, a_shape, b_shape, sum_batch in shapes:
        a = torch.randn(a_shape, generator=g).to(dtype)
        b = torch.randn(b_shape, generator=g).to(dtype)
        query = launch.device_capability
        launch.device_capability = lambda device: capability  # CPU tensors, the target's configuration
        try:
            with captured(kron_expand._batched_matmul_kernel) as launches:
                kron_expand.batched_matmul(a, b, sum_batch=sum_batch)
        finally:
            launch.device_capability = query
        config = kron_expand.gemm_config(a_shape[1], b_shape[2], a_shape[2], dtype, capability, sum_batch=sum_batch)
        name = f"kron_gemm {str(dtype).removeprefix('torch.')} {a_shape[1]}x{b_shape[2]}x{a_shape[2]}" + \
               (" summed" if sum_batch else "")
        yield name, kron_expand._batched_matmul_kernel, launches[0], config.shared_bytes(a.element_size())


def other_launches():
    """The other kernels at their largest configurations, in bf16."""
    bf16 = torch.bfloat16
    with captured(structured_map._structured_map_kernel) as launches:
        src = [[torch.randn(70, 70).to(bf16) for _ in range(3)]]
        structured_map.structured_map([torch.rand(66, 65).to(bf16)], src, torch.ones(1, 3),
                                      torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                                      torch.zeros(70, 2, dtype=torch.int32), torch.ones(70, 2), alpha=0.5, rms=True)
    yield "structured_map bf16 blend+rms", structured_map._structured_map_kernel, launches[0], None
    with captured(fused_norm._add_norm_kernel) as launches:
        x = torch.randn(4, fused_norm.MAX_WIDTH).to(bf16)
        w = torch.ones(fused_norm.MAX_WIDTH).to(bf16)
        fused_norm.add_norm(x, x.clone(), w, w.clone(), 1e-5, False, True)
    yield f"add_norm bf16 width {fused_norm.MAX_WIDTH}", fused_norm._add_norm_kernel, launches[0], None
    with captured(fused_activation._activation_kernel) as launches:
        fused_activation.gated_activation(torch.randn(33, 2 * 600).to(bf16), torch.randn(1200).to(bf16), "gelu")
    yield "gated_activation bf16 gelu", fused_activation._activation_kernel, launches[0], None
    with captured(rope._rope_split_kernel) as launches:
        cos = torch.randn(1, 5, 256)
        rope.rope_split_qkv(torch.randn(2, 5, 8 * 256).to(bf16), cos, cos.clone(), 4, 2)
    yield "rope_split_qkv bf16 head_dim 256", rope._rope_split_kernel, launches[0], None


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: compiling needs the compiled jit functions", file=sys.stderr)
        return 2
    for capability in CAPABILITIES:
        for name, kernel, (args, kwargs), estimate in [*kron_launches(capability), *other_launches()]:
            compiled = compile_for(kernel, args, kwargs, capability)
            print(json.dumps({"kernel": name, "capability": list(capability), "shared": compiled.metadata.shared,
                              "limit": launch.max_shared_bytes(capability), "estimate": estimate,
                              "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
