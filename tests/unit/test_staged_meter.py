"""Recording through the OTel meter API (`tel.meter`, `tel.meter_provider`): every instrument
kind is step-staged, tensors and attributes included, and sampling loses nothing."""

from __future__ import annotations

import json
import logging
import math

import pytest
from opentelemetry.metrics import Counter, Histogram, UpDownCounter, _Gauge

import otel_train
from otel_train import OtelTrainError, UnknownMetricError

torch = pytest.importorskip("torch")

from tests.counting_tensor import CountingTensor, counting, on_this_thread  # noqa: E402


def test_every_instrument_kind_is_staged_with_attributes_and_resolved_once_per_sampled_step(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "perf": 1000})
    meter = tel.meter
    reward = meter.create_gauge("train.reward")
    chosen = meter.create_counter("train.chosen_tokens", unit="{token}")
    queue = meter.create_up_down_counter("train.queue_depth")
    margin = meter.create_histogram("train.margin")
    assert isinstance(reward, _Gauge) and isinstance(chosen, Counter)
    assert isinstance(queue, UpDownCounter) and isinstance(margin, Histogram)
    CountingTensor.materialisations = 0
    per_step = []
    for step in range(1, 11):
        before = on_this_thread()
        reward.set(counting(step * 0.5))
        reward.set(counting(step * 2.0), {"dataset": "code"})
        chosen.add(counting(10.0))
        chosen.add(counting(3.0), {"dataset": "code"})
        queue.add(counting(2.0))
        queue.add(counting(-1.0))
        margin.record(counting(0.25))
        margin.record(counting(0.25), {"dataset": "code"})
        tel.step(step)
        per_step.append(on_this_thread() - before)
    assert per_step == [0] * 10  # the training thread never reads a value back
    tel.flush()
    assert CountingTensor.materialisations == 2  # the finisher: one transfer per sampled step
    assert capture.steps_with("train/reward") == [5, 10]
    assert capture.values_of("train/reward") == [2.5, 5.0]  # a gauge keeps its last value
    assert capture.values_of("train/reward/dataset_code") == [10.0, 20.0]
    assert capture.values_of("train/chosen_tokens") == [50.0, 100.0]  # every step summed
    assert capture.values_of("train/chosen_tokens/dataset_code") == [15.0, 30.0]
    assert capture.values_of("train/queue_depth") == [5.0, 10.0]
    for key in ("train/margin", "train/margin/dataset_code"):
        assert capture.values_of(key) == pytest.approx([0.25, 0.25])
        # exponential buckets: the percentile of a constant is the constant (+-5%)
        assert capture.values_of(key + "_p50") == pytest.approx([0.25, 0.25], rel=0.05)
        assert capture.values_of(key + "_p95") == pytest.approx([0.25, 0.25], rel=0.05)


def test_histogram_percentiles_follow_the_recorded_distribution(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 100})
    latency = tel.meter.create_histogram("train.latency", unit="s")
    values = [0.001 * (i + 1) for i in range(100)]  # 1 ms .. 100 ms, uniform
    for step, value in enumerate(values, start=1):
        latency.record(value)
        tel.step(step)
    tel.flush()
    assert capture.values_of("train/latency") == pytest.approx([sum(values) / 100])
    assert capture.values_of("train/latency_p50") == pytest.approx([0.050], rel=0.05)
    assert capture.values_of("train/latency_p95") == pytest.approx([0.095], rel=0.05)


def test_explicit_bucket_advisory_is_kept(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    tel.meter.create_histogram(
        "train.bucketed", explicit_bucket_boundaries_advisory=[1.0, 2.0, 3.0]
    ).record(1.5)
    tel.step(1)
    tel.flush()
    histogram = next(
        m.data
        for batch in capture.batches
        for r in batch.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "train.bucketed"
    )
    assert list(histogram.data_points[0].explicit_bounds) == [1.0, 2.0, 3.0]


def test_standard_loss_is_the_interval_mean_with_its_max(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 4})
    losses = [1.0, 5.0, 2.0, 4.0, 0.5, 0.5, 0.5, 8.5]
    for step, loss in enumerate(losses, start=1):
        tel.record(loss=torch.tensor(loss), grad_norm=float(step))
        tel.step(step)
    tel.flush()
    assert capture.values_of("train/loss") == [3.0, 2.5]
    assert capture.values_of("train/loss_max") == [5.0, 8.5]
    assert capture.values_of("train/grad_norm") == [2.5, 6.5]
    assert capture.values_of("train/grad_norm_max") == [4.0, 8.0]


