"""Model configurations by family and size name, so a user can say ``--model gpt2 --size tiny``."""

from __future__ import annotations

import json
import os

from growlib import names

#: (layers, hidden, heads, intermediate) per size; ``base`` is the real BERT-Base / GPT-2 small shape.
SIZES = {
    "tiny": (4, 128, 4, 512),
    "small": (6, 256, 8, 1024),
    "base": (12, 768, 12, 3072),
}
FAMILIES = names.FAMILIES
#: ViT on the embedded 8x8 digits: 2x2 patches (16 patches + the class token), 3 channels, 10 classes.
DIGITS_VIT = {"image_size": 8, "patch_size": 2, "num_channels": 3, "num_labels": 10}


def _size(size: str | dict) -> dict:
    if isinstance(size, dict):
        return size
    if not isinstance(size, str):
        raise ValueError(f"size must be one of {sorted(SIZES)}, inline JSON, a JSON file or a dict, got {size!r}")
    if size in SIZES:
        layers, hidden, heads, ffn = SIZES[size]
        return {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": ffn}
    try:
        if size.lstrip().startswith("{"):
            return json.loads(size)
        if os.path.exists(size):
            with open(size) as f:
                return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"size {size!r} is not valid JSON: {error}") from None
    raise ValueError(f"size must be one of {sorted(SIZES)}, inline JSON, a JSON file or a dict, got {size!r}")


def parse_size(size: str | dict) -> dict:
    """``size`` as a dict of layers, hidden, heads, intermediate (and kv_heads); ValueError naming it otherwise."""
    s = _size(size)
    missing = {"layers", "hidden", "heads", "intermediate"} - set(s) if isinstance(s, dict) else set()
    if not isinstance(s, dict) or missing:
        raise ValueError(f"size needs keys layers, hidden, heads, intermediate; got {size!r}"
                         + (f", missing {sorted(missing)}" if missing else ""))
    unknown = set(s) - {"layers", "hidden", "heads", "intermediate", "kv_heads"}
    if unknown:
        raise ValueError(f"size takes keys layers, hidden, heads, intermediate, kv_heads; got unknown {sorted(unknown)}")
    for key, value in s.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"size's {key} must be an int >= 1, got {value!r}")
    if s["hidden"] % s["heads"] or s["heads"] % s.get("kv_heads", s["heads"]):
        raise ValueError(f"size's hidden must be a multiple of heads, and heads a multiple of kv_heads; got {s}")
    return s


def build_model(family: str, size: str | dict, vocab_size: int, seq_len: int):
    """A freshly initialised HF model; ``size`` gives layers, hidden, heads, intermediate (and kv_heads).

    ViT is shaped for the embedded digits images (``vocab_size`` and ``seq_len`` do not apply to it)."""
    import transformers as T  # here, not at the top: the command line's help and checks do without it

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    s = parse_size(size)
    if family == "gpt2":
        return _causal_lm_loss(T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=vocab_size, n_positions=seq_len, n_embd=s["hidden"], n_layer=s["layers"],
            n_head=s["heads"], n_inner=s["intermediate"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0)))
    if family == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["intermediate"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            **DIGITS_VIT))
    if family == "bert":
        return T.BertForMaskedLM(T.BertConfig(
            vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=s["hidden"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=seq_len, hidden_size=s["hidden"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s.get("kv_heads", s["heads"]), intermediate_size=s["intermediate"],
        tie_word_embeddings=True))


def _causal_lm_loss(model):
    """Name GPT-2's loss, which transformers cannot infer from the class name (it would warn on every run)."""
    model.loss_type = "ForCausalLM"
    return model
