"""End to end on a tiny GPT: `compare` runs every schedule on the same FLOPs and writes its summary."""

from __future__ import annotations

import csv
import dataclasses
import inspect

import pytest
import torch

from growlib.train.config import TrainConfig
from growlib.train.experiment import Experiment, compare, prepare_data, run, schedule_flops

SIZE = {"layers": 4, "hidden": 32, "heads": 2, "intermediate": 64}


@pytest.fixture
def experiment(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(inspect))
    config = TrainConfig(batch_size=4, seq_len=32, eval_every=10, eval_batches=2, warmup_steps=2)
    return Experiment(family="gpt2", size=SIZE, total_steps=40, config=config, data=str(corpus), vocab_size=300,
                      cache_dir=str(tmp_path / "cache"), device="cpu")


@pytest.mark.slow
def test_cheaper_schedules_get_more_steps_for_the_same_flops(experiment, tmp_path):
    table = compare(experiment, ["vcycle", "stack"], [0], str(tmp_path / "out"), log=lambda message: None,
                    tuning=None)
    rows = {r["schedule"]: r for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert set(rows) == {"baseline", "vcycle", "stack"}
    for name in ("vcycle", "stack"):
        assert float(rows[name]["total_flops_ratio"]) == pytest.approx(1.0, abs=0.05)
    assert "| stack |" in table
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "loss_vs_flops.png").exists()


def test_schedule_flops_counts_coarse_levels_as_cheaper(experiment):
    baseline = schedule_flops(experiment, "baseline", 40, None, 300)
    vcycle = schedule_flops(experiment, "vcycle", 40, None, 300)
    mslt = schedule_flops(experiment, "mslt", 40, {"layer_counts": [1, 2, 3, 4], "freeze_embeddings": True}, 300)
    assert vcycle < 0.8 * baseline and mslt < 0.8 * baseline
    # embeddings trainable: gradients pass down through the frozen layers, which then cost more than forward only
    assert mslt < schedule_flops(experiment, "mslt", 40, {"layer_counts": [1, 2, 3, 4], "freeze_embeddings": False,
                                                         "frozen_forward": False}, 300) < baseline


@pytest.mark.slow
@pytest.mark.parametrize("schedule,options", [
    ("vcycle", {"optimizer_policy": "map"}),  # the optimizer state mapped at the coarsening is charged too
    ("mslt", None),  # frozen layers
    ("ligo", None),  # work the transition reports: fitting the growth operator
])
def test_a_run_logs_exactly_the_flops_schedule_flops_predicts(experiment, schedule, options):
    """schedule_flops enters every stage through the loop's own code, without training: a real run's logged
    FLOPs are its prediction, to the last bit."""
    experiment = dataclasses.replace(experiment, total_steps=20)
    prepared = prepare_data(experiment)
    records = []
    result = run(experiment, schedule, options=options, prepared=prepared, progress=records.append)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[-1]["flops"] == result.flops == schedule_flops(experiment, schedule, 20, options,
                                                                  prepared.vocab_size) > 0


def test_unknown_budget_is_rejected(experiment, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        compare(experiment, ["stack"], [0], str(tmp_path), budget="tokens")


def test_sizes_by_name_inline_json_or_file(tmp_path):
    from growlib.train.sizes import build_model

    assert build_model("llama", "tiny", 300, 32).config.num_hidden_layers == 4
    inline = build_model("bert", '{"layers": 1, "hidden": 16, "heads": 2, "intermediate": 24}', 300, 32)
    assert (inline.config.num_hidden_layers, inline.config.hidden_size) == (1, 16)
    path = tmp_path / "size.json"
    path.write_text('{"layers": 3, "hidden": 16, "heads": 2, "intermediate": 24}')
    assert build_model("gpt2", str(path), 300, 32).config.n_layer == 3
    with pytest.raises(ValueError, match="size must be one of"):
        build_model("gpt2", "huge", 300, 32)
    with pytest.raises(ValueError, match="missing"):
        build_model("gpt2", {"layers": 2}, 300, 32)
    with pytest.raises(ValueError, match="family"):
        build_model("t5", "tiny", 300, 32)


def test_vit_trains_on_the_embedded_digits_through_a_vcycle():
    pytest.importorskip("sklearn")
    from growlib.train.experiment import run

    config = TrainConfig(batch_size=32, eval_every=30, eval_batches=4, warmup_steps=3, lr=3e-3)
    exp = Experiment(family="vit", size={"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64},
                     total_steps=60, config=config, device="cpu")
    records = []
    result = run(exp, "vcycle", progress=records.append)
    assert records[-1]["tokens"] == 60 * 32 * (4 * 4 + 1)  # 8x8 digits in 2x2 patches, + the class token
    assert result.evals[0].parameters < result.evals[-1].parameters  # step 30 is on the coarse level
    first_eval, last_eval = result.evals[0].val_loss, result.evals[-1].val_loss
    assert last_eval < first_eval < 2.5  # 10 classes: chance is ln 10 = 2.30
    assert result.final_val_loss < 2.2


def test_vit_refuses_text_data():
    from growlib.train.experiment import prepare_data

    with pytest.raises(ValueError, match="digits"):
        prepare_data(Experiment(family="vit", data="corpus.txt"))


@pytest.mark.parametrize("user,match", [
    ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
    ({"scheduler": {}}, "remove 'scheduler'"),
    ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
    ({"train_micro_batch_size_per_gpu": 3}, "disagrees"),
    ({"train_batch_size": 7}, "train_batch_size"),
])
def test_deepspeed_config_refuses_what_growlib_owns(user, match):
    from growlib.train.distributed import deepspeed_config

    with pytest.raises(ValueError, match=match):
        deepspeed_config(user, TrainConfig(batch_size=4))


def test_deepspeed_config_fills_in_growlibs_settings():
    from growlib.train.distributed import deepspeed_config

    merged = deepspeed_config({"zero_optimization": {"stage": 2}}, TrainConfig(batch_size=4, grad_accum=2, clip=0.5))
    assert merged == {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4,
                      "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}


@pytest.mark.slow
def test_a_run_read_back_from_its_checkpoint_returns_the_trained_model(experiment, tmp_path):
    """compare measures the evaluation's noise on the baseline's returned model: read back from the final
    checkpoint (nothing left to train) or resumed half-way, it must be the trained model, not a fresh one."""
    from growlib.train.experiment import prepare_data, train

    prepared = prepare_data(experiment)
    out = str(tmp_path / "runs")
    _, trained = train(experiment, "vcycle", 0, None, prepared, out_dir=out, checkpoint_every=10)
    _, read_back = train(experiment, "vcycle", 0, None, prepared, out_dir=out, resume=True)
    assert_same_weights(read_back, trained)

    class Stop(Exception):
        pass

    def stop_after_step_20(record):  # step 20's checkpoint is written; step 21 is not
        if record["step"] == 21:
            raise Stop

    half = str(tmp_path / "half")  # the same run stopped half-way, then resumed
    with pytest.raises(Stop):
        train(experiment, "vcycle", 0, None, prepared, out_dir=half, checkpoint_every=10, progress=stop_after_step_20)
    _, resumed = train(experiment, "vcycle", 0, None, prepared, out_dir=half, resume=True)
    assert_same_weights(resumed, trained)


def assert_same_weights(model, expected):
    assert type(model) is type(expected)
    for (name, a), (_, b) in zip(expected.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
