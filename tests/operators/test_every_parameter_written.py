"""Growth maps build their target models without random initialisation, so every parameter must be written by the
map: with the uninitialised memory poisoned (NaN), every operator's result is finite and equals the result built
the ordinary way; and no init function runs while such a model is built."""

from __future__ import annotations

import pytest
import torch

import growlib
from growlib.models import base
from tests.factories import FAMILIES, tiny_model

OPERATORS = {
    "coalesce": lambda m: growlib.coalesce(m),
    "decoalesce": lambda m: growlib.decoalesce(growlib.coalesce(m), like=m),
    "widen-hypercloning": lambda m: growlib.widen(m, hidden=96, method="hypercloning"),
    "widen-net2net": lambda m: growlib.widen(m, hidden=96, intermediate=101, method="net2net"),
    "grow_depth-stack": lambda m: growlib.grow_depth(m, 3, "stack"),
    "restrict": lambda m: growlib.restrict(m),
}


def poisoned(build):
    """``build_uninitialised`` whose parameters hold NaN, as uninitialised memory may."""
    def build_poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
        return model
    return build_poisoned


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_map_writes_every_parameter_of_its_target(family, operator, monkeypatch):
    model = tiny_model(family)
    try:
        expected = OPERATORS[operator](model)
    except ValueError as error:  # a family an operator does not apply to says so itself
        pytest.skip(str(error))
    monkeypatch.setattr(base, "build_uninitialised", poisoned(base.build_uninitialised))
    got = OPERATORS[operator](model)
    for name, tensor in got.state_dict().items():
        assert torch.isfinite(tensor).all(), f"{operator} left {name} unwritten"
        if not operator.startswith("widen-net2net"):  # net2net draws random copies: same seed, same result
            torch.testing.assert_close(tensor, expected.state_dict()[name], msg=name)


def test_a_materialized_ligo_writes_every_parameter(monkeypatch):
    from tests.factories import tiny_config

    small = tiny_model("llama")
    ligo = growlib.LiGO(small, tiny_config("llama", hidden=96, heads=8, kv_heads=4, layers=3))
    from growlib.operators import ligo as ligo_module

    monkeypatch.setattr(ligo_module, "build_uninitialised", poisoned(base.build_uninitialised))
    for name, tensor in ligo.materialize().state_dict().items():
        assert torch.isfinite(tensor).all(), name


def test_no_init_function_runs_while_a_target_is_built(monkeypatch):
    calls = []
    for name in ("normal_", "uniform_", "zeros_", "ones_", "trunc_normal_"):
        original = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model = tiny_model("gpt2")
    calls.clear()
    growlib.widen(model, hidden=96, method="hypercloning")
    assert calls == []
    growlib.models.adapter_for(model).new_model(model, growlib.schema_of(model).dims)  # the ordinary way: inits
    assert calls
