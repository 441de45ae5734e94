"""The hot path never turns a tensor into a number; a sampled step does it once per device."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from tests.counting_tensor import CountingTensor, counting, on_this_thread  # noqa: E402


def test_non_sampled_steps_never_materialise_and_sampled_steps_once(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10, "perf": 20})
    CountingTensor.materialisations = 0
    per_step = []
    for step in range(1, 41):
        before = on_this_thread()
        tel.training.record(
            loss=counting(0.5 + step),
            grad_norm=counting(1.5),
            learning_rate=counting(1e-3),
            tokens=counting(64, torch.int64),
            samples=counting(4, torch.int64),
        )
        tel.step(step)
        per_step.append(on_this_thread() - before)
    # The training thread never reads a value back, not even on sampled steps: the finisher
    # thread does, once per sampled step (one packed copy for all the step's values).
    assert per_step == [0] * 40
    tel.flush()
    assert CountingTensor.materialisations == 4  # steps 10, 20, 30, 40
    # train/loss is the mean of the interval's ten losses; train/loss_max its largest
    assert capture.values_of("train/loss") == [6.0, 16.0, 26.0, 36.0]
    assert capture.values_of("train/loss_max") == [10.5, 20.5, 30.5, 40.5]
    assert capture.values_of("train/num_input_tokens_seen") == [640, 1280, 1920, 2560]
    assert capture.values_of("train/samples")[-1] == 160
    assert capture.values_of("train/grad_norm")[-1] == 1.5


def test_tensor_counters_accumulate_past_the_fold_threshold(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1000, "perf": 1000})
    for step in range(1, 1001):
        tel.training.record(tokens=torch.tensor(3, dtype=torch.int64))
        tel.step(step)
    tel.flush()
    assert capture.values_of("train/num_input_tokens_seen") == [3000]


def test_mixed_host_and_tensor_increments_add_up(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 4})
    for step in range(1, 9):
        tel.training.record(tokens=10 if step % 2 else torch.tensor(5))
        tel.step(step)
    tel.flush()
    assert capture.values_of("train/num_input_tokens_seen") == [30, 60]


def test_loss_tensor_with_grad_is_recorded_without_touching_the_graph(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    weight = torch.tensor(2.0, requires_grad=True)
    loss = weight * 3
    tel.training.record(loss=loss)
    tel.step(1)
    loss.backward()
    tel.flush()
    assert capture.values_of("train/loss") == [6.0]
    assert weight.grad is not None and weight.grad.item() == 3.0


def test_non_finite_tensor_loss_is_exported_as_nan_and_counted(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    tel.training.record(loss=torch.tensor(1.25))
    tel.step(2)
    tel.training.record(loss=torch.tensor(float("nan")))
    tel.step(4)
    tel.flush()
    losses = capture.values_of("train/loss")
    assert losses[0] == 1.25 and math.isnan(losses[1])
    assert capture.rows[-1].nonfinite == ["train/loss", "train/loss_max", "train/perplexity"]
    assert capture.values_of("train/nonfinite") == [0, 3]  # 0 until the first NaN


def test_batch_tensor_is_rejected_with_a_clear_message_when_recorded(telemetry_factory):
    tel = telemetry_factory(exporters=(), intervals={"train": 1})
    with pytest.raises(otel_train_error(), match=r"0-dim tensor"):
        tel.training.record(loss=torch.ones(4))
    tel.step(1)  # nothing bad was staged: the sampled step is fine


def otel_train_error():
    from otel_train import OtelTrainError

    return OtelTrainError


def test_after_a_rejected_batch_tensor_the_next_steps_export(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    with pytest.raises(otel_train_error()):
        tel.training.record(loss=torch.ones(4))
    tel.step(1)
    tel.training.record(loss=torch.tensor(0.5))
    tel.step(2)
    tel.flush()
    assert capture.values_of("train/loss") == [0.5]
