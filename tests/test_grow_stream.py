"""growlib grow --stream: a checkpoint grown file to file, one parameter at a time, equals the in-memory growth
bit for bit for every family (sharded source and output, loads back with no missing or unexpected keys), holds
far less than the models at once, and refuses what it cannot do; the safetensors reader and writer it rests on
round-trip awkward shapes and dtypes and refuse damaged files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from growlib import cli
from growlib.errors import InputError
from growlib.grow import REPORT_FILE, grow_checkpoint
from growlib.safetensors_files import (INDEX_FILE, PlannedTensor, index_checkpoint, plan_shards, read_tensor,
                                       write_checkpoint)
from tests.factories import FAMILIES, MODEL_CLASSES, tiny_model


def saved(tmp_path, family: str, dtype=torch.float32, **save_options) -> str:
    folder = str(tmp_path / f"{family}-small")
    tiny_model(family).to(dtype).save_pretrained(folder, **save_options)
    return folder


def loaded_state(family: str, folder: str) -> dict:
    model, info = MODEL_CLASSES[family].from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.state_dict()


def assert_bit_identical(family: str, expected_folder: str, got_folder: str) -> None:
    expected, got = loaded_state(family, expected_folder), loaded_state(family, got_folder)
    assert expected.keys() == got.keys()
    differing = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not differing, differing
    assert all(expected[name].dtype == got[name].dtype for name in expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_growth_equals_the_in_memory_growth_bit_for_bit(family, tmp_path):
    source = saved(tmp_path, family, max_shard_size="30KB")  # a sharded source
    options = dict(layers=4, hidden=96, intermediate=140, width_method="net2net", depth_method="interleave", seed=3)
    grow_checkpoint(source, str(tmp_path / "in-memory"), **options)
    report = grow_checkpoint(source, str(tmp_path / "streamed"), stream=True, max_shard_bytes=40_000, **options)
    assert_bit_identical(family, str(tmp_path / "in-memory"), str(tmp_path / "streamed"))
    assert os.path.isfile(tmp_path / "streamed" / INDEX_FILE)  # sharded as asked
    assert report.streamed and report.relative_logit_error is None and report.target_dims["layers"] == 4
    recorded = json.loads((tmp_path / "streamed" / REPORT_FILE).read_text())
    assert recorded["largest_group_bytes"] == report.largest_group_bytes > 0


@pytest.mark.parametrize("width_method,depth_method", [("hypercloning", "stack"), ("bert2bert_fpi", "copy_top")])
def test_streaming_keeps_a_half_precision_checkpoint_in_its_dtype(width_method, depth_method, tmp_path):
    source = saved(tmp_path, "llama", dtype=torch.bfloat16)
    options = dict(layers=3, hidden=96, width_method=width_method, depth_method=depth_method)
    grow_checkpoint(source, str(tmp_path / "in-memory"), **options)
    grow_checkpoint(source, str(tmp_path / "streamed"), stream=True, **options)
    assert_bit_identical("llama", str(tmp_path / "in-memory"), str(tmp_path / "streamed"))
    stored = index_checkpoint(str(tmp_path / "streamed"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}


def test_streaming_holds_one_group_of_tensors_not_the_models(tmp_path):
    source = saved(tmp_path, "gpt2")
    report = grow_checkpoint(source, str(tmp_path / "grown"), layers=8, hidden=96, stream=True)
    grown_bytes = sum(t.nbytes for t in index_checkpoint(str(tmp_path / "grown")).values())
    source_bytes = sum(t.nbytes for t in index_checkpoint(source).values())
    # the largest group: the grown token embedding (vocab x 96) and the source's (vocab x 48)
    assert report.largest_group_bytes < 0.25 * (grown_bytes + source_bytes)


def test_the_command_line_streams_and_names_a_bad_shard_size(tmp_path, capsys):
    source = saved(tmp_path, "gpt2")
    assert cli.main(["grow", source, str(tmp_path / "grown"), "--layers", "3", "--stream",
                     "--max-shard-mb", "1"]) == 0
    assert json.loads((tmp_path / "grown" / REPORT_FILE).read_text())["streamed"]
    capsys.readouterr()
    assert cli.main(["grow", source, str(tmp_path / "other"), "--stream", "--max-shard-mb", "0"]) == cli.EXIT_USAGE
    assert "--max-shard-mb must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["grow", source, str(tmp_path / "other"), "--max-shard-mb", "10"]) == cli.EXIT_USAGE
    assert "--max-shard-mb sizes the files --stream writes" in capsys.readouterr().err


@pytest.mark.parametrize("options,named", [
    (dict(ligo_steps=2), "--ligo-steps"),
    (dict(data="corpus.txt"), "--data"),
    (dict(width_method="bert2bert_aki", hidden=96), "bert2bert_aki"),
])
def test_streaming_refuses_what_needs_the_model_in_memory(options, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text\n")
    source = saved(tmp_path, "gpt2")
    with pytest.raises(InputError, match=named):
        grow_checkpoint(source, str(tmp_path / "grown"), stream=True, **options)
    assert not os.path.exists(tmp_path / "grown")


def test_streaming_refuses_a_checkpoint_without_safetensors_or_missing_a_tensor(tmp_path):
    source = saved(tmp_path, "gpt2")
    state = {name: read_tensor(entry) for name, entry in index_checkpoint(source).items()}
    os.remove(os.path.join(source, "model.safetensors"))
    torch.save(state, os.path.join(source, "pytorch_model.bin"))
    with pytest.raises(InputError, match="safetensors checkpoints only"):
        grow_checkpoint(source, str(tmp_path / "a"), stream=True)
    del state["transformer.h.1.mlp.c_fc.weight"]
    write_checkpoint(source, [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in state.items()],
                     lambda planned: state[planned.name], 10**9)
    with pytest.raises(InputError, match=r"lacks the tensors \['transformer.h.1.mlp.c_fc.weight'\]"):
        grow_checkpoint(source, str(tmp_path / "b"), layers=4, stream=True)


def test_a_checkpoint_saved_without_the_base_model_prefix_streams_as_it_loads(tmp_path):
    source = saved(tmp_path, "gpt2")  # tied head: every tensor lives under transformer.
    state = {name: read_tensor(entry) for name, entry in index_checkpoint(source).items()}
    os.remove(os.path.join(source, "model.safetensors"))
    bare = {name.removeprefix("transformer."): tensor for name, tensor in state.items()}  # as hub GPT-2 stores it
    write_checkpoint(source, [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in bare.items()],
                     lambda planned: bare[planned.name], 10**9)
    grow_checkpoint(source, str(tmp_path / "in-memory"), layers=3)
    grow_checkpoint(source, str(tmp_path / "streamed"), layers=3, stream=True)
    assert_bit_identical("gpt2", str(tmp_path / "in-memory"), str(tmp_path / "streamed"))


def test_a_failed_streamed_write_leaves_no_output_and_no_staging_folder(tmp_path, monkeypatch):
    import growlib.grow_stream as grow_stream

    source = saved(tmp_path, "gpt2")

    def failing_map(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(grow_stream, "apply_map_to_slots", failing_map)
    with pytest.raises(OSError):
        grow_checkpoint(source, str(tmp_path / "grown"), layers=4, stream=True)
    assert sorted(os.listdir(tmp_path)) == ["gpt2-small"]


def test_growing_in_memory_what_does_not_fit_is_refused_naming_stream(tmp_path, monkeypatch):
    import growlib.grow as grow

    source = saved(tmp_path, "gpt2")
    monkeypatch.setattr(grow, "_available_memory_bytes", lambda: 10_000)
    with pytest.raises(InputError, match=r"GiB are available: pass --stream"):
        grow_checkpoint(source, str(tmp_path / "grown"), layers=4)
    grow_checkpoint(source, str(tmp_path / "grown"), layers=4, stream=True)  # streaming needs no such room
    with pytest.raises(InputError, match="LiGO, --data and bert2bert_aki need both models in memory"):
        grow_checkpoint(source, str(tmp_path / "aki"), hidden=96, width_method="bert2bert_aki")


# -- the safetensors files ------------------------------------------------------------------------------------

AWKWARD = [((1,), torch.float32), ((7, 13), torch.bfloat16), ((129,), torch.float16), ((3, 1, 5), torch.float64),
           ((1025,), torch.int64), ((2, 3), torch.bool)]


@pytest.mark.parametrize("max_shard_bytes", [1, 700, 10**9])
def test_written_checkpoints_read_back_here_and_in_the_safetensors_library(max_shard_bytes, tmp_path):
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(0)
    values = {f"t{i}": (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
              for i, (shape, dtype) in enumerate(AWKWARD)}
    planned = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in values.items()]
    files = write_checkpoint(str(tmp_path), planned, lambda p: values[p.name], max_shard_bytes)
    assert len(files) == (len(values) if max_shard_bytes == 1 else 1 if max_shard_bytes == 10**9 else len(files))
    stored = index_checkpoint(str(tmp_path))
    assert stored.keys() == values.keys()
    for name, expected in values.items():
        assert torch.equal(read_tensor(stored[name]), expected)
        with safe_open(stored[name].path, "pt") as f:
            assert torch.equal(f.get_tensor(name), expected)


def test_shards_stay_under_the_limit_unless_one_tensor_is_larger():
    tensors = [PlannedTensor(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(tensors, 80)
    assert [[t.name for t in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert [t for shard in shards for t in shard] == tensors  # nothing lost, order kept
    with pytest.raises(InputError, match="max_shard_bytes must be >= 1"):
        plan_shards(tensors, 0)


def test_a_produced_tensor_must_be_what_the_header_promised(tmp_path):
    planned = [PlannedTensor("w", (3, 4), torch.float32)]
    with pytest.raises(ValueError, match=r"w: produced \(4, 3\)"):
        write_checkpoint(str(tmp_path), planned, lambda p: torch.zeros(4, 3), 10**9)


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    values = {"w": torch.arange(12, dtype=torch.float32).view(3, 4)}
    write_checkpoint(str(tmp_path), [PlannedTensor("w", (3, 4), torch.float32)], lambda p: values["w"], 10**9)
    path = tmp_path / "model.safetensors"
    whole = path.read_bytes()
    path.write_bytes(whole[:-8])  # truncated inside the tensor
    with pytest.raises(InputError, match="claims bytes"):
        index_checkpoint(str(tmp_path))
    path.write_bytes(struct.pack("<Q", 10**12) + whole[8:])  # a header longer than the file
    with pytest.raises(InputError, match="its header claims"):
        index_checkpoint(str(tmp_path))
    path.write_bytes(whole[:8] + b"{" * (len(whole) - 8))
    with pytest.raises(InputError, match="no JSON"):
        index_checkpoint(str(tmp_path))
    for header, problem in ((b"[1, 2]", "a JSON list, not an object"), (b'{"w": {"dtype": "F32"}}', "lacks dtype")):
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(InputError, match=problem):
            index_checkpoint(str(tmp_path))


def test_a_damaged_shard_index_is_refused_naming_it(tmp_path):
    (tmp_path / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(InputError, match="needs a JSON object with a weight_map"):
        index_checkpoint(str(tmp_path))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(InputError, match=r"names files that are not in .*model-00001-of-00002.safetensors"):
        index_checkpoint(str(tmp_path))
