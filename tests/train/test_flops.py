"""step_flops against torch.utils.flop_counter on tiny models of every family, frozen parts included.

The models run HF's eager attention: its score products are plain matmuls that flop_counter counts.  Under
SDPA on a CPU, torch dispatches to ``_scaled_dot_product_flash_attention_for_cpu``, which flop_counter has
no formula for, so attention would vanish from its count; the analytic count is the same either way."""

import dataclasses
import random

import pytest
import torch
import transformers as T
from torch.utils.flop_counter import FlopCounterMode

import growlib
from growlib.models import adapter_for, adapter_named
from growlib.train.flops import step_flops
from tests.factories import FAMILIES, IMAGE_CLASSES, tiny_config

BATCH, SEQ = 3, 16

CASES = {
    "bert-mlm": ("bert", T.BertForMaskedLM, {}),
    "bert-base": ("bert", T.BertModel, {}),
    "gpt2-lm": ("gpt2", T.GPT2LMHeadModel, {}),
    "gpt2-untied": ("gpt2", T.GPT2LMHeadModel, {"tied": False}),
    "gpt2-base": ("gpt2", T.GPT2Model, {}),
    "llama-lm": ("llama", T.LlamaForCausalLM, {}),
    "llama-tied": ("llama", T.LlamaForCausalLM, {"tied": True}),
    "llama-base": ("llama", T.LlamaModel, {}),
    "vit-cls": ("vit", T.ViTForImageClassification, {}),
    "vit-base": ("vit", T.ViTModel, {}),
    "roberta-mlm": ("roberta", T.RobertaForMaskedLM, {}),
    "roberta-untied": ("roberta", T.RobertaForMaskedLM, {"tied": False}),
    "roberta-base": ("roberta", T.RobertaModel, {}),
    "qwen2-lm": ("qwen2", T.Qwen2ForCausalLM, {}),
    "qwen2-base": ("qwen2", T.Qwen2Model, {}),
    "mistral-lm": ("mistral", T.MistralForCausalLM, {}),
    "mistral-base": ("mistral", T.MistralModel, {}),
    "gpt_neox-lm": ("gpt_neox", T.GPTNeoXForCausalLM, {}),
    "gpt_neox-tied": ("gpt_neox", T.GPTNeoXForCausalLM, {"tied": True}),
    "gpt_neox-base": ("gpt_neox", T.GPTNeoXModel, {}),
    "opt-lm": ("opt", T.OPTForCausalLM, {}),
    "opt-untied": ("opt", T.OPTForCausalLM, {"tied": False}),
    "opt-base": ("opt", T.OPTModel, {}),
    "deit-cls": ("deit", T.DeiTForImageClassification, {}),
    "deit-teacher": ("deit", T.DeiTForImageClassificationWithTeacher, {}),
    "deit-base": ("deit", T.DeiTModel, {}),
}


#: The cases of the costliest tests (random freezing, gradients through biases and norms: seven runs each): one
#: class each for GPT-NeoX, OPT and DeiT (the LM heads, and DeiT's teacher class, which holds both its
#: classifiers): their tied / untied and base variants differ only in the head, which every other test here
#: checks; leaving them out keeps the suite's time in check.
HEAVY_CASES = [case for case in CASES if case not in ("gpt_neox-tied", "gpt_neox-base", "opt-untied", "opt-base",
                                                      "deit-cls", "deit-base")]


def test_every_family_has_a_case():
    assert {family for family, _, _ in CASES.values()} == set(FAMILIES)
    assert {CASES[case][0] for case in HEAVY_CASES} == set(FAMILIES)


def build(case):
    family, cls, config = CASES[case]
    torch.manual_seed(0)
    model = cls(tiny_config(family, **config))
    model.set_attn_implementation("eager")
    return model


def inputs(model):
    if isinstance(model, IMAGE_CLASSES):
        size = model.config.image_size
        return {"pixel_values": torch.randn(BATCH, 3, size, size)}
    return {"input_ids": torch.randint(0, model.config.vocab_size, (BATCH, SEQ))}


def seq_len(model):
    return None if isinstance(model, IMAGE_CLASSES) else SEQ


