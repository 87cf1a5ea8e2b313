"""Launch configurations must be valid on an A100 (sm_80, 163 KB of shared memory per block) as well as on
Hopper (sm_90, 227 KB), checked without either: the kron GEMM's configuration is a pure function of
(capability, dtype, shape), and every kernel is compiled for both targets (ptxas included) to measure the
shared memory it really uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from growlib.kernels import kron_expand, launch

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"sm_80": (8, 0), "sm_90": (9, 0)}
# (M, N, K): tiny; the depth mix of a 12 -> 24 layer BERT-Large FFN (M = L2, N = rows * cols, K = L1); a
# square model GEMM; a short-M GEMM just over a block; a gradient over a long K (all layers' rows).
GEMM_SHAPES = [(1, 1, 1), (24, 4096 * 1024, 12), (768, 1024, 3072), (17, 1025, 4097), (1024, 4096, 24 * 768)]


def is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@pytest.mark.parametrize("capability", TARGETS.values(), ids=TARGETS.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sum_batch", [False, True], ids=["per-layer", "summed"])
def test_gemm_config_fits_the_target_and_covers_the_problem(capability, dtype, sum_batch):
    element_size = dtype.itemsize
    largest_area = 128 * 128 if dtype == torch.bfloat16 else 128 * 64
    for m, n, k in GEMM_SHAPES:
        config = kron_expand.gemm_config(m, n, k, dtype, capability, sum_batch=sum_batch, target_programs=264)
        assert config.shared_bytes(element_size) <= launch.max_shared_bytes(capability), (m, n, k, config)
        assert all(is_power_of_two(b) and b >= 16 for b in (config.block_m, config.block_n, config.block_k))
        # a short M widens N to the same output area; operand tiles stay within that area too
        assert config.block_m * config.block_n <= largest_area
        assert max(config.block_m * config.block_k, config.block_k * config.block_n) <= largest_area
        assert config.num_warps in (4, 8) and 1 <= config.num_stages <= 3
        # the K splits tile the whole K range, each split a whole number of K blocks
        assert config.k_per_split % config.block_k == 0
        assert (config.splits - 1) * config.k_per_split < k <= config.splits * config.k_per_split
        assert config.splits == 1 or sum_batch


def test_hopper_keeps_at_least_the_stages_of_an_a100():
    for dtype in (torch.bfloat16, torch.float32):
        for m, n, k in GEMM_SHAPES:
            a100 = kron_expand.gemm_config(m, n, k, dtype, (8, 0))
            hopper = kron_expand.gemm_config(m, n, k, dtype, (9, 0))
            assert hopper.num_stages >= a100.num_stages
            assert (hopper.block_m, hopper.block_n, hopper.block_k) == (a100.block_m, a100.block_n, a100.block_k)


def test_stages_shrink_to_what_the_capability_holds(monkeypatch):
    """Three stages of 128 x 128 x 64 bf16 tiles need 96 KB: they stay on sm_80 / sm_90 (and on sm_86's 99 KB),
    drop to two on sm_75's 64 KB, and a part with too little for even one stage gets an error, not a launch
    that fails on the device."""
    def stages(capability):
        return kron_expand.gemm_config(1024, 1024, 1024, torch.bfloat16, capability).num_stages

    assert stages((8, 0)) == stages((9, 0)) == stages((8, 6)) == 3
    assert stages((7, 5)) == 2
    monkeypatch.setitem(launch.MAX_SHARED_BYTES, (9, 0), 16 * 1024)
    with pytest.raises(ValueError, match="no pipeline depth fits"):
        stages((9, 0))


def test_the_interpreter_gets_small_unpipelined_tiles():
    config = kron_expand.gemm_config(1000, 1000, 1000, torch.bfloat16, None)
    assert (config.block_m, config.block_n, config.block_k, config.num_stages) == (64, 64, 64, 1)


def test_shared_memory_table_and_fallbacks():
    assert launch.max_shared_bytes((8, 0)) == 163 * 1024
    assert launch.max_shared_bytes((9, 0)) == 227 * 1024
    assert launch.max_shared_bytes((8, 8)) == 99 * 1024  # unknown minor: the smallest of its major version
    assert launch.max_shared_bytes((42, 0)) == 48 * 1024  # unknown major: what every GPU gives without opting in


def test_capability_is_queried_lazily_and_once_per_device(monkeypatch):
    calls = []

    def capability(index):
        calls.append(index)
        return (8, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    launch._cuda_capability.cache_clear()
    try:
        assert launch.device_capability(torch.device("cpu")) is None
        assert calls == []
        assert launch.device_capability(torch.device("cuda", 0)) == (8, 0)
        assert launch.device_capability(torch.device("cuda", 0)) == (8, 0)
        assert calls == [0]
    finally:
        launch._cuda_capability.cache_clear()


def test_launch_records_name_each_configuration_once_with_its_count():
    with launch.recorded() as records:
        launch.note("kron_gemm", BLOCK_M=64, num_warps=4)
        launch.note("kron_gemm", BLOCK_M=64, num_warps=4)
        launch.note("add_norm", BLOCK_N=512)
    launch.note("add_norm", BLOCK_N=1024)  # not recorded: outside the block
    assert launch.summarize(records) == "kron_gemm(BLOCK_M=64,num_warps=4) x2; add_norm(BLOCK_N=512) x1"


@pytest.mark.slow
@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="this triton has no CUDA backend to compile with")
def test_every_launch_configuration_compiles_for_sm80_and_sm90_without_spills():
    """tests/kernels/compile_targets.py builds every launch configuration the launchers choose for both targets
    (a fresh process, since compiling needs jit functions that are not interpreted).  ptxas spills nothing
    anywhere; the structured map, a gather that must stream at copy bandwidth, keeps to 128 registers a thread;
    shared memory fits the target and growlib's estimate; every GEMM runs on the tensor cores (mma.sync, or
    wgmma on sm_90 where the tile allows), bf16 as it is and fp32 as 3xTF32, with no FMA left in its loop."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    result = subprocess.run([sys.executable, "-m", "tests.kernels.compile_targets"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for capability in TARGETS.values():
        kernels = {row["kernel"] for row in rows if tuple(row["capability"]) == capability}
        assert kernels == {"kron_gemm", "structured_map", "add_norm", "activation", "rope_split"}, capability
    for row in rows:
        assert row["spill_stores"] == row["spill_loads"] == 0, row
        assert row["shared"] <= row["limit"], row
        if row["estimate"] is not None:  # gemm_config's estimate is an upper bound on what was compiled
            assert row["shared"] <= row["estimate"], row
        if row["kernel"] == "structured_map":
            assert row["registers"] <= 128, row
        if row["kernel"] == "kron_gemm":
            tensor_core = row["ptx_wgmma"] + row["ptx_mma"]
            assert tensor_core > 0 and row["sass_hgmma"] + row["sass_hmma"] > 0 and row["sass_ffma"] == 0, row
            assert row["capability"] == [9, 0] or row["ptx_wgmma"] == 0, row  # wgmma is Hopper's
