"""Shard-local transitions (growlib.sharded): two gloo processes shard a model with FSDP2 and run the operators the
schedules' transitions use (coalesce, interpolate_, restrict, prolong_, grow_depth) on it; every rank builds its
own shard of the result.  Gathered, the result must equal the operator on the whole model bit for bit, for
families with fused, separate and head-split attention weights, tied and untied heads, and row counts that do
not split evenly over the ranks (vocabulary 101, width 30 or 36).  A transition that builds its model sharded and
would carry optimizer state into it is refused; MSLT's joint stage trains every layer of a sharded model under the
GPU's mixed precision policy; the forward-only stack refuses sharded layers."""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch

pytestmark = pytest.mark.distributed

FAMILIES = ("gpt2", "llama", "bert", "gpt_neox", "opt")


def _gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
            for name, p in model.named_parameters()}


def _sharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    from growlib.sharded import shard_model

    twin = copy.deepcopy(model)
    shard_model(twin, on_cuda=False)
    return twin


def _require_equal(label: str, got: torch.nn.Module, expected: torch.nn.Module) -> None:
    from growlib.sharded import is_sharded

    assert is_sharded(got), f"{label}: the result is not sharded"
    got_weights, expected_weights = _gathered(got), _gathered(expected)
    assert got_weights.keys() == expected_weights.keys(), label
    for name, tensor in expected_weights.items():
        assert torch.equal(got_weights[name], tensor), f"{label}: {name} differs"
    trainable = {n: p.requires_grad for n, p in got.named_parameters()}
    assert trainable == {n: p.requires_grad for n, p in expected.named_parameters()}, f"{label}: frozen differs"
    head, embedding = got.get_output_embeddings(), got.get_input_embeddings()
    expected_tied = expected.get_output_embeddings() is not None and \
        expected.get_output_embeddings().weight is expected.get_input_embeddings().weight
    assert (head is not None and head.weight is embedding.weight) == expected_tied, f"{label}: tying differs"


def _check_operators(family: str) -> None:
    import growlib
    from tests.factories import tiny_model

    size = {"llama": {"hidden": 36, "heads": 6, "kv_heads": 2}}.get(family, {"hidden": 30, "heads": 6})  # RoPE: even heads
    fine = tiny_model(family, seed=3, layers=4, **size).train()
    for p in fine.get_input_embeddings().parameters():  # a frozen embedding stays frozen through every map
        p.requires_grad_(False)
    coarse = growlib.coalesce(fine)
    sharded_fine = _sharded_copy(fine)
    sharded_coarse = growlib.coalesce(sharded_fine)
    _require_equal(f"{family} coalesce", sharded_coarse, coarse)
    _require_equal(f"{family} grow_depth stack", growlib.grow_depth(sharded_coarse, 4, "stack"),
                   growlib.grow_depth(coarse, 4, "stack"))
    _require_equal(f"{family} interpolate_", growlib.interpolate_(sharded_fine, sharded_coarse, 0.3),
                   growlib.interpolate_(fine, coarse, 0.3))
    odd = growlib.restrict(fine, parity="odd")
    sharded_odd = growlib.restrict(sharded_fine, parity="odd")
    _require_equal(f"{family} restrict", sharded_odd, odd)
    with torch.no_grad():  # a coarse phase trains the coarse model before it is written back
        for p in odd.parameters():
            p.mul_(1.5)
        for p in sharded_odd.parameters():
            p.mul_(1.5)
    _require_equal(f"{family} prolong_", growlib.prolong_(sharded_fine, sharded_odd, parity="odd"),
                   growlib.prolong_(fine, odd, parity="odd"))


def _check_a_sharded_transition_refuses_to_carry_optimizer_state() -> None:
    """A stage that builds its model sharded gets a fresh optimizer over the shards; a policy that would carry
    state (here ``map``) is refused, naming the stage, rather than loaded into it."""
    import growlib
    from growlib.operators.multilevel import coalesce_map
    from growlib.schedules.protocol import RunState, Stage, Transition
    from growlib.train.config import TrainConfig
    from growlib.train.loop import enter_stage
    from tests.factories import tiny_model

    fine = _sharded_copy(tiny_model("gpt2", hidden=30, heads=6, layers=4))
    coarse_map = coalesce_map(growlib.schema_of(fine).dims)
    stage = Stage("down", 1, lambda state: Transition(growlib.coalesce(state.model), coarse_map, "map"),
                  sharded_transition=True)
    try:
        enter_stage(stage, RunState(fine), TrainConfig(), lambda model: 0.0)
    except ValueError as error:
        assert "stage 'down' built its model sharded" in str(error) and "'map'" in str(error), error
    else:
        raise AssertionError("a sharded transition carrying optimizer state was not refused")


def _check_mslt_unfreezes_a_sharded_model_under_bf16_compute() -> None:
    """MSLT's joint stage unfreezes layers that the sharded model first ran frozen; under FSDP2's GPU policy (bf16
    compute, fp32 gradient reduction; here on the CPU) it must still train them all."""
    from growlib.schedules.progressive import _unfreeze_all, freeze_below
    from growlib.schedules.protocol import RunState
    from growlib.sharded import shard_model
    from tests.factories import example_inputs, tiny_model

    model = tiny_model("gpt2", hidden=30, heads=6, layers=4).train()
    shard_model(model, on_cuda=True)  # the GPU's mixed precision policy
    freeze_below(2, frozen_forward=False)(model)
    inputs = example_inputs(model)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    unfrozen = _unfreeze_all(RunState(model)).model
    unfrozen(**inputs, labels=inputs["input_ids"]).loss.backward()
    untrained = [name for name, p in unfrozen.named_parameters() if p.grad is None]
    assert not untrained, f"no gradient for {untrained[:3]}"


def _check_the_forward_only_stack_refuses_sharded_layers() -> None:
    """MSLT's fused stack packs whole weights: routing the layers of a sharded model through it is refused."""
    from growlib.frozen import route_frozen_bottom
    from tests.factories import tiny_model

    model = _sharded_copy(tiny_model("gpt2", hidden=30, heads=6, layers=4))
    try:
        route_frozen_bottom(model, 2)
    except ValueError as error:
        assert "layers [0, 1] hold parameters FSDP2 shards" in str(error), error
    else:
        raise AssertionError("the forward-only stack accepted sharded layers")


def _rank(rank: int, world: int, port: int, failures: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a rank left waiting fails, not hangs
    try:
        for family in FAMILIES:
            _check_operators(family)
        _check_a_sharded_transition_refuses_to_carry_optimizer_state()
        _check_mslt_unfreezes_a_sharded_model_under_bf16_compute()
        _check_the_forward_only_stack_refuses_sharded_layers()
    except BaseException:
        with open(f"{failures}.{rank}", "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.barrier()  # neither rank tears the group down while the other still uses it
        dist.destroy_process_group()
    # A spawned worker's interpreter teardown aborts now and then ("terminate called without an active
    # exception", after this function has returned; measured about 1 run in 10): its results are in, so leave
    # without the teardown.
    os._exit(0)


def test_each_rank_builds_its_shard_of_the_operators_result_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    from tests.factories import free_port

    failures = str(tmp_path / "failure")
    mp.spawn(_rank, args=(2, free_port(), failures), nprocs=2, join=True)
    reports = [open(f"{failures}.{rank}").read() for rank in range(2) if os.path.exists(f"{failures}.{rank}")]
    assert not reports, "\n".join(reports)
