"""Every run in a folder ends with its final model exported to model/ (``save_pretrained``, safetensors) with its
tokenizer, written whole or not at all, and ``load_run`` gives back the model, tokenizer and identity: the same
weights as the final checkpoint, the same logits, the same token ids."""

from __future__ import annotations

import errno
import glob
import inspect
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import transformers

from growlib.train.data import validation_batches
from growlib.train.experiment import Experiment, compare, prepare_data, run
from growlib.train.export import load_run
from growlib.train.checkpoint import CheckpointWriteError, load_checkpoint
from growlib.train.config import TrainConfig
from growlib.train.metrics import evaluate
from growlib.train.sizes import build_model
from tests.factories import tiny_run_experiment

SIZE = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}
TEXT = 'def grow(model):\n    """Ein Modell wächst: ∑ layers"""\n    return model  # done\n'


@pytest.fixture
def exp(tmp_path):
    return tiny_run_experiment(tmp_path)


def checkpoint_state(folder) -> dict:
    return load_checkpoint(str(folder / "checkpoint.pt"))["model"]["state"]


def assert_equals_checkpoint(model: torch.nn.Module, folder) -> None:
    state = checkpoint_state(folder)
    exported = model.state_dict()
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name


def test_a_run_exports_its_final_model_that_load_run_reads_back(exp, tmp_path):
    run(exp, "stack", 0, out_dir=str(tmp_path), checkpoint_every=4)  # stack: the final model is the grown one
    folder = tmp_path / "stack-seed0"
    files = set(os.listdir(folder / "model"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "run.json"} <= files
    assert not glob.glob(str(folder / "model" / "*.bin")) and not glob.glob(str(folder / ".model-export-*"))

    loaded = load_run(folder)
    assert type(loaded.model) is transformers.GPT2LMHeadModel and loaded.model.config.n_layer == 2
    assert loaded.model.loss_type == "ForCausalLM"  # named, as growlib names it: transformers would warn
    assert loaded.identity == json.loads((folder / "run.json").read_text())["identity"]
    assert loaded.identity["schedule"] == "stack"
    assert_equals_checkpoint(loaded.model, folder)

    reference = build_model("gpt2", SIZE, 300, 16)
    reference.load_state_dict(checkpoint_state(folder))
    reference.eval()
    batch = torch.tensor([prepare_data(exp).tokenizer.encode(TEXT)[:16]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch).logits, reference(batch).logits)
    assert torch.equal(load_run(folder / "model").model.lm_head.weight, loaded.model.lm_head.weight)


def test_the_exported_tokenizer_encodes_and_decodes_as_the_runs_own(exp, tmp_path):
    run(exp, "baseline", 0, out_dir=str(tmp_path))
    own = prepare_data(exp).tokenizer
    exported = load_run(tmp_path / "baseline-seed0").tokenizer
    ids = own.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges are used: the BPE vocabulary itself came across
    assert exported.encode(TEXT, add_special_tokens=False) == ids
    assert exported(TEXT)["input_ids"] == ids  # nothing is added around the text either
    assert exported.decode(ids) == TEXT == own.decode(ids)
    assert ((exported.pad_token_id, exported.mask_token_id, exported.bos_token_id, exported.eos_token_id)
            == own.special_ids)
    assert exported.model_max_length == exp.config.seq_len


def test_a_run_without_a_tokenizer_exports_the_model_alone(tmp_path):
    pytest.importorskip("sklearn")
    config = TrainConfig(batch_size=8, eval_every=4, eval_batches=1, warmup_steps=1)
    exp = Experiment(family="vit", size=SIZE, total_steps=4, config=config, device="cpu")
    run(exp, "baseline", 0, out_dir=str(tmp_path))
    loaded = load_run(tmp_path / "baseline-seed0")
    assert loaded.tokenizer is None and not (tmp_path / "baseline-seed0" / "model" / "tokenizer.json").exists()
    assert type(loaded.model) is transformers.ViTForImageClassification
    assert_equals_checkpoint(loaded.model, tmp_path / "baseline-seed0")


@pytest.mark.slow
def test_compare_exports_every_run_and_again_when_a_run_read_back_lacks_its_export(exp, tmp_path):
    compare(exp, ["baseline"], [0], str(tmp_path), tuning=None, log=lambda message: None)
    folder = tmp_path / "baseline-seed0"
    assert_equals_checkpoint(load_run(folder).model, folder)
    checkpoint = (folder / "checkpoint.pt").read_bytes()
    for name in os.listdir(folder / "model"):
        os.remove(folder / "model" / name)
    os.rmdir(folder / "model")
    compare(exp, ["baseline"], [0], str(tmp_path), tuning=None, log=lambda message: None)
    assert (folder / "checkpoint.pt").read_bytes() == checkpoint  # read back, not trained again
    assert_equals_checkpoint(load_run(folder).model, folder)  # the trained model, not a fresh one


def test_an_interrupted_run_has_no_export_and_load_run_says_resume_finishes_it(exp, tmp_path):
    def interrupt_at_step_6(record):
        if record["step"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(exp, "baseline", 0, out_dir=str(tmp_path), checkpoint_every=4, progress=interrupt_at_step_6)
    folder = tmp_path / "baseline-seed0"
    assert not (folder / "model").exists()
    message = f"run folder {re.escape(str(folder))} holds no exported model \\(model/\\): the run has not finished"
    with pytest.raises(FileNotFoundError, match=message + ".* with --resume"):
        load_run(folder)
    run(exp, "baseline", 0, out_dir=str(tmp_path), resume=True)
    assert_equals_checkpoint(load_run(folder).model, folder)


def test_load_run_names_the_path_and_what_it_expected(tmp_path):
    nowhere = re.escape(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"path '{nowhere}' is not a folder; expected a growlib run folder"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))} is not a growlib run folder: expected "
                                                "model/ with config.json and run.json"):
        load_run(tmp_path)


