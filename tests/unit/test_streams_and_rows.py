"""Staged values live in otel-train's own streams (no SDK instrument, no SDK collect on a
sampled step), yet every OTel reader sees them: ours in each step-sampled batch, any other
reader (a pull endpoint, a periodic OTLP reader, a user's) in its own collect, in the
temporality it asked for. And one row per batch serves every exporter that shares the namer."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import Counter, Histogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricsData,
)

import otel_train
from otel_train import rows
from otel_train.testing import CapturingExporter

torch = pytest.importorskip("torch")


def _points(data: MetricsData | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = metric.data
    return found


def _train(tel: Any, steps: range) -> None:
    for step in steps:
        tel.training.record(loss=torch.tensor(float(step)), tokens=10, learning_rate=0.5)
        tel.step(step)


def test_a_reader_we_do_not_drive_collects_the_staged_values(telemetry_factory, capture):
    reader = InMemoryMetricReader()
    tel = telemetry_factory(exporters=[capture, reader], intervals={"train": 5, "perf": 5})
    _train(tel, range(1, 11))
    tel.flush()  # sampled steps are finished off the training thread
    points = _points(reader.get_metrics_data())
    assert points["train.loss"].data_points[0].value == 8.0  # the last interval's mean
    tokens = points["train.tokens"]
    assert tokens.is_monotonic and tokens.data_points[0].value == 100.0
    assert tokens.aggregation_temporality == AggregationTemporality.CUMULATIVE
    assert points["train.global_step"].data_points[0].value == 10
    step_time = points["perf.step_time"].data_points[0]
    assert (
        step_time.count == 9 and len(step_time.bucket_counts) == len(step_time.explicit_bounds) + 1
    )
    # What the step-sampled exporters got at step 10 says the same.
    tel.flush()
    assert capture.values_of("train/loss")[-1] == 8.0
    assert capture.values_of("train/num_input_tokens_seen")[-1] == 100.0


def test_a_delta_reader_gets_what_changed_since_its_last_collect(telemetry_factory):
    delta = {Counter: AggregationTemporality.DELTA, Histogram: AggregationTemporality.DELTA}
    reader = InMemoryMetricReader(preferred_temporality=delta)
    tel = telemetry_factory(exporters=[reader], intervals={"train": 5, "perf": 5})
    _train(tel, range(1, 6))
    tel.flush()  # sampled steps are finished off the training thread
    first = _points(reader.get_metrics_data())
    _train(tel, range(6, 16))
    tel.flush()
    second = _points(reader.get_metrics_data())
    assert first["train.tokens"].data_points[0].value == 50.0
    assert second["train.tokens"].data_points[0].value == 100.0  # steps 6..15 only
    assert second["train.tokens"].aggregation_temporality == AggregationTemporality.DELTA
    assert second["perf.step_time"].data_points[0].count == 10  # durations of steps 6..15
    assert second["train.learning_rate"].data_points[0].value == 0.5  # gauges: last value


def test_a_view_that_filters_attributes_still_applies(telemetry_factory, capture):
    views = [
        otel_train.SamplingView(instrument_name="train.*", every_n_steps=2),
        otel_train.SamplingView(
            instrument_name="custom.*", every_n_steps=2, attribute_keys=frozenset()
        ),
    ]
    tel = telemetry_factory(exporters=[capture], intervals=views)
    counter = tel.meter.create_counter("custom.events")
    for step in (1, 2):
        counter.add(3.0, {"dataset": "wiki"})
        counter.add(1.0, {"dataset": "code"})
        tel.step(step)
    tel.flush()
    batch = next(b for b in capture.batches if "custom.events" in _points(b))
    points = _points(batch)["custom.events"].data_points
    assert [(dict(p.attributes), p.value) for p in points] == [({}, 8.0)]  # the view's job


def test_one_row_per_batch_serves_every_exporter_sharing_the_namer(telemetry_factory, monkeypatch):
    builds = []
    original = rows.RowBuilder.build

    def counting(self: Any, metrics_data: Any) -> Any:
        builds.append(metrics_data)
        return original(self, metrics_data)

    monkeypatch.setattr(rows.RowBuilder, "build", counting)
    first, second = CapturingExporter(), CapturingExporter()
    tel = telemetry_factory(exporters=[first, second], intervals={"train": 2, "perf": 4})
    _train(tel, range(1, 9))
    tel.flush()
    assert len(first.rows) == len(second.rows) == 4
    assert len(builds) == 4  # not 8: built once, shared
    assert [r.values for r in first.rows] == [r.values for r in second.rows]
    # Histogram intervals stay per batch: 4 step times in each perf row after the first.
    assert first.values_of("perf/step_time")[-1] == pytest.approx(
        second.values_of("perf/step_time")[-1]
    )


def test_the_sdk_private_attributes_we_read_are_where_we_expect():
    """otel_train._sdk_compat reads a few SDK internals; an SDK release that moves them fails
    here, not silently in an export."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    from otel_train import _sdk_compat

    reader = InMemoryMetricReader()
    resource = Resource.create({"run": "compat"})
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    meter = provider.get_meter("otel_train", "1.0")
    meter.create_counter("a.count")
    meter.create_observable_gauge("a.gauge", callbacks=[lambda options: []])
    assert _sdk_compat.scope_of(meter).name == "otel_train"
    assert _sdk_compat.scope_of(meter).version == "1.0"
    assert _sdk_compat.resource_of(provider) is resource
    assert _sdk_compat.sdk_instrument_count(provider) == 2
    assert sorted(_sdk_compat.sdk_instrument_names(provider)) == ["a.count", "a.gauge"]
    assert _sdk_compat.temporality_of(reader)  # keyed by the SDK's instrument classes
    seen = []
    _sdk_compat.add_to_collect(reader, lambda _reader, data: seen.append(data) or data)
    reader.get_metrics_data()
    assert len(seen) == 1
    provider.shutdown()
