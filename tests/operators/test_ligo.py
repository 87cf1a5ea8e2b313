"""LiGO: the learned Kronecker-factored growth operator.

Its special cases must be the sparse operators exactly (Proposition 1), a function-preserving width map with
identity depth must preserve the function, only E / F / D may learn, fitting must lower the large model's loss,
gradient accumulation must expand the weights once per optimizer step, and the result must be an ordinary HF
model."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.cpp_builder
from torch.utils.flop_counter import FlopCounterMode

import growlib
from growlib.kernels import launch
from growlib.operators import ligo as ligo_module
from tests.factories import GQA_FAMILIES, example_inputs, logits, relative_error, tiny_config, tiny_model

# (label, family, small model kwargs): tied and untied heads, grouped-query attention, bias-free Llama, Qwen2's
# q/k/v biases and sliding layers, Mistral's sliding window, GPT-NeoX's per-head fused QKV (head-split views),
# OPT's offset position table, DeiT's distillation token.
CASES = [
    ("bert", "bert", {}),
    ("gpt2-tied", "gpt2", {"tied": True}),
    ("gpt2-untied", "gpt2", {"tied": False}),
    ("llama-gqa", "llama", {"kv_heads": 2}),
    ("llama-gqa-tied", "llama", {"kv_heads": 2, "tied": True}),
    ("vit", "vit", {}),
    ("roberta", "roberta", {}),
    ("qwen2-gqa", "qwen2", {"kv_heads": 2}),
    ("mistral-gqa-tied", "mistral", {"kv_heads": 2, "tied": True}),
    ("gpt_neox", "gpt_neox", {}),
    ("opt-tied", "opt", {}),
    ("deit", "deit", {}),
]
CASE_IDS = [c[0] for c in CASES]
SMALL = {"hidden": 48, "heads": 4, "layers": 2, "ffn": 70}


def small_model(family, extra, seed=0):
    return tiny_model(family, seed=seed, **SMALL, **extra)


def target_config(family, extra, hidden=96, heads=8, layers=4, ffn=140):
    """The small model's config grown; Llama, Qwen2 and Mistral keep their 2 query heads per key/value head."""
    extra = dict(extra)
    if family in GQA_FAMILIES:
        extra["kv_heads"] = heads // 2
    return tiny_config(family, hidden=hidden, heads=heads, layers=layers, ffn=ffn, **extra)


def loss_batch(model, seed=1):
    inputs = example_inputs(model, batch=3, seq=8, seed=seed)
    if "pixel_values" in inputs:
        labels = torch.randint(0, model.config.num_labels, (3,), generator=torch.Generator().manual_seed(seed))
    else:
        labels = inputs["input_ids"]
    return dict(inputs, labels=labels)


def eval_loss(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def assert_same_parameters(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=key)


# -- Proposition 1: the sparse operators are special cases ------------------------------------------------

@pytest.mark.parametrize("label,family,extra", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("width_init,depth_init,tie,target", [
    ("net2net", "stack", "paper", {"hidden": 72, "heads": 6, "ffn": 101, "layers": 5}),
    ("bert2bert_fpi", "interleave", "shared", {"hidden": 72, "heads": 6, "ffn": 101, "layers": 4}),
    ("hypercloning", "interleave", "paper", {"hidden": 96, "heads": 8, "ffn": 140, "layers": 4}),
])
def test_initial_operator_is_the_sparse_growth(label, family, extra, width_init, depth_init, tie, target):
    small = small_model(family, extra)
    ligo = growlib.LiGO(small, target_config(family, extra, **target), depth_init=depth_init,
                        width_init=width_init, tie=tie, seed=5)
    widened = growlib.widen(small, hidden=target["hidden"], intermediate=target["ffn"], heads=target["heads"],
                            method=width_init, seed=5)
    expected = growlib.grow_depth(widened, target["layers"], depth_init)
    assert_same_parameters(ligo.materialize(), expected)


def test_interleave_repeats_each_layer_in_place():
    small = small_model("gpt2", {})
    ligo = growlib.LiGO(small, target_config("gpt2", {}, hidden=48, heads=4, ffn=70, layers=4),
                        depth_init="interleave")
    for name, depth in ligo.depth.items():
        assert torch.equal(depth, torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])), name


# -- function preservation -----------------------------------------------------------------------------