def test_an_export_on_a_full_disk_leaves_no_model_folder_and_resume_exports(exp, tmp_path, monkeypatch):
    def disk_full(tokenizer, directory, *args, **kwargs):
        open(os.path.join(directory, "tokenizer.json"), "w").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"could not export the model to .*model: No space left on device; "
                                                   r"the final checkpoint is intact, and --resume writes the export "
                                                   r"again"):
        run(exp, "baseline", 0, out_dir=str(tmp_path))
    monkeypatch.undo()
    folder = tmp_path / "baseline-seed0"
    assert not (folder / "model").exists() and not glob.glob(str(folder / ".model-export-*"))
    run(exp, "baseline", 0, out_dir=str(tmp_path), resume=True)
    assert_equals_checkpoint(load_run(folder).model, folder)


KILLED_HALFWAY = """
import os, pickle, sys, transformers
from growlib.train.experiment import run

def killed(tokenizer, directory, *args, **kwargs):  # the model's files are written, the tokenizer's half
    open(os.path.join(directory, "tokenizer.json"), "w").close()
    os._exit(9)

transformers.PreTrainedTokenizerFast.save_pretrained = killed
with open(sys.argv[1], "rb") as f:
    run(pickle.load(f), "baseline", 0, out_dir=sys.argv[2])
"""


@pytest.mark.subprocess
def test_an_export_killed_halfway_leaves_no_model_folder_and_resume_exports(exp, tmp_path):
    (tmp_path / "exp.pickle").write_bytes(pickle.dumps(exp))
    killed = subprocess.run([sys.executable, "-c", KILLED_HALFWAY, str(tmp_path / "exp.pickle"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    folder = tmp_path / "baseline-seed0"
    leftovers = glob.glob(str(folder / ".model-export-*"))
    assert len(leftovers) == 1 and not (folder / "model").exists()
    with pytest.raises(FileNotFoundError, match="holds no exported model"):
        load_run(folder)
    run(exp, "baseline", 0, out_dir=str(tmp_path), resume=True)  # finished: read back, exported, nothing trained
    assert not os.path.exists(leftovers[0])
    assert_equals_checkpoint(load_run(folder).model, folder)


def test_starting_a_run_over_discards_the_export_of_the_run_it_replaces(exp, tmp_path):
    run(exp, "baseline", 0, out_dir=str(tmp_path))

    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(exp, "baseline", 0, out_dir=str(tmp_path), overwrite=True, progress=interrupt)
    assert not (tmp_path / "baseline-seed0" / "model").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_under_torchrun_rank_0_exports_the_final_model(tmp_path, engine):
    """Two processes; DeepSpeed writes no checkpoint, so the export is checked against the final evaluation."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))
    size = tmp_path / "size.json"
    size.write_text(json.dumps(SIZE))
    (tmp_path / "deepspeed.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               "29531" if engine == "ddp" else "29532", "-m", "growlib.cli", "train", "--model", "gpt2", "--size",
               str(size), "--data", str(corpus), "--vocab-size", "300", "--steps", "6", "--batch-size", "2",
               "--seq-len", "16", "--eval-every", "6", "--eval-batches", "1", "--schedule", "baseline", "--out",
               str(tmp_path / "out"), *(["--deepspeed", str(tmp_path / "deepspeed.json")] if engine == "deepspeed"
                                        else [])]
    env = {**os.environ, "GROWLIB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "out" / "baseline-seed0"
    assert not glob.glob(str(folder / ".model-export-*"))
    loaded = load_run(folder)
    assert loaded.identity["processes"] == 2 and loaded.tokenizer is not None
    if engine == "ddp":
        assert_equals_checkpoint(loaded.model, folder)
    final_eval = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][-1]
    prepared = prepare_data(Experiment(data=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache")))
    batches = validation_batches(prepared.validation, 2, 16, 1)
    assert final_eval["kind"] == "eval" and evaluate(loaded.model, batches) == pytest.approx(final_eval["val_loss"])


def test_the_exported_config_names_the_tokenizers_special_tokens(exp, tmp_path):
    """generate() stops at config.eos_token_id: it must be the tokenizer's <eos>, not id 0 (<pad>)."""
    out = tmp_path / "out"
    run(exp, "baseline", 0, out_dir=str(out))
    loaded = load_run(str(out / "baseline-seed0"))
    for role in ("bos", "eos", "pad"):
        assert getattr(loaded.model.config, f"{role}_token_id") == getattr(loaded.tokenizer, f"{role}_token_id")
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.model.config.eos_token_id) == "<eos>"
