"""growlib.freeze_forward against the Hugging Face layers it replaces, for every family.

Stacks are slices from the middle of tiny random models (awkward sizes: hidden 48, intermediate 70, GQA for
Llama, Qwen2 and Mistral, sliding windows of 6 and 7 positions); inputs cover seq 1, seq 17, batch 3 and
padding masks.  Each case runs with the PyTorch references
and with the Triton kernels (the interpreter on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from transformers import masking_utils

import growlib
from growlib.frozen import FrozenStack, find_rotary_embedding
from growlib.operators.common import layer_stack
from tests.factories import FAMILIES, MODEL_CLASSES, _randomize, tiny_config, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

HIDDEN = 48


def sliding_window(model, family, layer):
    """The window HF's model gives ``layer``: Mistral's config.sliding_window in every layer, Qwen2's in the
    layers its config.layer_types mark sliding; None otherwise."""
    if family == "mistral":
        return model.config.sliding_window
    if family == "qwen2" and model.config.layer_types[layer.self_attn.layer_idx] == "sliding_attention":
        return model.config.sliding_window
    return None


def hf_forward(model, family, layers, hidden, attention_mask=None, position_ids=None):
    """The HF layers, called the way their model calls them (its own mask builders and rotary embedding)."""
    with torch.no_grad():
        if family in ("bert", "vit", "roberta", "deit"):
            mask = masking_utils.create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                                           attention_mask=attention_mask)
            for layer in layers:
                hidden = layer(hidden, mask)
            return hidden
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
        # No cache, passed by position: transformers 5.17 names that parameter past_key_values, 5.24 cache.
        mask = masking_utils.create_causal_mask(model.config, hidden, attention_mask, None, position_ids=position_ids)
        if family in ("gpt2", "opt"):
            for layer in layers:
                hidden = layer(hidden, attention_mask=mask)
            return hidden
        rotary = find_rotary_embedding(model)(hidden, position_ids)
        if any(sliding_window(model, family, layer) for layer in layers):
            sliding = masking_utils.create_sliding_window_causal_mask(model.config, hidden, attention_mask, None,
                                                                      position_ids=position_ids)
        for layer in layers:
            layer_mask = sliding if sliding_window(model, family, layer) else mask
            hidden = layer(hidden, attention_mask=layer_mask, position_ids=position_ids, position_embeddings=rotary)
        return hidden


def hidden_states(batch, seq, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, HIDDEN, generator=g).to(dtype)


def padding_mask(batch, seq, lengths, left=False):
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


def relative_error(got, expected):
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


# ----------------------------------------------------------------------------------------------------------
# Same outputs as the HF layers
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17)], ids=["seq1", "batch3-seq17"])
def test_matches_hf_layers_fp32(backend, family, shape):
    """Layers 1..2 of a 4-layer model; BERT and RoBERTa with padding (a full, a short and a one-token
    sequence); Mistral's and Qwen2's windows (7, 6) shorter than 17 tokens."""
    model = tiny_model(family, layers=4)
    stack = layer_stack(model)[1:3]
    hidden = hidden_states(*shape)
    mask = padding_mask(3, 17, [17, 9, 1]) if family in ("bert", "roberta") and shape[0] == 3 else None
    expected = hf_forward(model, family, stack, hidden, mask)
    got = growlib.freeze_forward(stack, model)(hidden, mask)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "gpt_neox", "opt"])
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_causal_layers_with_padding_masks(backend, family, left):
    """Padding plus causal masking (and Mistral's and Qwen2's sliding windows, 7 and 6 < 11 tokens).  Query rows
    that may see no token at all (left padding; right padding whose window holds only padding) are padding,
    which the stack lets see keys anyway (so they stay finite); the real tokens must match HF exactly."""
    model = tiny_model(family, layers=2)
    stack = layer_stack(model)
    hidden = hidden_states(3, 11)
    mask = padding_mask(3, 11, [11, 6, 1], left=left)
    expected = hf_forward(model, family, stack, hidden, mask)
    got = growlib.freeze_forward(stack)(hidden, mask)
    assert torch.isfinite(got).all()
    real = mask.bool()
    assert relative_error(got[real], expected[real]) < 1e-5


def test_llama_position_ids_gqa_and_config_rope_scaling(backend):
    """MQA (one kv head), RoPE with another theta and linear scaling, per-sequence position ids; the rotary
    embedding is built from the layers' config (no model given) or taken from the model."""
    config = tiny_config("llama", layers=3, heads=6, kv_heads=1)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    _randomize(model, 0)
    stack = model.model.layers[1:]
    hidden = hidden_states(2, 9)
    position_ids = torch.stack([torch.arange(9), torch.arange(9) + 30])
    expected = hf_forward(model, "llama", stack, hidden, position_ids=position_ids)
    for frozen in (growlib.freeze_forward(stack), growlib.freeze_forward(stack, model)):
        assert relative_error(frozen(hidden, position_ids=position_ids), expected) < 1e-5
    default_positions = hf_forward(model, "llama", stack, hidden)
    assert relative_error(growlib.freeze_forward(stack)(hidden), default_positions) < 1e-5