@pytest.mark.parametrize("label,family,extra", CASES, ids=CASE_IDS)
def test_hypercloning_with_identity_depth_preserves_the_function(label, family, extra):
    small = small_model(family, extra)
    ligo = growlib.LiGO(small, target_config(family, extra, layers=2), width_init="hypercloning")
    large = ligo.materialize()
    inputs = example_inputs(small)
    assert relative_error(logits(large, inputs), logits(small, inputs)) < 1e-5
    with torch.no_grad():
        through_operator = torch.func.functional_call(large, ligo.expanded(), args=(), kwargs=inputs).logits
    assert relative_error(through_operator.double(), logits(small, inputs)) < 1e-5


# -- parameters, tying, gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("label,family,extra", [CASES[1], CASES[3]], ids=[CASE_IDS[1], CASE_IDS[3]])
def test_only_the_operator_learns_and_the_small_model_gets_no_gradient(label, family, extra):
    small = small_model(family, extra)
    ligo = growlib.LiGO(small, target_config(family, extra))
    names = [n for n, _ in ligo.named_parameters()]
    assert names and all(n.startswith(("width.", "depth.")) for n in names)
    assert not any(b.requires_grad for b in ligo.buffers())
    assert set(ligo.state_dict()) == set(names)  # the frozen small weights are not operator state
    sum((t * t).sum() for t in ligo.expanded().values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ligo.parameters())
    assert all(p.grad is None for p in small.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operator_parameters_never_share_storage(dtype):
    """Every per-layer map starts from the same initial matrix; each must still be a tensor of its own."""
    ligo = growlib.LiGO(tiny_model("gpt2", dtype=dtype, **SMALL), target_config("gpt2", {}))
    pointers = [p.data_ptr() for p in ligo.parameters()]
    assert len(set(pointers)) == len(pointers)
    assert all(p.dtype == dtype for p in ligo.parameters())


def test_paper_tying_has_one_residual_map_and_per_layer_maps():
    small = small_model("gpt2", {})
    paper = growlib.LiGO(small, target_config("gpt2", {}))
    per_layer = {f"{g}{l}_{side}" for l in range(4) for g, side in
                 (("q", "out"), ("k", "out"), ("v", "out"), ("v", "in"), ("ffn", "out"), ("ffn", "in"))}
    assert set(paper.width) == {"model_out", "model_in"} | per_layer
    assert set(paper.depth) == {n.replace(".", "_") for n in growlib.schema_of(small).layer_names()}
    shared = growlib.LiGO(small, target_config("gpt2", {}), tie="shared")
    assert set(shared.width) == {"model_out", "model_in", "q_out", "k_out", "v_out", "v_in", "ffn_out", "ffn_in"}


def test_a_layer_map_changes_only_its_layer_and_o_reads_v():
    small = small_model("llama", {"kv_heads": 2})
    ligo = growlib.LiGO(small, target_config("llama", {"kv_heads": 2}))
    before = growlib.schema_of(ligo.materialize())
    with torch.no_grad():
        ligo.width["v1_in"].add_(0.1)
        ligo.width["q2_out"].add_(0.1)
    after = growlib.schema_of(ligo.materialize())
    for spec in before.specs:
        changed = not torch.equal(before.tensors[spec.key], after.tensors[spec.key])
        assert changed == (spec.key in {("attn.o.weight", 1), ("attn.q.weight", 2)}), spec.key


def test_lifting_a_key_value_map_to_query_heads():
    kv_map = torch.arange(12.0).reshape(4, 3)  # head_dim 1: 3 key/value heads -> 4, 2 query heads each
    lifted = growlib.operators.ligo.lift_to_query_heads(kv_map, group=2, head_dim=1)
    assert lifted.shape == (8, 6)
    for qh_new in range(8):
        for qh_old in range(6):
            same_slot = qh_new % 2 == qh_old % 2
            expected = kv_map[qh_new // 2, qh_old // 2] if same_slot else 0.0
            assert lifted[qh_new, qh_old] == expected


def test_tied_embedding_is_expanded_once():
    small = small_model("gpt2", {"tied": True})
    ligo = growlib.LiGO(small, target_config("gpt2", {"tied": True}))
    assert "lm_head.weight" not in ligo.expanded()
    large = ligo.materialize()
    assert large.lm_head.weight is large.transformer.wte.weight
    untied = growlib.LiGO(small_model("gpt2", {"tied": False}), target_config("gpt2", {"tied": False}))
    assert "lm_head.weight" in untied.expanded()


@pytest.mark.slow
def test_expansion_and_its_gradients_match_a_float64_oracle(backend):
    """Under both backends (the Triton kernels through the interpreter on the CPU), with a moved operator."""
    small = tiny_model("llama", hidden=24, heads=4, kv_heads=2, layers=2, ffn=20)
    config = tiny_config("llama", hidden=36, heads=6, kv_heads=3, layers=3, ffn=30)
    ligo = growlib.LiGO(small, config)
    oracle = growlib.LiGO(small.double(), config)
    with torch.no_grad():
        for p, q in zip(ligo.parameters(), oracle.parameters()):
            noise = 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
            p.add_(noise)
            q.add_(noise.double())
    got = ligo.expanded()
    with growlib.use_backend("torch"):
        expected = oracle.expanded()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-5, atol=1e-5, msg=name)
    sum((t * t).sum() for t in got.values()).backward()
    sum((t * t).sum() for t in expected.values()).backward()
    for (name, p), q in zip(ligo.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_flops_per_expansion_match_the_flop_counter():
    ligo = growlib.LiGO(small_model("llama", {"kv_heads": 2}), target_config("llama", {"kv_heads": 2}))
    with growlib.use_backend("torch"):
        with FlopCounterMode(display=False) as forward:
            expanded = ligo.expanded()
        with FlopCounterMode(display=False) as backward:
            sum(t.sum() for t in expanded.values()).backward()
    assert ligo.flops_per_expansion() == forward.get_total_flops() > 0
    assert ligo.flops_per_expansion(backward=True) == forward.get_total_flops() + backward.get_total_flops()


def kron_launches(records) -> int:
    return sum(record["kernel"] == "kron_gemm" for record in records)


@pytest.mark.slow
@pytest.mark.parametrize("tie", ["paper", "shared"])
def test_one_kron_expand_per_tensor_name_whatever_the_layer_count(tie):
    """Under the Triton backend one expansion launches, per tensor name of the layers, one batched GEMM per step
    of its chain (depth, rows, cols for a weight; depth, rows for a bias or norm), and its backward one per
    gradient of a map plus one per input gradient the chain still needs (none for the frozen small stack):
    the same for 2 -> 4 and 2 -> 8 layers, per-layer maps (tie='paper') included."""
    small = tiny_model("gpt2", hidden=16, heads=2, layers=2, ffn=20)
    steps = [small_tensor.dim() + 1 for small_tensor in
             (growlib.schema_of(small).tensor(name, 0) for name in growlib.schema_of(small).layer_names())]
    counts = []
    for layers in (4, 8):
        ligo = growlib.LiGO(small, tiny_config("gpt2", hidden=24, heads=3, layers=layers, ffn=30), tie=tie)
        with growlib.use_backend("triton"):
            with launch.recorded() as forward:
                expanded = ligo.expanded()
            with launch.recorded() as backward:
                sum(t.sum() for t in expanded.values()).backward()
        counts.append((kron_launches(forward), kron_launches(backward)))
    assert counts[0] == counts[1] == (sum(steps), sum(2 * n - 1 for n in steps))


def _compile_unavailable() -> str:
    """Why torch.compile cannot run on this platform ('' when it can): dynamo needs a supported Python, and
    inductor's CPU code a C++ compiler."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) does not support this Python or platform"
    try:
        torch._inductor.cpp_builder.get_cpp_compiler()
    except Exception as err:  # inductor raises its own error type when no compiler is found
        return f"torch.compile's CPU backend finds no C++ compiler: {err}"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_compile_unavailable()), reason=_compile_unavailable() or "torch.compile is available")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compiled_expansion_and_its_backward_match_eager(backend):
    """torch.compile(fullgraph=True) of ``expanded()`` on the CPU: the torch backend's einsums compile with the
    rest, the Triton backend's kernels stay whole as the custom ops growlib::kron_expand(_backward); values
    and the operator's gradients equal eager's (a tiny Llama with grouped-query attention, per-layer maps)."""
    torch._dynamo.reset()  # the backend is chosen while tracing: compile afresh under this test's
    small = tiny_model("llama", hidden=16, heads=2, kv_heads=1, layers=2, ffn=20)
    ligo = growlib.LiGO(small, tiny_config("llama", hidden=32, heads=4, kv_heads=2, layers=3, ffn=30))
    with torch.no_grad():
        for p in ligo.parameters():  # a moved operator, so that no gradient is trivially symmetric
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = list(ligo.parameters())

    def value_and_grads(expansion):
        tensors = expansion()
        weighted = sum((t * t).sum() for t in tensors.values())
        return tensors, torch.autograd.grad(weighted, params)

    eager, eager_grads = value_and_grads(ligo.expanded)
    with launch.recorded() as records:
        compiled, compiled_grads = value_and_grads(torch.compile(ligo.expanded, fullgraph=True))
    assert (kron_launches(records) > 0) == (backend == "triton")
    assert compiled.keys() == eager.keys()
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for p, got, expected in zip(params, compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- fitting ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label,family,extra", [CASES[i] for i in (0, 1, 3, 5, 7, 9)],
                         ids=[CASE_IDS[i] for i in (0, 1, 3, 5, 7, 9)])
def test_fit_lowers_the_large_model_loss(label, family, extra):
    small = small_model(family, extra)
    ligo = growlib.LiGO(small, target_config(family, extra, hidden=72, heads=6, ffn=101, layers=3))
    batch = loss_batch(small)
    initial = {n: p.detach().clone() for n, p in ligo.named_parameters()}
    before = eval_loss(ligo.materialize(), batch)
    losses = ligo.fit(batch, steps=4)
    assert len(losses) == 4 and losses[0] == pytest.approx(before, rel=1e-5)
    assert eval_loss(ligo.materialize(), batch) < before
    assert all(not torch.equal(p, initial[n]) for n, p in ligo.named_parameters())


def test_fit_with_sgd_and_a_list_of_batches():
    small = small_model("gpt2", {})
    ligo = growlib.LiGO(small, target_config("gpt2", {}))
    batches = [loss_batch(small, seed=s) for s in (1, 2)]
    before = sum(eval_loss(ligo.materialize(), b) for b in batches)
    losses = ligo.fit(batches, steps=4, optimizer="sgd", lr=0.05, warmup_steps=0)
    assert len(losses) == 4
    assert sum(eval_loss(ligo.materialize(), b) for b in batches) < before


def test_fit_of_one_step_warms_up_and_stops():
    """One step means a warmup of one step (10% of 1, rounded up) and no decay phase: the schedule must not divide
    by the length of that empty phase (it did: ZeroDivisionError, so the ligo schedule failed on short runs)."""
    small = small_model("gpt2", {})
    ligo = growlib.LiGO(small, target_config("gpt2", {}))
    before = {name: p.detach().clone() for name, p in ligo.named_parameters()}
    losses = ligo.fit(loss_batch(small), steps=1)
    assert len(losses) == 1
    assert any(not torch.equal(before[name], p) for name, p in ligo.named_parameters())


def test_gradient_accumulation_expands_once_per_step(monkeypatch):
    small = small_model("gpt2", {})
    ligo = growlib.LiGO(small, target_config("gpt2", {}))
    calls = {"n": 0}
    for name in ("kron_expand", "kron_expand_vector"):
        original = getattr(ligo_module, name)

        def counted(*args, _original=original):
            calls["n"] += 1
            return _original(*args)

        monkeypatch.setattr(ligo_module, name, counted)
    ligo.expanded()
    per_expansion, calls["n"] = calls["n"], 0
    assert per_expansion > 0
    ligo.fit([loss_batch(small, seed=s) for s in (1, 2, 3)], steps=2, grad_accum=2)
    assert calls["n"] == 2 * per_expansion


def test_accumulated_micro_batches_equal_one_large_batch():
    small = small_model("llama", {"kv_heads": 2})
    first, second = loss_batch(small, seed=1), loss_batch(small, seed=2)
    whole = {k: torch.cat([first[k], second[k]]) for k in first}
    by_parts = growlib.LiGO(small, target_config("llama", {"kv_heads": 2}))
    at_once = growlib.LiGO(small, target_config("llama", {"kv_heads": 2}))
    parts_losses = by_parts.fit([first, second], steps=1, grad_accum=2, optimizer="sgd", lr=0.1, warmup_steps=0)
    whole_losses = at_once.fit(whole, steps=1, optimizer="sgd", lr=0.1, warmup_steps=0)
    assert parts_losses[0] == pytest.approx(whole_losses[0], rel=1e-5)
    for (name, a), b in zip(by_parts.named_parameters(), at_once.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# -- the result ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label,family,extra", [CASES[i] for i in (1, 3, 0, 6, 7, 9)],
                         ids=[CASE_IDS[i] for i in (1, 3, 0, 6, 7, 9)])
def test_materialized_model_round_trips_through_save_pretrained(label, family, extra, tmp_path):
    small = small_model(family, extra)
    ligo = growlib.LiGO(small, target_config(family, extra))
    with torch.no_grad():
        for p in ligo.parameters():  # a fitted operator, not the initial one
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    large = ligo.materialize()
    large.save_pretrained(tmp_path)
    loaded, info = type(large).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_parameters(loaded, large, atol=0)
    expanded = ligo.expanded()
    params = dict(loaded.named_parameters(remove_duplicate=False))
    for name, tensor in expanded.items():
        assert torch.equal(params[name], tensor.detach()), name


# -- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,error,match", [
    ({"hidden_size": 32, "num_attention_heads": 4, "head_dim": 8, "num_key_value_heads": 2}, ValueError,
     "hidden_size must be >= the small model's 48"),
    ({"num_hidden_layers": 1}, ValueError, "num_hidden_layers must be >= the small model's 2"),
    ({"head_dim": 16}, ValueError, "head_dim must equal the small model's 12"),
    ({"num_key_value_heads": 8}, ValueError, "num_key_value_heads must give 2 query heads"),
    ({"vocab_size": 120}, ValueError, "vocab_size must equal the small model's 101"),
    ({"tie_word_embeddings": True}, ValueError, "tie_word_embeddings must match"),
    ({"attention_bias": True}, ValueError, "tensors differ"),
])
def test_bad_target_configs_are_refused(changes, error, match):
    small = small_model("llama", {"kv_heads": 2})
    config = target_config("llama", {"kv_heads": 2})
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(error, match=match):
        growlib.LiGO(small, config)


def test_a_target_config_of_another_family_or_type_is_refused():
    small = small_model("gpt2", {})
    with pytest.raises(ValueError, match="target_config must be a GPT2Config"):
        growlib.LiGO(small, target_config("bert", {}))
    with pytest.raises(TypeError, match="target_config must be a transformers PretrainedConfig"):
        growlib.LiGO(small, {"n_embd": 96})
    with pytest.raises(TypeError, match="model must be one of the supported"):
        growlib.LiGO(torch.nn.Linear(2, 2), target_config("gpt2", {}))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"depth_init": "zip"}, ValueError, "depth_init must be one of"),
    ({"width_init": "copy"}, ValueError, "width_init must be one of"),
    ({"tie": "none"}, ValueError, "tie must be one of"),
    ({"seed": -1}, ValueError, "seed must be an int >= 0"),
    ({"width_init": "bert2bert_aki"}, ValueError, "layer l \\+ 1"),
])
def test_bad_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        growlib.LiGO(small_model("gpt2", {}), target_config("gpt2", {}), **kwargs)


def test_hypercloning_needs_whole_multiples():
    with pytest.raises(ValueError, match="hypercloning copies every unit equally often"):
        growlib.LiGO(small_model("gpt2", {}), target_config("gpt2", {}, hidden=72, heads=6),
                     width_init="hypercloning")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"steps": 0}, ValueError, "steps must be an int >= 1"),
    ({"grad_accum": 0}, ValueError, "grad_accum must be an int >= 1"),
    ({"optimizer": "adam"}, ValueError, "optimizer must be one of"),
    ({"steps": 3, "warmup_steps": 4}, ValueError, "warmup_steps must be <= steps=3"),
    ({"lr": 0.0}, ValueError, "lr must be a positive number"),
    ({"lr": "fast"}, TypeError, "lr must be a number"),
    ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
])
def test_fit_rejects_bad_arguments(kwargs, error, match):
    small = small_model("gpt2", {})
    ligo = growlib.LiGO(small, target_config("gpt2", {}))
    with pytest.raises(error, match=match):
        ligo.fit(loss_batch(small), **kwargs)


def test_fit_rejects_batches_without_labels_or_that_run_out():
    small = small_model("gpt2", {})
    ligo = growlib.LiGO(small, target_config("gpt2", {}))
    with pytest.raises(ValueError, match="labels"):
        ligo.fit(example_inputs(small), steps=1)
    with pytest.raises(ValueError, match="batches ran out after 1 micro-batches"):
        ligo.fit(iter([loss_batch(small)]), steps=2)
    with pytest.raises(TypeError, match="batches must be a dict"):
        ligo.fit(3, steps=1)


def test_the_large_model_keeps_the_small_ones_loss_name():
    """GPT-2's loss cannot be inferred from its class name: without it transformers warns on every forward."""
    from growlib.train.sizes import build_model

    small = build_model("gpt2", {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}, 64, 8)
    target = build_model("gpt2", {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64}, 64, 8).config
    assert growlib.LiGO(small, target).materialize().loss_type == small.loss_type == "ForCausalLM"
