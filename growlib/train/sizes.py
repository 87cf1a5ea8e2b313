"""Model configurations by family and size name, so a user can say ``--model gpt2 --size tiny``."""

from __future__ import annotations

import json
import os

from growlib import names
from growlib.validate import require_int

#: (layers, hidden, heads, intermediate) per size; ``base`` is the real BERT-Base / GPT-2 small shape.
SIZES = {
    "tiny": (4, 128, 4, 512),
    "small": (6, 256, 8, 1024),
    "base": (12, 768, 12, 3072),
}
FAMILIES = names.FAMILIES


def _size(size: str | dict, name: str) -> dict:
    if isinstance(size, dict):
        return size
    if not isinstance(size, str):
        raise ValueError(f"{name} must be one of {sorted(SIZES)}, inline JSON, a JSON file or a dict, got {size!r}")
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
        raise ValueError(f"{name} {size!r} is not valid JSON: {error}") from None
    raise ValueError(f"{name} must be one of {sorted(SIZES)}, inline JSON, a JSON file or a dict, got {size!r}")


def parse_size(size: str | dict, name: str = "size") -> dict:
    """``size`` as a dict of layers, hidden, heads, intermediate (and kv_heads); ValueError naming it (``name``:
    how the caller calls it, e.g. ``Experiment.size``) otherwise."""
    s = _size(size, name)
    missing = {"layers", "hidden", "heads", "intermediate"} - set(s) if isinstance(s, dict) else set()
    if not isinstance(s, dict) or missing:
        raise ValueError(f"{name} needs keys layers, hidden, heads, intermediate; got {size!r}"
                         + (f", missing {sorted(missing)}" if missing else ""))
    unknown = set(s) - {"layers", "hidden", "heads", "intermediate", "kv_heads"}
    if unknown:
        raise ValueError(f"{name} takes keys layers, hidden, heads, intermediate, kv_heads; got unknown "
                         f"{sorted(unknown)}")
    for key, value in s.items():
        require_int(f"{name}'s {key}", value)
    if s["hidden"] % s["heads"] or s["heads"] % s.get("kv_heads", s["heads"]):
        raise ValueError(f"{name}'s hidden must be a multiple of heads, and heads a multiple of kv_heads; got {s}")
    return s


def config_family(config_file: str, name: str) -> str:
    """The family of a Hugging Face config.json (its ``model_type``, which is the adapter's family name); the
    argument ``name`` is named when the file is missing or of a family growlib does not train."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{name}: no such file: {config_file!r} (a save_pretrained folder holds config.json)")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{name}: {config_file} is a {model_type!r} config; growlib trains {FAMILIES}")
    return model_type


def build_model(family: str, size: str | dict, vocab_size: int, seq_len: int):
    """A freshly initialised HF model of ``family`` (its adapter's ``training_model``); ``size`` gives layers,
    hidden, heads, intermediate (and kv_heads).  ViT is shaped for the embedded digits images (``vocab_size`` and
    ``seq_len`` do not apply to it)."""
    from growlib.models import adapter_named  # here, not at the top: the command line's help does without it

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return adapter_named(family).training_model(parse_size(size), vocab_size, seq_len)
