"""Checkpoints carry a format, a version and a SHA-256: a damaged file is refused with a clear error before
anything of the run changes, and an interrupted write never leaves a loadable half."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from growlib.schedules import build_schedule
from growlib.train.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, _checkpoint_bytes, load_checkpoint,
                                      save_checkpoint_atomically)
from growlib.train.metrics import MetricsLog
from tests.factories import tiny_model
from tests.train.test_loop import run

PAYLOAD = {"global_step": 3, "weights": torch.arange(1000, dtype=torch.float32), "notes": {"a": "b"}}


def test_a_checkpoint_round_trips_and_starts_with_its_header(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint_atomically(PAYLOAD, path)
    loaded = load_checkpoint(path)
    assert loaded["global_step"] == 3 and loaded["notes"] == {"a": "b"}
    assert torch.equal(loaded["weights"], PAYLOAD["weights"])
    header = json.loads(open(path, "rb").readline())
    assert header["format"] == CHECKPOINT_FORMAT and header["version"] == CHECKPOINT_VERSION
    assert len(header["sha256"]) == 64
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]  # no temporary file left behind


def flip_payload_byte(data: bytes) -> bytes:
    at = data.index(b"\n") + 200
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def with_version(data: bytes, version) -> bytes:
    end = data.index(b"\n")
    header = json.loads(data[:end])
    header["version"] = version
    return json.dumps(header).encode() + data[end:]


def plain_torch_save(_: bytes) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(PAYLOAD, buffer)
    return buffer.getvalue()


DAMAGE = [
    ("one payload byte flipped", flip_payload_byte, r"is corrupted: checksum mismatch"),
    ("bytes appended", lambda d: d + b"\0", r"is corrupted: it holds 1 bytes past"),
    ("payload cut short", lambda d: d[:len(d) - 100], r"is truncated: it holds \d+ of its \d+ payload bytes"),
    ("cut inside the header", lambda d: d[:20], r"is truncated: the file ends inside its header"),
    ("empty file", lambda d: b"", r"is truncated"),
    ("format version 1", lambda d: with_version(d, 1), r"unsupported version: format version 1"),
    ("no format version", lambda d: with_version(d, None), r"unsupported version: format version None"),
    ("a plain torch.save file", plain_torch_save, r"not a growlib checkpoint: it is a plain torch.save file"),
    ("a text file", lambda d: b"hello\nworld\n", r"not a growlib checkpoint: its first line"),
]


@pytest.mark.parametrize("damage,match", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_problem(tmp_path, damage, match):
    path = tmp_path / "ckpt.pt"
    save_checkpoint_atomically(PAYLOAD, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=match) as error:
        load_checkpoint(str(path))
    assert str(path) in str(error.value)


def test_the_temporary_file_of_an_interrupted_write_never_loads_and_is_cleared_by_the_next_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    blob = _checkpoint_bytes(PAYLOAD)
    stale = tmp_path / "ckpt.pt.tmp-12345"
    stale.write_bytes(blob[:len(blob) // 2])  # what a kill in the middle of a write leaves
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(str(stale))
    save_checkpoint_atomically(PAYLOAD, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 8-step run with its checkpoint (step 8) and metrics."""
    folder = tmp_path_factory.mktemp("trained")
    run(build_schedule("baseline", 8, 2), tiny_model("gpt2", layers=2), metrics=MetricsLog(str(folder / "m.jsonl")),
        checkpoint_path=str(folder / "ckpt.pt"), checkpoint_every=4, schedule_name="baseline")
    return folder


@pytest.mark.parametrize("damage,match", [d[1:] for d in DAMAGE if d[0] in
                                          ("one payload byte flipped", "payload cut short", "format version 1",
                                           "a plain torch.save file")],
                         ids=["corrupted", "truncated", "version", "plain torch.save"])
def test_resuming_from_a_damaged_checkpoint_changes_nothing(trained_run, tmp_path, damage, match):
    for name in ("ckpt.pt", "m.jsonl"):
        shutil.copy(trained_run / name, tmp_path / name)
    checkpoint, metrics = tmp_path / "ckpt.pt", tmp_path / "m.jsonl"
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    metrics.write_text(metrics.read_text() + '{"kind": "train", "step": 9, "loss": 1.0}\n')  # past the checkpoint
    before = {p: p.read_bytes() for p in (checkpoint, metrics)}
    model = tiny_model("gpt2", layers=2, seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        run(build_schedule("baseline", 8, 2), model, metrics=MetricsLog(str(metrics)),
            checkpoint_path=str(checkpoint), checkpoint_every=4, resume=True, schedule_name="baseline")
    assert {p: p.read_bytes() for p in (checkpoint, metrics)} == before  # the log was not truncated either
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_an_engine_checkpoint_is_loaded_only_when_every_file_it_names_is_intact(tmp_path):
    from growlib.train.checkpoint import engine_file_digests, remove_engine_checkpoints, verified_engine_checkpoint

    for tag in ("step10", "step20"):
        (tmp_path / tag).mkdir()
        for rank in (0, 1):
            (tmp_path / tag / f"rank{rank}_optim_states.pt").write_bytes(bytes([rank]) * 1000 + tag.encode())
    record = {"tag": "step20", "sha256": engine_file_digests(str(tmp_path), "step20")}
    assert sorted(record["sha256"]) == ["rank0_optim_states.pt", "rank1_optim_states.pt"]
    assert verified_engine_checkpoint(str(tmp_path), record) == "step20"
    remove_engine_checkpoints(str(tmp_path), keep="step20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step20"]

    damaged = tmp_path / "step20" / "rank1_optim_states.pt"
    damaged.write_bytes(b"\x01" * 999 + b"X" + b"step20")
    with pytest.raises(ValueError, match="rank1_optim_states.pt is corrupted"):
        verified_engine_checkpoint(str(tmp_path), record)
    damaged.unlink()
    with pytest.raises(ValueError, match="lacks rank1_optim_states.pt"):
        verified_engine_checkpoint(str(tmp_path), record)
    shutil.rmtree(tmp_path / "step20")
    with pytest.raises(ValueError, match="lacks rank0_optim_states.pt"):
        verified_engine_checkpoint(str(tmp_path), record)
