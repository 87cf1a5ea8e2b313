"""Bad inputs to growlib's public functions, as one table: (function, bad input, exception, message fragment).

Every error must name the parameter and say what was expected and what was received; a public function that
let a bad input through, or failed with an unrelated AttributeError, was fixed to do so.  The test ids read
as the table: ``function | bad input -> Exception``."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import transformers as T

import growlib
from growlib import names
from growlib.schedules import build_schedule
from growlib.train.experiment import Experiment, compare
from growlib.schedules.protocol import RunState, Stage, Transition
from growlib.train.config import TrainConfig
from growlib.train.distributed import deepspeed_config
from growlib.train.loop import run_schedule
from tests.factories import tiny_config, tiny_model


@functools.cache
def gpt2():
    return tiny_model("gpt2", layers=2)  # hidden 48, 4 heads of 12, ffn 70, 2 layers, tied


@functools.cache
def llama():
    return tiny_model("llama", layers=2)


def on_meta(model):
    """A model like ``model`` built on the meta device (no storage): the other half of a mixed-device call."""
    with torch.device("meta"):
        return type(model)(model.config)


def dims():
    return growlib.schema_of(gpt2()).dims


def optimizer(model):
    return torch.optim.AdamW(model.parameters())


def ligo(**kwargs):
    return growlib.LiGO(gpt2(), tiny_config("gpt2", layers=4), **kwargs)


def kron_args(W=None, E=None, F=None, D=None):
    return (torch.randn(2, 3, 4) if W is None else W, torch.randn(5, 3) if E is None else E,
            torch.randn(6, 4) if F is None else F, torch.randn(4, 2) if D is None else D)


def qkv(width=16):
    return torch.randn(1, 3, width)  # 2 query heads + 2 x 1 kv heads of size 4


def rope(qkv_tensor=None, cos=None, sin=None, num_heads=2, num_kv_heads=1):
    return growlib.rope_split_qkv(qkv() if qkv_tensor is None else qkv_tensor,
                              torch.randn(1, 3, 4) if cos is None else cos, torch.randn(1, 3, 4) if sin is None else sin,
                              num_heads=num_heads, num_kv_heads=num_kv_heads)


def one_structured_task():
    from tests.kernels.test_structured_map import one_task
    return one_task()


def structured_map_with(position, value):
    args = list(one_structured_task())
    args[position] = value
    growlib.structured_map_(*args)


def triton_kron_float64():
    with growlib.use_backend("triton"):
        growlib.kron_expand(*(t.double() for t in kron_args()))


SMALL = {"layers": 1, "hidden": 8, "heads": 1, "intermediate": 8}


def experiment(**kwargs):
    return Experiment(**{"size": SMALL, "total_steps": 2, "vocab_size": 300, **kwargs})


TABLE = [
    # --- coalesce -------------------------------------------------------------------------------------------
    ("coalesce", "model is a plain nn.Linear", lambda: growlib.coalesce(torch.nn.Linear(3, 3)),
     TypeError, r"model must be one of the supported Hugging Face classes .*got Linear"),
    ("coalesce", "model is an unsupported HF class", lambda: growlib.coalesce(
        T.GPT2ForSequenceClassification(tiny_config("gpt2"))), TypeError, r"model must be one of .*got GPT2ForSeq"),
    ("coalesce", "width=3 does not divide the sizes", lambda: growlib.coalesce(gpt2(), width=3),
     ValueError, r"width=3 must divide the intermediate size \(ffn=70\)"),
    ("coalesce", "width=0", lambda: growlib.coalesce(gpt2(), width=0), ValueError, r"width must be an int >= 1, got 0"),
    ("coalesce", "width=2.0 (a float)", lambda: growlib.coalesce(gpt2(), width=2.0),
     TypeError, r"width must be an int, got float"),
    ("coalesce", "depth=3 with 2 layers", lambda: growlib.coalesce(gpt2(), depth=3),
     ValueError, r"depth=3 must divide the number of layers \(2\)"),
    ("coalesce", "model on the meta device", lambda: growlib.coalesce(on_meta(gpt2())),
     ValueError, r"dst is on the meta device, which holds no data"),
    ("coalesce", "unknown depth_pairing", lambda: growlib.coalesce(gpt2(), depth_pairing="zip"),
     ValueError, r"depth_pairing must be one of \('adjacent', 'stack'\), got 'zip'"),
    # --- decoalesce -----------------------------------------------------------------------------------------
    ("decoalesce", "coarse is a plain nn.Linear", lambda: growlib.decoalesce(torch.nn.Linear(2, 2), like=gpt2()),
     TypeError, r"coarse must be one of the supported Hugging Face classes"),
    ("decoalesce", "like is a plain nn.Linear", lambda: growlib.decoalesce(
        growlib.coalesce(gpt2()), like=torch.nn.Linear(2, 2)), TypeError, r"like must be a gpt2 model or config, got Linear"),
    ("decoalesce", "like is of another family", lambda: growlib.decoalesce(growlib.coalesce(gpt2()), like=llama()),
     ValueError, r"like is a LlamaForCausalLM, not a model of the coarse model's family \(gpt2\)"),
    ("decoalesce", "like is None", lambda: growlib.decoalesce(growlib.coalesce(gpt2()), like=None),
     ValueError, r"like must be a gpt2 model or config, got NoneType"),
    ("decoalesce", "like is not an integer multiple", lambda: growlib.decoalesce(
        growlib.coalesce(gpt2()), like=tiny_config("gpt2", hidden=72, heads=6)),
     ValueError, r"like must be an integer multiple of the coarse model in every width"),
    # --- interpolate_ ---------------------------------------------------------------------------------------
    ("interpolate_", "alpha=2.0", lambda: growlib.interpolate_(gpt2(), growlib.coalesce(gpt2()), alpha=2.0),
     ValueError, r"alpha must lie in \[0, 1\], got 2.0"),
    ("interpolate_", "alpha is NaN", lambda: growlib.interpolate_(gpt2(), growlib.coalesce(gpt2()), float("nan")),
     ValueError, r"alpha must lie in \[0, 1\], got nan"),
    ("interpolate_", "alpha is a str", lambda: growlib.interpolate_(gpt2(), growlib.coalesce(gpt2()), alpha="0.5"),
     TypeError, r"alpha must be a number, got str"),
    ("interpolate_", "fine is a plain nn.Linear", lambda: growlib.interpolate_(torch.nn.Linear(2, 2), gpt2(), 0.5),
     TypeError, r"fine must be one of the supported Hugging Face classes"),
    ("interpolate_", "coarse of another family", lambda: growlib.interpolate_(gpt2(), growlib.coalesce(llama()), 0.5),
     ValueError, r"coarse is a LlamaForCausalLM but fine is a GPT2LMHeadModel"),
    ("interpolate_", "coarse is fine itself", lambda: growlib.interpolate_(gpt2(), gpt2(), 0.5),
     ValueError, r"fine and coarse are the same model"),
    ("interpolate_", "coarse on the meta device", lambda: growlib.interpolate_(
        gpt2(), on_meta(growlib.coalesce(gpt2())), 0.5), ValueError, r"fine is on cpu but coarse is on meta"),
    # --- grow_depth / restrict / prolong_ -------------------------------------------------------------------
    ("grow_depth", "fewer layers than the model", lambda: growlib.grow_depth(gpt2(), 1),
     ValueError, r"layers must be >= the model's 2 layers to grow it, got 1"),
    ("grow_depth", "layers=4.0 (a float)", lambda: growlib.grow_depth(gpt2(), 4.0),
     TypeError, r"layers must be an int, got float"),
    ("grow_depth", "unknown method", lambda: growlib.grow_depth(gpt2(), 4, method="zip"),
     ValueError, r"method must be one of \('stack', 'interleave', 'copy_top'\), got 'zip'"),
    ("grow_depth", "copy_top adding more layers than exist", lambda: growlib.grow_depth(gpt2(), 5, "copy_top"),
     ValueError, r"copy_top .* can add at most 2 layers to this model; got layers=5"),
    ("grow_depth", "model is a plain nn.Linear", lambda: growlib.grow_depth(torch.nn.Linear(2, 2), 4),
     TypeError, r"model must be one of the supported"),
    ("restrict", "an odd number of layers", lambda: growlib.restrict(tiny_model("gpt2", layers=3)),
     ValueError, r"needs an even number of layers, got 3"),
    ("restrict", "unknown parity", lambda: growlib.restrict(gpt2(), parity="both"),
     ValueError, r"parity must be one of \('even', 'odd'\), got 'both'"),
    ("prolong_", "coarse not half as deep", lambda: growlib.prolong_(gpt2(), tiny_model("gpt2", layers=2)),
     ValueError, r"coarse must have half of fine's 2 layers, got 2"),
    ("prolong_", "unknown parity", lambda: growlib.prolong_(gpt2(), growlib.restrict(gpt2()), parity="x"),
     ValueError, r"parity must be one of \('even', 'odd'\), got 'x'"),
    ("prolong_", "coarse on the meta device", lambda: growlib.prolong_(gpt2(), on_meta(growlib.restrict(gpt2()))),
     ValueError, r"fine is on cpu but coarse is on meta"),
    ("prolong_", "coarse is a plain nn.Linear", lambda: growlib.prolong_(gpt2(), torch.nn.Linear(2, 2)),
     TypeError, r"coarse must be one of the supported"),
    # --- widen ----------------------------------------------------------------------------------------------
    ("widen", "narrower hidden", lambda: growlib.widen(gpt2(), hidden=32),
     ValueError, r"hidden must be >= the current 48 to widen, got 32"),
    ("widen", "hidden=96.0 (a float)", lambda: growlib.widen(gpt2(), hidden=96.0),
     TypeError, r"hidden must be an int, got float"),
    ("widen", "negative intermediate", lambda: growlib.widen(gpt2(), hidden=96, intermediate=-1),
     ValueError, r"intermediate must be an int >= 1, got -1"),
    ("widen", "unknown method", lambda: growlib.widen(gpt2(), hidden=96, method="x"),
     ValueError, r"method must be one of \(.*'hypercloning'\), got 'x'"),
    ("widen", "heads that do not fit the hidden size", lambda: growlib.widen(gpt2(), hidden=96, heads=5),
     ValueError, r"GPT-2 needs heads \* head_dim == hidden size, got 5 \* 12 != 96"),
    ("widen", "hypercloning to a non-multiple", lambda: growlib.widen(gpt2(), hidden=60, method="hypercloning"),
     ValueError, r"hypercloning copies every unit equally often, so hidden=60 must be a multiple of 48"),
    ("widen", "negative seed", lambda: growlib.widen(gpt2(), hidden=96, seed=-1),
     ValueError, r"seed must be an int >= 0, got -1"),
    # --- map_optimizer_state --------------------------------------------------------------------------------
    ("map_optimizer_state", "source_optimizer is None", lambda: growlib.map_optimizer_state(
        None, gpt2(), optimizer(gpt2()), gpt2(), None), TypeError, r"source_optimizer must be a torch.optim.Optimizer, got NoneType"),
    ("map_optimizer_state", "unknown policy", lambda: growlib.map_optimizer_state(
        optimizer(gpt2()), gpt2(), optimizer(gpt2()), gpt2(), None, policy="x"), ValueError, r"policy must be one of \('map', 'reset'\), got 'x'"),
    ("map_optimizer_state", "growth_map is None", lambda: growlib.map_optimizer_state(
        optimizer(gpt2()), gpt2(), optimizer(gpt2()), gpt2(), None), TypeError, r"growth_map must be a growlib.GrowthMap .*got NoneType"),
    ("map_optimizer_state", "target_optimizer misses parameters", lambda: growlib.map_optimizer_state(
        optimizer(gpt2()), gpt2(), torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), gpt2(), None),
     ValueError, r"target_optimizer does not optimize every parameter of its model"),
    ("map_optimizer_state", "source optimizer never stepped", lambda: growlib.map_optimizer_state(
        optimizer(gpt2()), gpt2(), optimizer(gpt2()), gpt2(), growlib.grow_depth_map(dims(), 2)),
     ValueError, r"source_optimizer has no state for any parameter of source_model: take a step first"),
    ("map_optimizer_state", "models of two families", lambda: growlib.map_optimizer_state(
        optimizer(gpt2()), gpt2(), optimizer(llama()), llama(), growlib.grow_depth_map(dims(), 2)),
     ValueError, r"source_model and target_model must be of the same model family"),
    # --- apply_map / schema_of ------------------------------------------------------------------------------
    ("apply_map", "gmap is a str", lambda: growlib.apply_map("x", growlib.schema_of(gpt2()), growlib.schema_of(gpt2())),
     TypeError, r"gmap must be a growlib.GrowthMap .*got str"),
    ("apply_map", "source is a model, not a schema", lambda: growlib.apply_map(
        growlib.grow_depth_map(dims(), 2), gpt2(), growlib.schema_of(gpt2())), TypeError, r"source must be a growlib.Schema .*got GPT2LMHeadModel"),
    ("apply_map", "target of the wrong size", lambda: growlib.apply_map(
        growlib.coalesce_map(dims()), growlib.schema_of(gpt2()), growlib.schema_of(gpt2())),
     ValueError, r"the growth map expects a target with model=24, got 48"),
    ("apply_map", "schemas of two families", lambda: growlib.apply_map(
        growlib.coalesce_map(dims()), growlib.schema_of(gpt2()), growlib.schema_of(llama())),
     ValueError, r"source is a gpt2 schema but target is a llama schema"),
    ("apply_map", "alpha=3.0", lambda: growlib.apply_map(growlib.grow_depth_map(dims(), 2), growlib.schema_of(gpt2()),
                                                       growlib.schema_of(tiny_model("gpt2")), alpha=3.0),
     ValueError, r"alpha must lie in \[0, 1\], got 3.0"),
    ("apply_map", "target on the meta device", lambda: growlib.apply_map(
        growlib.grow_depth_map(dims(), 2), growlib.schema_of(gpt2()), growlib.schema_of(on_meta(gpt2()))),
     ValueError, r"source tensors are on \['cpu'\] and target tensors on \['meta'\]: a map runs on one device"),
    ("schema_of", "a plain nn.Linear", lambda: growlib.schema_of(torch.nn.Linear(2, 2)),
     TypeError, r"model must be one of the supported .*got Linear"),
    ("schema_of", "None", lambda: growlib.schema_of(None), TypeError, r"model must be one of .*got NoneType"),
    ("schema_of", "an unsupported HF class", lambda: growlib.schema_of(
        T.BertForSequenceClassification(tiny_config("bert"))), TypeError, r"got BertForSequenceClassification"),
    # --- LiGO -----------------------------------------------------------------------------------------------
    ("LiGO", "small_model is a plain nn.Linear", lambda: growlib.LiGO(torch.nn.Linear(2, 2), tiny_config("gpt2")),
     TypeError, r"small_model must be one of the supported"),
    ("LiGO", "target_config of another family", lambda: growlib.LiGO(gpt2(), tiny_config("llama")),
     ValueError, r"target_config must be a GPT2Config like the small GPT2LMHeadModel's config, got LlamaConfig"),
    ("LiGO", "target_config is a dict", lambda: growlib.LiGO(gpt2(), {"n_layer": 4}),
     TypeError, r"target_config must be a transformers PretrainedConfig, got dict"),
    ("LiGO", "a smaller target", lambda: growlib.LiGO(gpt2(), tiny_config("gpt2", hidden=24, heads=2)),
     ValueError, r"target_config.n_embd must be >= the small model's 48: LiGO only grows models, got 24"),
    ("LiGO", "a target with another head size", lambda: growlib.LiGO(gpt2(), tiny_config("gpt2", hidden=96)),
     ValueError, r"target_config.head_dim must equal the small model's 12"),
    ("LiGO", "unknown depth_init", lambda: ligo(depth_init="x"),
     ValueError, r"depth_init must be one of \('stack', 'interleave', 'copy_top'\), got 'x'"),
    ("LiGO", "width_init='bert2bert_aki'", lambda: ligo(width_init="bert2bert_aki"),
     ValueError, r"width_init='bert2bert_aki' gives the new units"),
    ("LiGO", "unknown tie", lambda: ligo(tie="x"), ValueError, r"tie must be one of \('paper', 'shared'\), got 'x'"),
    ("LiGO", "negative seed", lambda: ligo(seed=-1), ValueError, r"seed must be an int >= 0, got -1"),
    ("LiGO.fit", "steps=0", lambda: ligo().fit({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, steps=0),
     ValueError, r"steps must be an int >= 1, got 0"),
    ("LiGO.fit", "negative lr", lambda: ligo().fit({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, steps=1, lr=-1),
     ValueError, r"lr must be a positive number, got -1"),
    ("LiGO.fit", "warmup_steps past steps", lambda: ligo().fit({}, steps=2, warmup_steps=3),
     ValueError, r"warmup_steps must be <= steps=2, got 3"),
    ("LiGO.fit", "batches is an int", lambda: ligo().fit(42, steps=1),
     TypeError, r"batches must be a dict of model inputs or an iterable of them, got int"),
    # --- freeze_forward -------------------------------------------------------------------------------------
    ("freeze_forward", "a plain nn.Linear layer", lambda: growlib.freeze_forward([torch.nn.Linear(2, 2)]),
     TypeError, r"layers\[0\] is a Linear; freeze_forward supports BertLayer, GPT2Block"),
    ("freeze_forward", "no layers", lambda: growlib.freeze_forward([]),
     ValueError, r"layers must hold at least one layer"),
    ("freeze_forward", "one layer, not a list", lambda: growlib.freeze_forward(gpt2().transformer.h[0]),
     TypeError, r"layers must be a list, tuple or nn.ModuleList of HF layers, got GPT2Block"),
    ("freeze_forward", "an integer dtype", lambda: growlib.freeze_forward(list(gpt2().transformer.h), dtype=torch.int32),
     TypeError, r"dtype must be a floating-point torch.dtype or None, got torch.int32"),
    ("freeze_forward", "layers of two families", lambda: growlib.freeze_forward(
        [gpt2().transformer.h[0], llama().model.layers[0]]), ValueError, r"layers must all be of one family"),
    ("freeze_forward", "layers on two devices", lambda: growlib.freeze_forward(
        [gpt2().transformer.h[0], on_meta(gpt2()).transformer.h[1]]), ValueError, r"the layers' parameters must all be on one device"),
    ("freeze_forward", "model is an int", lambda: growlib.freeze_forward(list(gpt2().transformer.h), model=42),
     TypeError, r"model must be an nn.Module \(the model holding the layers\), got int"),
    # --- growlib.kron_expand / kron_expand_vector ---------------------------------------------------------------
    ("growlib.kron_expand", "W is 2-D", lambda: growlib.kron_expand(*kron_args(W=torch.randn(3, 4))),
     ValueError, r"W must be 3-D \(L1, O1, I1\), got shape \(3, 4\)"),
    ("growlib.kron_expand", "E of the wrong width", lambda: growlib.kron_expand(*kron_args(E=torch.randn(5, 2))),
     ValueError, r"E must be 2-D \(O2, O1\) with O1=3 \(W.shape\[1\]\), got shape \(5, 2\)"),
    ("growlib.kron_expand", "F of the wrong width", lambda: growlib.kron_expand(*kron_args(F=torch.randn(6, 3))),
     ValueError, r"F must be 2-D \(I2, I1\) with I1=4 \(W.shape\[2\]\), got shape \(6, 3\)"),
    ("growlib.kron_expand", "D of the wrong width", lambda: growlib.kron_expand(*kron_args(D=torch.randn(4, 3))),
     ValueError, r"D must be 2-D \(L2, L1\) with L1=2 \(W.shape\[0\]\), got shape \(4, 3\)"),
    ("growlib.kron_expand", "an integer dtype", lambda: growlib.kron_expand(*(t.int() for t in kron_args())),
     TypeError, r"W must be float32, bfloat16 or float64, got torch.int32"),
    ("growlib.kron_expand", "float16", lambda: growlib.kron_expand(*(t.half() for t in kron_args())),
     TypeError, r"W must be float32, bfloat16 or float64, got torch.float16"),
    ("growlib.kron_expand", "E in float64, W in float32", lambda: growlib.kron_expand(*kron_args(E=torch.randn(5, 3).double())),
     TypeError, r"E has dtype torch.float64 but W has torch.float32"),
    ("growlib.kron_expand", "E on the meta device", lambda: growlib.kron_expand(*kron_args(E=torch.randn(5, 3, device="meta"))),
     ValueError, r"E is on meta but W is on cpu: all inputs must share a device"),
    ("growlib.kron_expand", "W is a list", lambda: growlib.kron_expand(*kron_args(W=[[1.0]])),
     TypeError, r"W must be a torch.Tensor, got list"),
    ("growlib.kron_expand", "float64 on the Triton backend", triton_kron_float64,
     TypeError, r"the Triton backend supports .* for W, got torch.float64; use backend 'torch'"),
    ("growlib.kron_expand_vector", "w is 3-D", lambda: growlib.kron_expand_vector(torch.randn(2, 3, 4), torch.randn(5, 3),
                                                                          torch.randn(4, 2)),
     ValueError, r"w must be 2-D \(L1, O1\), got shape \(2, 3, 4\)"),
    ("growlib.kron_expand_vector", "E of the wrong width", lambda: growlib.kron_expand_vector(
        torch.randn(2, 3), torch.randn(5, 4), torch.randn(4, 2)), ValueError, r"E must be 2-D \(O2, O1\) with O1=3 \(w.shape\[1\]\)"),
    ("growlib.kron_expand_vector", "D of the wrong width", lambda: growlib.kron_expand_vector(
        torch.randn(2, 3), torch.randn(5, 3), torch.randn(4, 5)), ValueError, r"D must be 2-D \(L2, L1\) with L1=2 \(w.shape\[0\]\)"),
    # --- growlib.add_norm ---------------------------------------------------------------------------------------
    ("growlib.add_norm", "an integer x", lambda: growlib.add_norm(torch.ones(2, 3, dtype=torch.int32), eps=1e-5),
     TypeError, r"x must be a floating-point tensor, got torch.int32"),
    ("growlib.add_norm", "x is a list", lambda: growlib.add_norm([[1.0]], eps=1e-5), TypeError, r"x must be a torch.Tensor, got list"),
    ("growlib.add_norm", "negative eps", lambda: growlib.add_norm(torch.ones(2, 3), eps=-1.0),
     ValueError, r"eps must be a finite number >= 0, got -1.0"),
    ("growlib.add_norm", "infinite eps", lambda: growlib.add_norm(torch.ones(2, 3), eps=float("inf")),
     ValueError, r"eps must be a finite number >= 0, got inf"),
    ("growlib.add_norm", "residual of another shape", lambda: growlib.add_norm(torch.ones(2, 3), torch.ones(2, 4), eps=1e-5),
     ValueError, r"residual must match x: expected torch.float32 \(2, 3\), got torch.float32 \(2, 4\)"),
    ("growlib.add_norm", "residual in float64", lambda: growlib.add_norm(torch.ones(2, 3), torch.ones(2, 3).double(), eps=1e-5),
     ValueError, r"residual must match x: expected torch.float32 \(2, 3\), got torch.float64"),
    ("growlib.add_norm", "weight of the wrong length", lambda: growlib.add_norm(torch.ones(2, 3), weight=torch.ones(4), eps=1e-5),
     ValueError, r"weight must have shape \(3,\) \(x's last axis\), got \(4,\)"),
    ("growlib.add_norm", "weight on the meta device", lambda: growlib.add_norm(
        torch.ones(2, 3), weight=torch.ones(3, device="meta"), eps=1e-5), ValueError, r"weight is on meta but the input is on cpu"),
    ("growlib.add_norm", "a zero-size last axis", lambda: growlib.add_norm(torch.ones(2, 0), eps=1e-5),
     ValueError, r"x must have a non-empty last axis, got shape \(2, 0\)"),
    ("growlib.add_norm", "a 0-d x", lambda: growlib.add_norm(torch.tensor(1.0), eps=1e-5),
     ValueError, r"x must have a non-empty last axis, got shape \(\)"),
    ("growlib.add_norm", "x requires grad", lambda: growlib.add_norm(torch.ones(2, 3, requires_grad=True), eps=1e-5),
     RuntimeError, r"add_norm is forward-only \(it has no backward\), but x requires grad"),
    # --- growlib.bias_activation / gated_activation -------------------------------------------------------------
    ("growlib.bias_activation", "unknown activation", lambda: growlib.bias_activation(torch.ones(2, 3), activation="tanh"),
     ValueError, r"activation must be one of \('gelu', 'gelu_tanh', 'silu', 'relu'\), got 'tanh'"),
    ("growlib.bias_activation", "bias of the wrong length", lambda: growlib.bias_activation(
        torch.ones(2, 3), torch.ones(2), activation="gelu"), ValueError, r"bias must have shape \(3,\) \(x's last axis\), got \(2,\)"),
    ("growlib.bias_activation", "an integer x", lambda: growlib.bias_activation(torch.ones(2, 3, dtype=torch.long),
                                                                        activation="gelu"),
     TypeError, r"x must be a floating-point tensor, got torch.int64"),
    ("growlib.bias_activation", "bias on the meta device", lambda: growlib.bias_activation(
        torch.ones(2, 3), torch.ones(3, device="meta"), activation="gelu"), ValueError, r"bias is on meta but the input is on cpu"),
    ("growlib.bias_activation", "an integer bias", lambda: growlib.bias_activation(
        torch.ones(2, 3), torch.ones(3, dtype=torch.int32), activation="gelu"), TypeError, r"bias must be a floating-point tensor"),
    ("growlib.gated_activation", "an odd last axis", lambda: growlib.gated_activation(torch.ones(2, 3)),
     ValueError, r"x's last axis must be even \(\[gate \| up\] halves\), got 3"),
    ("growlib.gated_activation", "unknown activation", lambda: growlib.gated_activation(torch.ones(2, 4), activation="x"),
     ValueError, r"activation must be one of .*got 'x'"),
    ("growlib.gated_activation", "x requires grad", lambda: growlib.gated_activation(torch.ones(2, 4, requires_grad=True)),
     RuntimeError, r"gated_activation is forward-only"),
    # --- growlib.rope_split_qkv ---------------------------------------------------------------------------------
    ("growlib.rope_split_qkv", "qkv is 2-D", lambda: rope(qkv_tensor=torch.randn(3, 16)),
     ValueError, r"qkv must be 3-D \(batch, seq, \(heads \+ 2 \* kv_heads\) \* head_dim\), got shape \(3, 16\)"),
    ("growlib.rope_split_qkv", "num_heads=0", lambda: rope(num_heads=0), ValueError, r"num_heads must be an int >= 1, got 0"),
    ("growlib.rope_split_qkv", "num_heads=True (a bool)", lambda: rope(num_heads=True),
     TypeError, r"num_heads must be an int, got bool"),
    ("growlib.rope_split_qkv", "a width that is no whole number of heads", lambda: rope(qkv_tensor=qkv(17)),
     ValueError, r"qkv's last axis \(17\) must be \(num_heads \+ 2 \* num_kv_heads\) = 4 heads"),
    ("growlib.rope_split_qkv", "an odd head size", lambda: rope(qkv_tensor=qkv(12), cos=torch.randn(1, 3, 3)),
     ValueError, r"the head size must be even for rotary embeddings, got 3"),
    ("growlib.rope_split_qkv", "cos of the wrong shape", lambda: rope(cos=torch.randn(1, 3, 2)),
     ValueError, r"cos must have shape \(1 or 1, 3, 4\) \(batch, seq, head_dim\), got \(1, 3, 2\)"),
    ("growlib.rope_split_qkv", "sin on the meta device", lambda: rope(sin=torch.randn(1, 3, 4, device="meta")),
     ValueError, r"sin is on meta but the input is on cpu"),
    ("growlib.rope_split_qkv", "an integer qkv", lambda: rope(qkv_tensor=qkv().long()),
     TypeError, r"qkv must be a floating-point tensor, got torch.int64"),
    # --- growlib.structured_map_ (more in tests/kernels/test_structured_map.py) ------------------------------------
    ("growlib.structured_map_", "depth_weight on the meta device", lambda: structured_map_with(
        2, torch.ones(1, 1, device="meta")), ValueError, r"depth_weight is on meta but dst is on cpu"),
    ("growlib.structured_map_", "src on the meta device", lambda: structured_map_with(
        1, [[torch.randn(3, 4, device="meta")]]), ValueError, r"src\[0\]\[0\] must be a 2-D torch.float32 tensor on cpu, got 2-D torch.float32 on meta"),
    ("growlib.structured_map_", "an expanded dst", lambda: structured_map_with(0, [torch.zeros(1, 4).expand(3, 4)]),
     ValueError, r"dst\[0\] has a zero stride \(an expanded tensor\)"),
    # --- build_schedule -------------------------------------------------------------------------------------
    ("build_schedule", "unknown schedule", lambda: build_schedule("x", 10, 2),
     ValueError, r"schedule must be one of \['baseline', .*\], got 'x'"),
    ("build_schedule", "unknown option", lambda: build_schedule("vcycle", 100, 2, foo=1),
     ValueError, r"schedule 'vcycle' takes options \[.*\], got unknown \['foo'\]"),
    ("build_schedule", "total_steps=0", lambda: build_schedule("baseline", 0, 2),
     ValueError, r"total_steps must be an int >= 1, got 0"),
    ("build_schedule", "total_steps=10.5", lambda: build_schedule("baseline", 10.5, 2),
     TypeError, r"total_steps must be an int, got float"),
    ("build_schedule", "final_layers=0", lambda: build_schedule("stack", 100, 0),
     ValueError, r"final_layers must be an int >= 1, got 0"),
    ("build_schedule", "too few steps for the stages", lambda: build_schedule("vcycle", 3, 2),
     ValueError, r"total_steps=3 is too small for stage fractions"),
    ("build_schedule", "an odd depth for a V-cycle", lambda: build_schedule("vcycle", 100, 3),
     ValueError, r"the model's 3 layers must be a multiple of 2"),
    ("build_schedule", "alpha=2.0", lambda: build_schedule("vcycle", 100, 2, alpha=2.0),
     ValueError, r"alpha must lie in \[0, 1\], got 2.0"),
    ("build_schedule", "levels=0", lambda: build_schedule("vcycle", 100, 2, levels=0),
     ValueError, r"levels must be an int >= 2, got 0"),
    ("build_schedule", "unknown optimizer_policy", lambda: build_schedule("vcycle", 100, 2, optimizer_policy="x"),
     ValueError, r"optimizer_policy must be one of \('reset', 'keep', 'map'\), got 'x'"),
    ("build_schedule", "cycles=0", lambda: build_schedule("ode_multilevel", 100, 2, cycles=0),
     ValueError, r"cycles must be an int >= 1, got 0"),
    # --- TrainConfig / Stage / run_schedule -----------------------------------------------------------------
    ("TrainConfig", "lr=0", lambda: TrainConfig(lr=0), ValueError, r"TrainConfig.lr must be a positive number, got 0"),
    ("TrainConfig", "lr is NaN", lambda: TrainConfig(lr=float("nan")),
     ValueError, r"TrainConfig.lr must be a finite number, got nan"),
    ("TrainConfig", "lr is a str", lambda: TrainConfig(lr="0.1"),
     TypeError, r"TrainConfig.lr must be a number, got str"),
    ("TrainConfig", "negative clip", lambda: TrainConfig(clip=-1.0),
     ValueError, r"TrainConfig.clip must be >= 0 \(clip 0: no clipping\), got -1.0"),
    ("TrainConfig", "negative weight_decay", lambda: TrainConfig(weight_decay=-0.1),
     ValueError, r"TrainConfig.weight_decay must be >= 0"),
    ("TrainConfig", "negative warmup_steps", lambda: TrainConfig(warmup_steps=-1),
     ValueError, r"TrainConfig.warmup_steps must be an int >= 0, got -1"),
    ("TrainConfig", "seq_len=64.0 (a float)", lambda: TrainConfig(seq_len=64.0),
     TypeError, r"TrainConfig.seq_len must be an int, got float"),
    ("TrainConfig", "batch_size=0", lambda: TrainConfig(batch_size=0),
     ValueError, r"TrainConfig.batch_size must be an int >= 1, got 0"),
    ("TrainConfig", "negative seed", lambda: TrainConfig(seed=-1), ValueError, r"TrainConfig.seed must be an int >= 0"),
    ("TrainConfig", "min_lr_ratio=2", lambda: TrainConfig(min_lr_ratio=2.0),
     ValueError, r"TrainConfig.min_lr_ratio must lie in \[0, 1\], got 2.0"),
    ("TrainConfig", "unknown lr_schedule", lambda: TrainConfig(lr_schedule="linear"),
     ValueError, r"TrainConfig.lr_schedule must be 'restart', 'continue' or None \(each stage's own\), got 'linear'"),
    ("TrainConfig", "unknown on_nonfinite", lambda: TrainConfig(on_nonfinite="ignore"),
     ValueError, r"TrainConfig.on_nonfinite must be one of \('stop', 'skip'\), got 'ignore'"),
    ("TrainConfig", "max_consecutive_skips=0", lambda: TrainConfig(max_consecutive_skips=0),
     ValueError, r"TrainConfig.max_consecutive_skips must be an int >= 1, got 0"),
    ("Stage", "steps=0", lambda: Stage("s", 0, lambda s: Transition(s.model)),
     ValueError, r"stage 's': steps must be an int >= 1, got 0"),
    ("run_schedule", "on_nonfinite='skip' with deepspeed", lambda: run_schedule(
        [Stage("s", 1, lambda s: Transition(s.model))], RunState(gpt2()), TrainConfig(on_nonfinite="skip"),
        train_batch=None, eval_batches=[], step_flops=None, deepspeed={}),
     ValueError, r"TrainConfig.on_nonfinite='skip' is not supported with deepspeed"),
    # --- Experiment / compare -------------------------------------------------------------------------------
    ("Experiment", "unknown family", lambda: experiment(family="t5"),
     ValueError, rf"Experiment.family must be one of {re.escape(repr(names.FAMILIES))}, got 't5'"),
    ("Experiment", "total_steps=0", lambda: experiment(total_steps=0),
     ValueError, r"Experiment.total_steps must be an int >= 1, got 0"),
    ("Experiment", "vocab_size=0", lambda: experiment(vocab_size=0),
     ValueError, r"Experiment.vocab_size must be an int >= 1, got 0"),
    ("Experiment", "config is a dict", lambda: experiment(config={"lr": 1.0}),
     TypeError, r"Experiment.config must be a growlib TrainConfig, got dict"),
    ("Experiment", "unknown device", lambda: experiment(device="tpu"),
     ValueError, r"Experiment.device must name a torch device .*got 'tpu'"),
    ("Experiment", "unknown size", lambda: experiment(size="huge"),
     ValueError, r"size must be one of \['base', 'small', 'tiny'\], inline JSON, a JSON file or a dict, got 'huge'"),
    ("Experiment", "size without hidden", lambda: experiment(size={"layers": 2, "heads": 2, "intermediate": 8}),
     ValueError, r"size needs keys layers, hidden, heads, intermediate; .*missing \['hidden'\]"),
    ("Experiment", "data that does not exist", lambda: experiment(data="/nonexistent/corpus.txt"),
     FileNotFoundError, r"Experiment.data: no such file or folder: '/nonexistent/corpus.txt'"),
    ("compare", "unknown budget", lambda: compare(experiment(), ["baseline"], [0], "unused", budget="tokens"),
     ValueError, r"budget must be one of \('steps', 'flops'\), got 'tokens'"),
    ("compare", "unknown schedule", lambda: compare(experiment(), ["nope"], [0], "unused"),
     ValueError, r"schedules must be a non-empty list of \[.*\], got \['nope'\]"),
    ("compare", "no seeds", lambda: compare(experiment(), ["baseline"], [], "unused"),
     ValueError, r"seeds must be a non-empty list of ints, got \[\]"),
    ("compare", "seeds as strings", lambda: compare(experiment(), ["baseline"], ["0"], "unused"),
     ValueError, r"seeds must be a non-empty list of ints, got \['0'\]"),
    # --- deepspeed_config -----------------------------------------------------------------------------------
    ("deepspeed_config", "user_config is a list", lambda: deepspeed_config([], TrainConfig()),
     TypeError, r"deepspeed config must be a dict \(the parsed JSON\), got list"),
    ("deepspeed_config", "config is a dict", lambda: deepspeed_config({}, {"batch_size": 3}),
     TypeError, r"config must be a growlib TrainConfig, got dict"),
    ("deepspeed_config", "an optimizer section", lambda: deepspeed_config({"optimizer": {}}, TrainConfig()),
     ValueError, r"deepspeed config: remove 'optimizer'"),
    ("deepspeed_config", "ZeRO stage 4", lambda: deepspeed_config({"zero_optimization": {"stage": 4}}, TrainConfig()),
     ValueError, r"zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ("deepspeed_config", "zero_optimization is a number", lambda: deepspeed_config({"zero_optimization": 2},
                                                                                   TrainConfig()),
     ValueError, r"zero_optimization must be an object such as \{\"stage\": 2\}, got 2"),
    ("deepspeed_config", "a micro-batch size that disagrees", lambda: deepspeed_config(
        {"train_micro_batch_size_per_gpu": 3}, TrainConfig()), ValueError, r"train_micro_batch_size_per_gpu=3 disagrees with growlib's setting 16"),
    ("deepspeed_config", "a train_batch_size that disagrees", lambda: deepspeed_config({"train_batch_size": 3},
                                                                                       TrainConfig()),
     ValueError, r"train_batch_size=3, but batch size x accumulation x processes = 16"),
]


@pytest.mark.parametrize("call,error,match", [row[2:] for row in TABLE],
                         ids=[f"{row[0]} | {row[1]} -> {row[3].__name__}" for row in TABLE])
def test_a_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_table_has_one_row_per_bad_input():
    ids = [(row[0], row[1]) for row in TABLE]
    assert len(ids) == len(set(ids))