def test_record_takes_a_mapping_with_slash_keys_beside_the_standard_keywords(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    tel.meter.create_counter("train.generated_tokens")  # declared: record() adds to it
    for step in (1, 2):
        tel.record(
            {"rewards/margins": torch.tensor(0.1 * step), "probe/value": 2.0 * step,
             "reward_bonus": 1.0, "train.generated_tokens": 7},
            loss=1.0,
            tokens=4,
        )  # fmt: skip
        tel.step(step)
    tel.flush()
    row = capture.rows[-1].values
    # a key TRL logs names the stage instrument a TRL run charts (one name for both); the
    # stage catalog declares it an interval mean
    assert row["train/rewards_margin"] == pytest.approx(0.15)
    assert row["train/rewards_margin_max"] == pytest.approx(0.2)
    assert row["probe/value"] == 4.0  # any other slash key: instrument probe.value
    assert row["train/reward_bonus"] == 1.0  # a bare name joins the train group
    assert row["train/generated_tokens"] == 14.0
    assert row["train/num_input_tokens_seen"] == 8.0
    with pytest.raises(UnknownMetricError, match="'los'"):
        tel.record(los=1.0)


def test_library_code_records_through_the_meter_provider(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 3})
    library_meter = tel.meter_provider.get_meter("some.library", "1.0")
    accuracy = library_meter.create_gauge("train.token_accuracy")
    CountingTensor.materialisations = 0
    for step in (1, 2):
        accuracy.set(counting(0.5 + step / 10))
        tel.step(step)
    assert CountingTensor.materialisations == 0
    accuracy.set(counting(0.9))
    tel.step(3)
    tel.flush()
    assert capture.values_of("train/token_accuracy") == pytest.approx([0.9])
    scopes = {
        s.scope.name for b in capture.batches for r in b.resource_metrics for s in r.scope_metrics
    }
    assert "some.library" in scopes


def test_values_after_the_last_sampled_step_reach_every_instrument_at_shutdown(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 10})
    custom = tel.meter.create_counter("train.custom")
    histogram = tel.meter.create_histogram("train.custom_values")
    for step in range(1, 11):
        tel.record(loss=0.5, tokens=10)
        tel.step(step)
    tel.record(loss=999.0, tokens=10)
    custom.add(3)
    histogram.record(4.0)
    tel.step(11)
    tel.shutdown()
    last = capture.rows[-2].values  # the tail row, then final/*
    assert capture.rows[-2].step == 11
    assert last["train/loss"] == 999.0
    assert last["train/num_input_tokens_seen"] == 110.0
    assert last["train/custom"] == 3.0 and last["train/custom_values"] == 4.0
    final = capture.rows[-1].values
    assert final["final/train_loss"] == 999.0 and final["final/total_tokens"] == 110.0


def test_a_diverged_run_ends_with_a_nan_final_loss_flagged_as_non_finite(tmp_path):
    with otel_train.setup(
        run="diverged", output_dir=tmp_path, exporters=("jsonl",), intervals={"train": 5}
    ) as tel:
        for step in range(1, 6):
            tel.record(loss=0.5)
            tel.step(step)
        tel.record(loss=torch.tensor(float("nan")))
        tel.step(6)
    rows = [json.loads(line) for line in (tel.context.run_dir / "rank0.jsonl").read_text().split()]
    final = rows[-1]
    assert final["metrics"]["final/train_loss"] is None
    assert final["nonfinite"]["final/train_loss"] == "nan"


def test_per_group_means_come_from_one_device_scatter_without_syncs(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    names = ["wiki", "code", "math"]
    CountingTensor.materialisations = 0
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0]).as_subclass(CountingTensor)
    groups = torch.tensor([0, 1, 1, 0])
    tel.record_by_group("train.dataset_loss", losses, groups, names)
    tel.step(1)
    assert CountingTensor.materialisations == 0
    tel.record_by_group("train.dataset_loss", torch.tensor([7.0]), torch.tensor([0]), names)
    tel.step(2)
    tel.flush()
    row = capture.rows[-1].values
    assert row["train/dataset_loss/dataset_wiki"] == pytest.approx((1.0 + 5.0 + 7.0) / 3)
    assert row["train/dataset_loss/dataset_code"] == pytest.approx(2.5)
    assert "train/dataset_loss/dataset_math" not in row  # no sample: absent, never 0
    assert row["train/dataset_loss_count/dataset_wiki"] == 3.0


