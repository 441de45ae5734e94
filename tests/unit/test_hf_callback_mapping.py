"""OtelTrainCallback driven hook by hook, in the order the Trainer calls them, with real
`TrainingArguments` / `TrainerState` / `TrainerControl` and the log dicts the Trainer builds:
the cases a tiny real run does not reach cheaply (several eval datasets, the Trainer's own
throughput keys, logging less often than the train interval)."""

from __future__ import annotations

import logging

import pytest

transformers = pytest.importorskip("transformers")

from otel_train.integrations.hf import OtelTrainCallback  # noqa: E402


def _args(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=2,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _train(callback, args, logs_by_step, *, steps, tokens_per_step=0):
    """The Trainer's order: on_step_end (should_log set by the flow callback), then on_log."""
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    state.logging_steps = args.logging_steps
    callback.on_train_begin(args, state, control)
    for step in range(1, steps + 1):
        state.global_step, state.epoch = step, step / 10
        state.num_input_tokens_seen += tokens_per_step
        control.should_log = step in logs_by_step
        callback.on_step_end(args, state, control)
        if control.should_log:
            callback.on_log(args, state, control, logs=dict(logs_by_step[step]))
    callback.on_train_end(args, state, control)
    return state, control


def test_trainer_throughput_keys_are_not_metrics_and_tokens_come_from_its_state(
    telemetry_factory, capture, tmp_path
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    args = _args(tmp_path, include_num_input_tokens_seen=True)
    # What the Trainer logs with include_num_input_tokens_seen=True, then its final summary.
    logs = {
        step: {
            "loss": 1.0 * step,
            "learning_rate": 1e-3,
            "epoch": step / 10,
            "num_input_tokens_seen": 32 * step,
            "train_runtime": 0.5 * step,
            "train_tokens_per_second": 64.0,
        }
        for step in (2, 4)
    }
    callback = OtelTrainCallback(tel)
    state, control = _train(callback, args, logs, steps=4, tokens_per_step=32)
    callback.on_log(
        args,
        state,
        control,
        logs={"train_runtime": 2.0, "train_loss": 2.5, "total_flos": 1.0, "epoch": 0.4},
    )
    tel.flush()
    keys = {key for row in capture.rows for key in row.values}
    assert not [key for key in keys if "runtime" in key or "logged_" in key]
    assert "train/train_loss" not in keys and "train/total_flos" not in keys
    assert capture.values_of("train/num_input_tokens_seen") == [64.0, 128.0]
    assert capture.values_of("train/loss") == [2.0, 4.0]


def test_each_eval_dataset_keeps_its_name(telemetry_factory, capture, tmp_path):
    tel = telemetry_factory(exporters=[capture], stage="sft")
    args = _args(tmp_path)
    callback = OtelTrainCallback(tel)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback.on_train_begin(args, state, control)
    # Trainer(eval_dataset={"wiki": ..., "code": ...}) evaluates each with prefix eval_<name>.
    for name, loss in (("wiki", 2.0), ("code", 3.0)):
        metrics = {
            f"eval_{name}_loss": loss,
            f"eval_{name}_mean_token_accuracy": loss / 10,
            f"eval_{name}_runtime": 0.1,
            f"eval_{name}_samples_per_second": 10.0,
            "epoch": 1.0,
        }
        callback.on_log(args, state, control, logs=metrics)
        callback.on_evaluate(args, state, control, metrics=metrics)
    tel.flush()
    row = {k: v for r in capture.rows for k, v in r.values.items()}
    assert row["eval/wiki_loss"] == 2.0 and row["eval/code_loss"] == 3.0
    assert row["eval/wiki_mean_token_accuracy"] == pytest.approx(0.2)
    assert "eval/loss" not in row  # two datasets: no single eval loss to pick
    assert not [k for k in row if "runtime" in k or "samples_per_second" in k]


def test_logging_less_often_than_the_train_interval_warns_once_with_both_fixes(
    telemetry_factory, capture, tmp_path, caplog
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    args = _args(tmp_path, logging_steps=4)
    logs = {step: {"loss": float(step), "entropy": 0.1 * step} for step in (4, 8)}
    with caplog.at_level(logging.WARNING, logger="otel_train.integrations.hf"):
        _train(OtelTrainCallback(tel), args, logs, steps=8)
    warned = [r.getMessage() for r in caplog.records if "logging_steps=4" in r.getMessage()]
    assert len(warned) == 1
    assert "logging_steps=2" in warned[0] and "intervals={'train': 4}" in warned[0]


def test_logging_less_often_than_the_train_interval_shows_no_stale_value(
    telemetry_factory, capture, tmp_path
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    args = _args(tmp_path, logging_steps=4)
    logs = {step: {"loss": float(step), "entropy": 0.1 * step} for step in (4, 8)}
    _train(OtelTrainCallback(tel), args, logs, steps=8)
    tel.flush()
    assert capture.steps_with("train/samples") == [2, 4, 6, 8]
    # Steps 2 and 6 are sampled but the Trainer logged nothing there: absent, not repeated.
    assert capture.steps_with("train/loss") == [4, 8]
    assert capture.steps_with("train/entropy") == [4, 8]
