"""Training from a saved model (--init-from) with its own tokenizer (--tokenizer): the first stage starts from the
checkpoint's weights, the full model is its config at --size; checkpoints, tokenizers and data that disagree are
refused before any data is read; the run's identity covers the checkpoint's and the tokenizer's contents."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from growlib import cli
from growlib.errors import InputError
from growlib.train.config import TrainConfig
from growlib.train.experiment import Experiment, compare, train
from tests.factories import tiny_config

CORPUS = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i % 7}  # step {i}\n"
                   for i in range(400))
TOKENS = 300
LAYERS_2 = {"layers": 2, "hidden": 48, "heads": 4, "intermediate": 70}
LAYERS_4 = {**LAYERS_2, "layers": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder of a 2-layer GPT-2 saved with its BPE tokenizer, the corpus file, a folder with another tokenizer)."""
    from transformers import GPT2LMHeadModel

    from growlib.train.data import train_bpe
    from growlib.train.export import hf_tokenizer

    root = tmp_path_factory.mktemp("init-from")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    tokenizer = hf_tokenizer(train_bpe([CORPUS], TOKENS, root / "cache"), 64)
    folder = root / "small"
    config = tiny_config("gpt2", layers=2)
    config.vocab_size, config.n_positions = len(tokenizer), 64
    torch.manual_seed(3)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bigger = root / "bigger-tokenizer"
    hf_tokenizer(train_bpe([CORPUS], TOKENS + 100, root / "cache"), 64).save_pretrained(bigger)
    return str(folder), str(corpus), str(bigger)


def experiment(checkpoint, **changes) -> Experiment:
    folder, corpus, _ = checkpoint
    config = TrainConfig(lr=1e-9, warmup_steps=0, batch_size=2, seq_len=16, eval_every=4, eval_batches=1)
    return dataclasses.replace(Experiment(family="gpt2", size=None, total_steps=4, config=config, data=corpus,
                                          init_from=folder, device="cpu"), **changes)


def saved_state(folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder).state_dict()


def test_the_baseline_starts_from_the_checkpoint_and_keeps_its_tokenizer(checkpoint, tmp_path):
    from growlib import load_run

    result, model = train(experiment(checkpoint), "baseline", out_dir=str(tmp_path / "out"))
    start = saved_state(checkpoint[0])
    for name, tensor in model.state_dict().items():  # lr 1e-9: four steps move nothing measurable
        torch.testing.assert_close(tensor, start[name], atol=1e-6, rtol=0, msg=name)
    loaded = load_run(str(tmp_path / "out" / "baseline-seed0"))
    assert len(loaded.tokenizer) == model.config.vocab_size == start["transformer.wte.weight"].shape[0]


def test_a_growth_schedule_grows_from_the_checkpoint_to_the_full_size(checkpoint):
    _, model = train(experiment(checkpoint, size=LAYERS_4, total_steps=8), "stack",
                     options={"layer_counts": [2, 4]})
    assert model.config.n_layer == 4
    start, grown = saved_state(checkpoint[0]), model.state_dict()
    for layer in range(4):  # stacking copies the checkpoint's layer l mod 2 into layer l
        torch.testing.assert_close(grown[f"transformer.h.{layer}.mlp.c_fc.weight"],
                                   start[f"transformer.h.{layer % 2}.mlp.c_fc.weight"], atol=1e-6, rtol=0)


def test_a_checkpoint_that_does_not_fit_the_first_stage_is_refused_before_the_data(checkpoint, tmp_path,
                                                                                      capsys):
    folder, corpus, _ = checkpoint
    twelve = '{"layers": 12, "hidden": 48, "heads": 4, "intermediate": 70}'  # stack's first stage: 12 / 4 = 3 layers
    argv = ["train", "--init-from", folder, "--size", twelve, "--schedule", "stack", "--steps", "8", "--data", corpus,
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "does not fit the schedule's first stage ('layers3')" in err and "layers 2 there, 3 here" in err, err
    assert not (tmp_path / "out").exists()
    assert cli.main([*argv, "--schedule-args", "layer_counts=2,6,12"]) == 0  # a first stage of 2 layers fits


def test_checkpoint_tokenizer_and_data_that_disagree_are_refused(checkpoint, tmp_path):
    folder, corpus, bigger = checkpoint
    with pytest.raises(InputError, match=r"tokenizer has 400 tokens, but the model's vocabulary holds 300"):
        train(experiment(checkpoint, tokenizer=bigger), "baseline")
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if os.path.exists(os.path.join(folder, name)):
            (bare / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    with pytest.raises(InputError, match="holds no tokenizer.*pass --tokenizer DIR"):
        train(experiment(checkpoint, init_from=str(bare)), "baseline")
    with pytest.raises(ValueError, match="init_from: .*config.json is a gpt2 config, but Experiment.family is "
                                         "'llama'"):
        experiment(checkpoint, family="llama")
    with pytest.raises(ValueError, match="size and Experiment.target_config both"):
        experiment(checkpoint, size=LAYERS_2, target_config=os.path.join(folder, "config.json"))


def test_the_run_identity_covers_the_checkpoints_contents(checkpoint, tmp_path):
    """The same folder path with other weights is another run: resuming into it is refused, naming the flag."""
    import shutil

    from growlib.train.runs import RunFolderError

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint[0], copy)
    exp = experiment(checkpoint, init_from=str(copy))
    train(exp, "baseline", out_dir=str(tmp_path / "out"), checkpoint_every=2)
    from transformers import GPT2LMHeadModel

    changed = GPT2LMHeadModel.from_pretrained(copy)
    with torch.no_grad():
        changed.transformer.wte.weight.add_(1.0)
    changed.save_pretrained(copy)
    with pytest.raises(RunFolderError, match=r"--init-from \(the checkpoint's files\)"):
        train(exp, "baseline", out_dir=str(tmp_path / "out"), resume=True)


@pytest.mark.slow
def test_compare_grows_from_the_checkpoint_against_a_baseline_from_scratch(checkpoint, tmp_path):
    lines = []
    exp = experiment(checkpoint, size=LAYERS_4, total_steps=8,
                     config=dataclasses.replace(experiment(checkpoint).config, lr=1e-3))
    table = compare(exp, ["stack"], [0], str(tmp_path / "out"), options={"stack": {"layer_counts": [2, 4]}},
                    tuning=None, log=lines.append)
    assert any("baseline: the full model from scratch" in line for line in lines)
    assert "| stack |" in table and "| baseline |" in table
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"starting from {checkpoint[0]} (the baseline: from scratch)" in summary


def test_a_tokenizer_whose_pad_id_the_model_does_not_know_is_refused(checkpoint, tmp_path):
    """RoBERTa counts positions from its pad id: a model built for pad 0 must not train on a tokenizer padding
    with another id (its <eos> here)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint[0])
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "eos-pads")
    exp = experiment(checkpoint, family="roberta", init_from=None, tokenizer=str(tmp_path / "eos-pads"),
                     size=LAYERS_2)
    with pytest.raises(InputError, match=r"pads with id 3, but the RobertaForMaskedLM is built for pad id 0"):
        train(exp, "baseline")