@pytest.mark.parametrize("fraction, parallel", [(1.0, True), (0.25, False), (0.5, True)],
                         ids=["whole-heads-parallel", "quarter-sequential", "half-parallel"])
def test_gpt_neox_rotary_fraction_and_residual_layout(backend, fraction, parallel):
    """GPT-NeoX rotates whole heads (the fused rope_split_qkv kernel) or, like Pythia, their first dimensions
    only (rotated on the torch side: a quarter of 12 is 3, which HF's tables round up to 4), and adds its branches
    in parallel or one after the other; with per-sequence position ids."""
    config = tiny_config("gpt_neox", layers=3)
    config.rope_parameters["partial_rotary_factor"] = fraction
    config.use_parallel_residual = parallel
    torch.manual_seed(0)
    model = T.GPTNeoXForCausalLM(config).eval()
    _randomize(model, 0)
    stack = model.gpt_neox.layers[1:]
    hidden = hidden_states(2, 9)
    position_ids = torch.stack([torch.arange(9), torch.arange(9) + 30])
    expected = hf_forward(model, "gpt_neox", stack, hidden, position_ids=position_ids)
    frozen = growlib.freeze_forward(stack)
    packed = [(layer.rotary_dims, layer.parallel_residual) for layer in frozen._layers]
    assert packed == [(int(12 * fraction), parallel)] * 2
    assert relative_error(frozen(hidden, position_ids=position_ids), expected) < 1e-5


@pytest.mark.parametrize("family, activation", [("bert", "gelu_new"), ("gpt2", "gelu"), ("vit", "relu"),
                                                ("llama", "gelu_pytorch_tanh"), ("roberta", "relu"),
                                                ("mistral", "gelu_pytorch_tanh")])
def test_config_activation_and_eps_are_respected(backend, family, activation):
    """Another activation than the family's usual one, and norm eps values large enough to matter."""
    config = tiny_config(family, layers=2)
    setattr(config, "activation_function" if family == "gpt2" else "hidden_act", activation)
    torch.manual_seed(0)
    model = MODEL_CLASSES[family](config).eval()
    _randomize(model, 0)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 0.5
        elif hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.5
    stack = layer_stack(model)
    hidden = hidden_states(2, 5)
    expected = hf_forward(model, family, stack, hidden)
    assert relative_error(growlib.freeze_forward(stack, model)(hidden), expected) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_layers_bf16_three_way(backend, family):
    """bf16, by the three-way rule on the whole output: the stack's error against an fp64 run of the same
    layers is at most twice HF's own bf16 error, plus half a bf16 unit at the output's largest magnitude (the
    interpreter truncates where the GPU rounds), in the largest and the root-mean-square error."""
    model = tiny_model(family, layers=4)
    hidden = hidden_states(3, 17, dtype=torch.bfloat16)
    mask = padding_mask(3, 17, [17, 12, 4]) if family in ("bert", "roberta") else None
    model64, model16 = copy.deepcopy(model).double(), copy.deepcopy(model).to(torch.bfloat16)
    exact = hf_forward(model64, family, layer_stack(model64), hidden.double(), mask)
    hf16 = hf_forward(model16, family, layer_stack(model16), hidden, mask)
    got = growlib.freeze_forward(layer_stack(model16), model16)(hidden, mask)
    assert got.dtype == torch.bfloat16
    atol = 2.0 ** -9 * float(exact.abs().max())
    ours, theirs = (got.double() - exact).abs(), (hf16.double() - exact).abs()
    assert float(ours.max()) <= 2 * float(theirs.max()) + atol
    assert float(ours.pow(2).mean().sqrt()) <= 2 * float(theirs.pow(2).mean().sqrt()) + atol


@pytest.mark.parametrize("family, windows", [("qwen2", [None, 6]), ("mistral", [7, 7])])
def test_sliding_window_layers_see_only_their_window(backend, family, windows):
    """Each layer takes its own window (Qwen2: none in layer 0, 6 above; Mistral: 7 in every layer); the
    windows change the output at 17 tokens, and the stack matches HF with them, by default positions or
    given ones."""
    model = tiny_model(family, layers=2)
    stack = layer_stack(model)
    frozen = growlib.freeze_forward(stack, model)
    assert [layer.sliding_window for layer in frozen._layers] == windows
    hidden = hidden_states(2, 17)
    expected = hf_forward(model, family, stack, hidden)
    assert relative_error(frozen(hidden), expected) < 1e-5
    position_ids = torch.stack([torch.arange(17), torch.arange(17) + 5])
    expected_at = hf_forward(model, family, stack, hidden, position_ids=position_ids)
    assert relative_error(frozen(hidden, position_ids=position_ids), expected_at) < 1e-5
    unwindowed = copy.deepcopy(model)
    unwindowed.config.sliding_window = None
    assert relative_error(hf_forward(unwindowed, family, layer_stack(unwindowed), hidden), expected) > 1e-3


