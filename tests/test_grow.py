"""growlib grow: a save_pretrained folder of every family grown, measured, saved and loaded back with
from_pretrained (no missing or unexpected keys); the tokenizer travels with it; the output folder is written
whole or not at all and never replaced unasked; bad folders and sizes are refused naming the argument."""

from __future__ import annotations

import json
import os

import pytest

from growlib import cli
from growlib.errors import InputError
from growlib.grow import REPORT_FILE, grow_checkpoint
from growlib.models import adapter_for
from tests.factories import FAMILIES, MODEL_CLASSES, tiny_model

CORPUS = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))


def saved(tmp_path, family: str) -> str:
    folder = str(tmp_path / f"{family}-small")
    tiny_model(family).save_pretrained(folder)
    return folder


def saved_with_tokenizer(tmp_path) -> tuple[str, str]:
    """A GPT-2 whose vocabulary is a small BPE tokenizer's (growlib's, as an HF fast tokenizer) saved beside it;
    returns (the folder, the corpus file)."""
    from transformers import GPT2LMHeadModel

    from growlib.train.data import train_bpe
    from growlib.train.export import hf_tokenizer
    from tests.factories import tiny_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    tokenizer = hf_tokenizer(train_bpe([CORPUS], 300, tmp_path / "cache"), 40)
    folder = str(tmp_path / "gpt2-small")
    config = tiny_config("gpt2")
    config.vocab_size = len(tokenizer)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, str(corpus)


def load_back(family: str, folder: str):
    model, info = MODEL_CLASSES[family].from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_hypercloning_a_saved_model_keeps_its_function_and_loads_back(family, tmp_path):
    source = saved(tmp_path, family)
    report = grow_checkpoint(source, str(tmp_path / "grown"), hidden=96, intermediate=140)
    assert report.relative_logit_error < 1e-4, report
    grown = load_back(family, str(tmp_path / "grown"))
    dims = adapter_for(grown).dims(grown.config)
    assert (dims["model"], dims["ffn"], dims["layers"]) == (96, 140, 2)
    recorded = json.loads((tmp_path / "grown" / REPORT_FILE).read_text())
    assert recorded["method"] == "hypercloning" and recorded["target_dims"]["model"] == 96


@pytest.mark.parametrize("depth_method", ["stack", "interleave", "copy_top"])
def test_depth_growth_reports_how_far_the_function_moved(depth_method, tmp_path):
    source = saved(tmp_path, "gpt2")
    report = grow_checkpoint(source, str(tmp_path / "deep"), layers=4, depth_method=depth_method)
    assert report.method == depth_method and report.target_dims["layers"] == 4
    assert report.relative_logit_error > 1e-3  # stacking is not function-preserving, and the report says so
    assert load_back("gpt2", str(tmp_path / "deep")).config.n_layer == 4


def test_the_tokenizer_travels_and_the_check_runs_on_real_text(tmp_path):
    from transformers import AutoTokenizer

    source, corpus = saved_with_tokenizer(tmp_path)
    report = grow_checkpoint(source, str(tmp_path / "grown"), hidden=96, data=corpus, seq_len=16)
    assert report.checked_on == f"4 x 16 tokens of {corpus}"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "grown")).vocab_size == \
        AutoTokenizer.from_pretrained(source).vocab_size


def test_ligo_fitted_on_data_gives_a_loadable_larger_model(tmp_path):
    source, corpus = saved_with_tokenizer(tmp_path)
    report = grow_checkpoint(source, str(tmp_path / "ligo"), hidden=96, layers=3, ligo_steps=2, data=corpus,
                             batch_size=2, seq_len=16)
    assert report.method.startswith("ligo (2 steps")
    grown = load_back("gpt2", str(tmp_path / "ligo"))
    assert (grown.config.n_embd, grown.config.n_layer) == (96, 3)


def test_an_existing_folder_is_never_replaced_unasked_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    source = saved(tmp_path, "llama")
    out = tmp_path / "grown"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        grow_checkpoint(source, str(out), hidden=96)
    assert (out / "keep.txt").read_text() == "mine"

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(type(tiny_model("llama")), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        grow_checkpoint(source, str(out), hidden=96, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"  # the old folder stands until the new one is whole
    assert sorted(os.listdir(tmp_path)) == ["grown", "llama-small"]  # no staging folder left behind
    monkeypatch.undo()
    grow_checkpoint(source, str(out), hidden=96, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_the_command_line_grows_and_names_bad_arguments(tmp_path, capsys):
    source = saved(tmp_path, "bert")
    assert cli.main(["grow", source, str(tmp_path / "big"), "--hidden", "96", "--layers", "3"]) == 0
    assert "max relative logit error" in capsys.readouterr().err
    assert load_back("bert", str(tmp_path / "big")).config.num_hidden_layers == 3
    bad = [
        ([str(tmp_path), str(tmp_path / "x")], "is not a save_pretrained folder"),
        ([source, str(tmp_path / "x"), "--layers", "1"], "--layers must be >= the source's 2"),
        ([source, str(tmp_path / "x"), "--hidden", "24"], "hidden must be >= the current 48"),
        ([source, str(tmp_path / "x"), "--ligo-steps", "2"], "bert model is trained on masked_lm"),
        ([source, str(tmp_path / "x"), "--data", str(tmp_path / "missing.txt")], "no such file or folder"),
    ]
    for argv, message in bad:
        assert cli.main(["grow", *argv]) == cli.EXIT_USAGE, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists()


def test_a_model_growlib_does_not_support_is_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    folder = str(tmp_path / "classifier")
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(folder)
    with pytest.raises(InputError, match="holds a GPT2ForSequenceClassification; growlib grows"):
        grow_checkpoint(folder, str(tmp_path / "out"), hidden=32)