def counted(model):
    """flop_counter's (forward, backward) FLOPs of one step; the loss reads every output (pooler included)."""
    with FlopCounterMode(display=False) as forward:
        out = model(**inputs(model))
    loss = sum(t.float().square().mean() for t in out.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())
    if not loss.requires_grad:
        return forward.get_total_flops(), 0
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


def analytic(model, training=True):
    return step_flops(model, BATCH, seq_len(model), training=training)


def train_only(model, predicate):
    """Let exactly the parameters whose schema slot satisfies ``predicate(spec)`` require grad."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for spec in growlib.schema_of(model).specs:
        params[spec.source].requires_grad_(predicate(spec))


@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_flop_counter(case):
    model = build(case)
    flops = analytic(model)
    assert (flops.forward, flops.backward_input + flops.backward_weight) == counted(model)
    # everything trainable: every linear map computes its weight gradient and its input gradient (but ViT's
    # patch projection, whose input is the pixels), each attention product the gradients of both operands;
    # Llama's rotary angle table (a product only in some transformers releases) is made from positions, no grad
    attention = sum(op.forward for op in flops.ops if op.name in ("attn.scores", "attn.context"))
    rotary = [op for op in flops.ops if op.name == "embed.rotary"]
    assert all(op.backward_input == op.backward_weight == 0 for op in rotary)
    linear = flops.forward - attention - sum(op.forward for op in rotary)
    patch = sum(op.forward for op in flops.ops if op.name == "embed.patch")
    assert flops.backward_weight == linear
    assert flops.backward_input == linear - patch + 2 * attention


@pytest.mark.parametrize("case", CASES)
def test_frozen_embeddings_and_bottom_layer_match_flop_counter(case):
    """MSLT: embeddings and layer 0 frozen, the rest trains."""
    model = build(case)
    train_only(model, lambda spec: spec.layer != 0 and not spec.name.startswith("embed."))
    flops = analytic(model)
    assert (flops.forward, flops.backward_input + flops.backward_weight) == counted(model)

    ops = {(op.name, op.layer): op for op in flops.ops}
    assert all(op.backward_input == op.backward_weight == 0 for op in flops.ops if op.layer == 0)
    # layer 1 reads a frozen residual stream: post-LN BERT's (and RoBERTa's) projections get no input gradient,
    # pre-LN models' do (their trainable ln1 sits in between)
    q1 = ops[("attn.q", 1)]
    assert q1.backward_weight == q1.forward
    assert q1.backward_input == (0 if adapter_named(CASES[case][0]).post_ln else q1.forward)
    if growlib.schema_of(model).tied_embeddings:
        assert ops[("head.out", None)].backward_weight == 0  # the tied head is the frozen embedding


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", HEAVY_CASES)
def test_random_freezing_matches_flop_counter(case, seed):
    """Any subset of frozen parameters -- norms and biases alone included -- counts what autograd runs."""
    model = build(case)
    rng = random.Random(seed)
    for p in model.parameters():
        p.requires_grad_(rng.random() < 0.3)
    flops = analytic(model)
    assert (flops.forward, flops.backward_input + flops.backward_weight) == counted(model)


#: Trainable parts whose gradient reaches a product only through a bias or a norm.
PATTERNS = {
    "top-layer biases": lambda spec: spec.layer == 1 and spec.name.endswith(".bias"),
    "head norm": lambda spec: spec.name.startswith("head.norm."),
    "top-layer ln2": lambda spec: spec.layer == 1 and spec.name.startswith("ln2."),
    "embeddings": lambda spec: spec.name.startswith("embed."),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", HEAVY_CASES)
def test_gradients_through_biases_and_norms_match_flop_counter(case, pattern):
    model = build(case)
    train_only(model, PATTERNS[pattern])
    flops = analytic(model)
    assert (flops.forward, flops.backward_input + flops.backward_weight) == counted(model)


@pytest.mark.parametrize("case", CASES)
def test_forward_only(case):
    model = build(case)
    inference = analytic(model, training=False)
    assert inference.backward_input == inference.backward_weight == 0
    assert inference.total == inference.forward == analytic(model).forward == counted(model)[0]


def test_all_frozen_costs_forward_only():
    model = build("gpt2-lm")
    model.requires_grad_(False)
    flops = analytic(model)
    assert flops.total == flops.forward


def test_gpt2_closed_form():
    """forward = T (L (2 (4 d^2 + 2 d f) + 4 S d) + 2 V d); everything trainable, backward = 2 x forward."""
    model = build("gpt2-lm")
    d, f, L, V, S, T_ = 48, 70, 2, 101, SEQ, BATCH * SEQ
    forward = T_ * (L * (2 * (4 * d * d + 2 * d * f) + 4 * S * d) + 2 * V * d)
    flops = analytic(model)
    assert flops.forward == forward
    assert flops.backward_input + flops.backward_weight == 2 * forward


def test_vit_counts_patches_and_class_token_head():
    model = build("vit-cls")
    ops = {(op.name, op.layer): op for op in analytic(model).ops}
    patches, d = (12 // 4) ** 2, 48
    assert ops[("embed.patch", None)].forward == 2 * BATCH * patches * d * 3 * 4 * 4
    assert ops[("embed.patch", None)].backward_input == 0  # the pixels need no gradient
    assert ops[("head.out", None)].forward == 2 * BATCH * d * 5  # class token only
    assert ops[("attn.scores", 0)].forward == 2 * BATCH * (patches + 1) ** 2 * d


def test_rejects_bad_arguments():
    model = build("gpt2-lm")
    with pytest.raises(TypeError, match="supported Hugging Face classes"):
        step_flops(torch.nn.Linear(2, 2), BATCH, SEQ)
    with pytest.raises(TypeError, match="batch_size"):
        step_flops(model, 2.0, SEQ)
    with pytest.raises(ValueError, match="batch_size"):
        step_flops(model, 0, SEQ)
    with pytest.raises(TypeError, match="seq_len is required"):
        step_flops(model, BATCH)
    with pytest.raises(ValueError, match="at most .* 40 positions, got 41"):
        step_flops(model, BATCH, 41)
    with pytest.raises(TypeError, match="training"):
        step_flops(model, BATCH, SEQ, training=1)
    with pytest.raises(ValueError, match="expected 10 from the config, got 16"):
        step_flops(build("vit-cls"), BATCH, SEQ)


def test_roberta_positions_serve_their_rows_less_the_padding_offset():
    """RoBERTa numbers positions from pad_token_id + 1: 40 rows with padding id 1 serve 38 tokens."""
    model = build("roberta-mlm")
    assert (model.config.max_position_embeddings, model.config.pad_token_id) == (40, 1)
    assert analytic(model).seq_len == SEQ and step_flops(model, 1, 38).seq_len == 38
    model(input_ids=torch.full((1, 38), 5))  # the last of them still has a row
    with pytest.raises(ValueError, match="at most the roberta model's 38 positions, got 39"):
        step_flops(model, 1, 39)


def test_deit_counts_patches_after_its_two_learned_tokens_and_both_classifiers():
    model = build("deit-teacher")
    flops = analytic(model)
    ops = {(op.name, op.layer): op for op in flops.ops}
    patches, d = (12 // 4) ** 2, 48
    assert flops.seq_len == patches + 2  # the class and the distillation token
    assert ops[("embed.patch", None)].forward == 2 * BATCH * patches * d * 3 * 4 * 4
    assert ops[("head.out", None)].forward == ops[("head.distillation", None)].forward == 2 * BATCH * d * 5
    assert ops[("attn.scores", 0)].forward == 2 * BATCH * (patches + 2) ** 2 * d


def test_opt_positions_serve_their_rows_less_the_offset_of_two():
    model = build("opt-lm")
    assert growlib.schema_of(model).dims["pos"] == 42 and step_flops(model, 1, 40).seq_len == 40
    with pytest.raises(ValueError, match="at most the opt model's 40 positions, got 41"):
        step_flops(model, 1, 41)


def test_linear_map_outside_the_traced_forward_raises(monkeypatch):
    """A linear map an adapter adds but the traced forward pass does not place would be uncounted FLOPs."""
    model = build("gpt2-lm")
    schema = growlib.schema_of(model)
    up = next(spec for spec in schema.specs if spec.key == ("mlp.up.weight", 0))
    schema.specs.append(dataclasses.replace(up, name="mlp.extra.weight"))
    monkeypatch.setattr(adapter_for(model), "schema", lambda m: schema)
    with pytest.raises(ValueError, match=r"\['mlp.extra.weight \(layer 0\)'\] of GPT2LMHeadModel"):
        step_flops(model, BATCH, SEQ)