def test_compute_dtype_differs_from_the_weights(backend):
    """fp32 weights packed to a bf16 compute dtype: bf16-sized errors (so bf16 was used), no larger than HF's
    own in bf16 by the three-way rule, and the output back in the input's dtype."""
    model = tiny_model("gpt2", layers=2)
    stack = layer_stack(model)
    hidden = hidden_states(2, 7)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    exact = hf_forward(model, "gpt2", stack, hidden)
    hf16 = hf_forward(model16, "gpt2", layer_stack(model16), hidden.to(torch.bfloat16))
    got = growlib.freeze_forward(stack, dtype=torch.bfloat16)(hidden)
    assert got.dtype == torch.float32
    assert relative_error(got, exact) > 1e-4
    atol = 2.0 ** -9 * float(exact.abs().max())
    assert float((got - exact).abs().max()) <= 2 * float((hf16.float() - exact).abs().max()) + atol


# ----------------------------------------------------------------------------------------------------------
# No autograd graph; trainable layers on top
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
def test_no_graph_nothing_saved_and_trainable_layer_on_top_trains(backend, family):
    model = tiny_model(family, layers=3)
    layers = layer_stack(model)
    frozen, top = growlib.freeze_forward(layers[:2], model), layers[2]
    hidden = hidden_states(2, 6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = frozen(hidden)
    assert not saved, "the frozen stack saved tensors for backward"
    assert out.requires_grad is False and out.grad_fn is None and out.is_leaf
    assert not list(frozen.parameters()), "the frozen stack must not own (or re-list) the layers' parameters"

    def trainable_forward(x):
        if family == "llama":
            position_ids = torch.arange(x.shape[1]).unsqueeze(0)
            return top(x, position_ids=position_ids, position_embeddings=model.model.rotary_emb(x, position_ids))
        return top(x)

    target = hidden_states(2, 6, seed=2)
    optimizer = torch.optim.SGD(top.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = (trainable_forward(frozen(hidden)) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in top.parameters())
    assert all(p.grad is None for layer in layers[:2] for p in layer.parameters())
    assert losses[-1] < losses[0]


def test_refuses_an_input_that_requires_grad(backend):
    model = tiny_model("gpt2", layers=1)
    frozen = growlib.freeze_forward(layer_stack(model))
    hidden = hidden_states(1, 3).requires_grad_()
    with pytest.raises(ValueError, match="hidden_states requires grad"):
        frozen(hidden)
    assert frozen(hidden.detach()).grad_fn is None
    with torch.no_grad():
        assert frozen(hidden).grad_fn is None


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------

def count_repacks(monkeypatch):
    calls = []
    original = FrozenStack.repack

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(FrozenStack, "repack", counting)
    return calls


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_repacks_when_the_weights_change_and_only_then(backend, family, monkeypatch):
    """In-place updates of fused (QKV, gate/up) and unfused weights, a parameter replaced, a layer appended
    to the list the stack was built from, and an explicit repack()."""
    model = tiny_model(family, layers=3)
    layers = layer_stack(model)
    stack = [layers[0]]
    repacks = count_repacks(monkeypatch)
    frozen = growlib.freeze_forward(stack)
    hidden = hidden_states(2, 5)
    before = frozen(hidden)
    frozen(hidden)
    assert len(repacks) == 1, "repacked without any change"

    qkv_weight = {"bert": lambda l: l.attention.self.key.weight, "gpt2": lambda l: l.attn.c_attn.weight,
                  "llama": lambda l: l.self_attn.k_proj.weight}[family](layers[0])
    with torch.no_grad():
        qkv_weight.mul_(1.5)
    after = frozen(hidden)
    assert len(repacks) == 2
    assert relative_error(after, hf_forward(model, family, stack, hidden)) < 1e-5
    assert relative_error(after, before) > 1e-3

    up = {"bert": lambda l: l.intermediate.dense, "gpt2": lambda l: l.mlp.c_fc,
          "llama": lambda l: l.mlp.up_proj}[family](layers[0])
    up.weight = torch.nn.Parameter(up.weight.detach() * -1.0)
    assert relative_error(frozen(hidden), hf_forward(model, family, stack, hidden)) < 1e-5
    assert len(repacks) == 3

    stack.append(layers[1])
    assert relative_error(frozen(hidden), hf_forward(model, family, stack, hidden)) < 1e-5
    assert frozen.num_layers == 2 and len(repacks) == 4

    frozen.repack()
    frozen(hidden)
    assert len(repacks) == 5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("route", ["data", "inference_mode"])
def test_repacks_after_writes_the_update_counter_cannot_see(backend, family, route):
    """``weight.data.mul_`` and writes under inference_mode leave the version counter as it was: the weights'
    norms still give them away, so the stack never computes with stale packed weights."""
    model = tiny_model(family, layers=2)
    stack = list(layer_stack(model))
    frozen = growlib.freeze_forward(stack, model)
    hidden = hidden_states(2, 5)
    before = frozen(hidden)
    weight = {"gpt2": lambda l: l.attn.c_attn.weight, "llama": lambda l: l.self_attn.q_proj.weight}[family](stack[0])
    if route == "data":
        weight.data.mul_(0.5)
    else:
        with torch.inference_mode():
            weight.mul_(0.5)
    after = frozen(hidden)
    assert relative_error(after, hf_forward(model, family, stack, hidden)) < 1e-5
    assert relative_error(after, before) > 1e-3


def test_an_additive_mask_is_refused_and_a_float_keep_mask_accepted(backend):
    model = tiny_model("bert", layers=2)
    stack = list(layer_stack(model))
    frozen = growlib.freeze_forward(stack)
    hidden, keep = hidden_states(2, 5), padding_mask(2, 5, [5, 3])
    additive = (1.0 - keep.float()) * torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match=r"attention_mask must hold 1 = keep, 0 = padding .* an additive mask"):
        frozen(hidden, attention_mask=additive)
    assert torch.equal(frozen(hidden, attention_mask=keep.float()), frozen(hidden, attention_mask=keep))
    assert relative_error(frozen(hidden, attention_mask=keep), hf_forward(model, "bert", stack, hidden, keep)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------

def test_clear_errors_on_bad_stacks_and_inputs():
    bert, gpt2, vit = tiny_model("bert", layers=3), tiny_model("gpt2", layers=2), tiny_model("vit", layers=3)
    bert_layers, vit_layers = layer_stack(bert), layer_stack(vit)
    with pytest.raises(ValueError, match="contiguous run"):
        growlib.freeze_forward([bert_layers[0], bert_layers[2]])  # judged by layer_idx
    with pytest.raises(ValueError, match="contiguous run"):
        growlib.freeze_forward([vit_layers[0], vit_layers[2]], vit)  # judged by the model's layer list
    with pytest.raises(ValueError, match="contiguous run"):
        growlib.freeze_forward([bert_layers[1], bert_layers[0]], bert)
    with pytest.raises(ValueError, match="more than once"):
        growlib.freeze_forward([bert_layers[0], bert_layers[0]])
    with pytest.raises(ValueError, match="not in any layer list"):
        growlib.freeze_forward(bert_layers[:1], gpt2)
    with pytest.raises(TypeError, match="layers\\[1\\] is a Linear"):
        growlib.freeze_forward([bert_layers[0], torch.nn.Linear(HIDDEN, HIDDEN)])
    with pytest.raises(ValueError, match="one family"):
        growlib.freeze_forward([bert_layers[0], layer_stack(gpt2)[1]])
    with pytest.raises(ValueError, match="at least one layer"):
        growlib.freeze_forward([])
    with pytest.raises(TypeError, match="layers must be a list"):
        growlib.freeze_forward(bert_layers[0])
    with pytest.raises(TypeError, match="dtype must be"):
        growlib.freeze_forward(bert_layers[:1], dtype=torch.int32)

    config = tiny_config("gpt2", layers=1)
    config.activation_function = "quick_gelu"
    with pytest.raises(ValueError, match="'quick_gelu' has no fused kernel"):
        growlib.freeze_forward(T.GPT2Model(config).h)

    frozen = growlib.freeze_forward(bert_layers[:2], bert)
    with pytest.raises(ValueError, match=f"hidden_states must be \\(batch, seq, {HIDDEN}\\)"):
        frozen(torch.randn(2, 5, HIDDEN + 1))
    with pytest.raises(ValueError, match="hidden_states must be"):
        frozen(torch.randn(5, HIDDEN))
    with pytest.raises(TypeError, match="hidden_states must be a floating-point"):
        frozen(torch.ones(2, 5, HIDDEN, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be a \\(2, 5\\) tensor"):
        frozen(torch.randn(2, 5, HIDDEN), torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        frozen(torch.randn(2, 5, HIDDEN), position_ids=torch.arange(4).unsqueeze(0))