def test_bad_values_are_refused_when_recorded_and_never_poison_later_steps(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    gauge = tel.meter.create_gauge("train.thing")
    for bad, pattern in (
        ("0.5", "number or a 0-dim tensor"),
        (10**400, "too large"),
        (torch.empty((), device="meta"), "meta"),
        (torch.ones(3), "shape"),
        (True, "bool"),
    ):
        with pytest.raises(OtelTrainError, match=pattern):
            tel.record(loss=bad)
        with pytest.raises(OtelTrainError, match=pattern):
            gauge.set(bad)
    tel.record(loss=0.25, tokens=3)
    tel.step(1)
    tel.flush()
    assert capture.values_of("train/loss") == [0.25]
    assert capture.values_of("train/num_input_tokens_seen") == [3.0]


def test_a_negative_tensor_increment_is_dropped_and_counted_the_rest_exported(
    telemetry_factory, capture, caplog
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1})
    with caplog.at_level(logging.ERROR):
        tel.record(tokens=torch.tensor(-5), loss=1.0)
        tel.step(1)
    tel.flush()
    assert capture.values_of("train/loss") == [1.0]
    assert capture.values_of("train/nonfinite") == [1.0]
    assert "train.tokens" in caplog.text


def test_an_id_like_attribute_is_capped_with_one_warning(telemetry_factory, capture, caplog):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 1}, max_attribute_sets=50)
    counter = tel.meter.create_counter("train.per_sample")
    with caplog.at_level(logging.WARNING):
        for sample in range(10_000):
            counter.add(1, {"sample": sample})
        tel.step(1)
    tel.flush()
    keys = [k for k in capture.rows[-1].values if k.startswith("train/per_sample")]
    assert len(keys) == 51  # 50 series + the overflow one
    assert capture.rows[-1].values["train/per_sample/otel_metric_overflow_True"] == 9950.0
    assert caplog.text.count("train.per_sample has more than 50 attribute sets") == 1


def test_unknown_groups_and_views_naming_nothing_are_rejected_at_setup(telemetry_factory):
    with pytest.raises(OtelTrainError, match=r"unknown sampling group 'trian'.*perf"):
        telemetry_factory(intervals={"trian": 5})
    with pytest.raises(OtelTrainError, match=r"'train.los' names no standard instrument"):
        telemetry_factory(
            intervals=[otel_train.SamplingView(instrument_name="train.los", every_n_steps=5)]
        )


def test_names_that_collide_in_prometheus_are_rejected(telemetry_factory):
    tel = telemetry_factory(exporters=())
    tel.meter.create_gauge("train.lr_warm")
    with pytest.raises(OtelTrainError, match="both become"):
        tel.meter.create_gauge("train/lr_warm")


def test_dpo_runs_export_no_perplexity(telemetry_factory, capture):
    tel = telemetry_factory(exporters=[capture], stage="dpo", intervals={"train": 1})
    tel.record(loss=0.61)
    tel.step(1)
    tel.evaluate(loss=0.7)
    tel.shutdown()
    keys = {key for row in capture.rows for key in row.values}
    assert "train/loss" in keys and "eval/loss" in keys
    assert not {k for k in keys if "perplexity" in k}
    assert math.isclose(capture.values_of("final/train_loss")[0], 0.61)


def test_a_sampled_step_without_a_new_value_exports_none_rather_than_a_stale_one(
    telemetry_factory, capture
):
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    reward = tel.meter.create_gauge("train.reward")
    for step in range(1, 9):
        if step == 4:
            tel.record(loss=4.0)
            reward.set(1.5, {"dataset": "a"})
        tel.record(tokens=1)
        tel.step(step)
    tel.flush()
    assert capture.steps_with("train/loss") == [4]
    assert capture.steps_with("train/loss_max") == [4]
    assert capture.steps_with("train/reward/dataset_a") == [4]
    assert capture.steps_with("train/num_input_tokens_seen") == [2, 4, 6, 8]  # counters: totals
