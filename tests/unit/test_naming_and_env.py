"""The one naming rule, its overrides and presets; OTEL_TRAIN_* environment configuration."""

from __future__ import annotations

import json

import pytest

import otel_train
from otel_train import KeyNamer, KeySpec, OtelTrainError
from otel_train.naming import attribute_suffix, default_key
from otel_train.testing import CapturingExporter


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("train.learning_rate", "train/learning_rate"),
        ("train.loss", "train/loss"),
        ("perf.step_time", "perf/step_time"),
        ("hw.gpu.memory.usage", "gpu/memory_usage"),
        ("eval.my-metric", "eval/my_metric"),
        ("loss", "loss"),
    ],
)
def test_default_rule_first_segment_is_the_group(name, key):
    assert default_key(name) == key


def test_attributes_become_a_key_suffix():
    assert attribute_suffix({"hw.id": 0}) == "/hw_id_0"
    assert attribute_suffix({}) == ""


def test_built_in_overrides_follow_the_trainer_spelling():
    namer = KeyNamer()
    assert namer.key("train.tokens") == "train/num_input_tokens_seen"
    assert [s.key for s in namer.keys_for("perf.mfu")] == ["perf/mfu", "perf/mfu_percent"]
    assert namer.keys_for("perf.eta")[0] == KeySpec("perf/eta_minutes", 1 / 60)


def test_user_overrides_and_legacy_preset(tmp_path):
    capture = CapturingExporter()
    tel = otel_train.setup(
        run="legacy",
        output_dir=tmp_path,
        exporters=[capture],
        intervals={"train": 1},
        key_preset="legacy_training",
        key_overrides={"train.grad_norm": "optim/gnorm"},
    )
    tel.training.record(loss=1.5, learning_rate=0.1, grad_norm=3.0)
    tel.step(1)
    tel.shutdown()
    row = capture.rows[0].values
    assert row["training/lr"] == 0.1 and row["training/loss"] == 1.5 and row["optim/gnorm"] == 3.0
    assert "train/learning_rate" not in row


def test_unknown_preset_is_rejected_with_the_choices():
    with pytest.raises(OtelTrainError, match="legacy_training"):
        KeyNamer(preset="nope")


def test_environment_configures_run_dir_exporters_and_intervals(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_TRAIN_RUN", "from-env")
    monkeypatch.setenv("OTEL_TRAIN_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("OTEL_TRAIN_EXPORTERS", "jsonl")
    monkeypatch.setenv("OTEL_TRAIN_INTERVALS", "train=3,perf=6")
    with otel_train.setup() as tel:
        for step in range(1, 7):
            tel.training.record(loss=1.0)
            tel.step(step)
    rows = [json.loads(x) for x in (tmp_path / "from-env" / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r["metrics"]] == [3, 6]


def test_arguments_win_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_TRAIN_INTERVALS", "train=3")
    capture = CapturingExporter()
    with otel_train.setup(
        run="x", output_dir=tmp_path, exporters=[capture], intervals={"train": 2}
    ) as tel:
        for step in range(1, 5):
            tel.training.record(loss=1.0)
            tel.step(step)
    assert capture.steps_with("train/loss") == [2, 4]


def test_bad_environment_interval_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("OTEL_TRAIN_INTERVALS", "train=ten")
    with pytest.raises(OtelTrainError, match="OTEL_TRAIN_INTERVALS"):
        otel_train.setup(run="x", output_dir=tmp_path, exporters=())


def test_install_global_is_opt_in(tmp_path):
    from opentelemetry import metrics

    before = metrics.get_meter_provider()
    tel = otel_train.setup(run="x", output_dir=tmp_path, exporters=())
    assert metrics.get_meter_provider() is before
    tel.shutdown()
