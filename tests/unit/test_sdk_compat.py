"""Every third-party private attribute otel-train relies on (otel_train/_sdk_compat.py) is still
where we read it. A release that moves one fails here, naming it, not silently in a run."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os

import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from otel_train import _sdk_compat
from otel_train._sdk_compat import (
    CHECKED_ON,
    PERIODIC_READER_FORK_HOOK,
    explicit_buckets_of,
    prometheus_translator_class,
    stop_periodic_reader_thread,
    system_metrics_known_names,
    wandb_service_process,
)


def moved(package: str, what: str) -> str:
    """The failure message: which attribute, which release now, which release it was on."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = "(not installed)"
    return (
        f"{package} {installed} no longer has {what} (otel-train checked it on "
        f"{CHECKED_ON[package]}): update otel_train/_sdk_compat.py and its callers"
    )


def test_every_checked_package_is_named_with_its_version():
    assert set(CHECKED_ON) == {
        "opentelemetry-sdk",
        "opentelemetry-exporter-prometheus",
        "opentelemetry-instrumentation-system-metrics",
        "wandb",
    }
    assert all(version[0].isdigit() for version in CHECKED_ON.values())


def test_sdk_still_keeps_the_bucket_advisory_where_we_read_it():
    meter = MeterProvider().get_meter("compat")
    with_buckets = meter.create_histogram("a", explicit_bucket_boundaries_advisory=[1.0, 2.0])
    without = meter.create_histogram("b")
    found = explicit_buckets_of(with_buckets)
    assert found is not None, moved("opentelemetry-sdk", "Histogram._advisory")
    assert list(found) == [1.0, 2.0]
    assert explicit_buckets_of(without) is None


def test_histograms_get_exponential_buckets_unless_explicit_ones_were_given():
    # _create_aggregation is the SDK's private Aggregation hook our default aggregation wraps.
    reader = InMemoryMetricReader(
        preferred_aggregation={
            Histogram: _sdk_compat.exponential_unless_buckets_given(),
        }
    )
    meter = MeterProvider(metric_readers=[reader]).get_meter("compat")
    meter.create_histogram("explicit", explicit_bucket_boundaries_advisory=[1.0]).record(0.5)
    meter.create_histogram("exponential").record(0.5)
    data = reader.get_metrics_data()
    assert data is not None
    kinds = {
        metric.name: type(metric.data).__name__
        for scope in data.resource_metrics[0].scope_metrics
        for metric in scope.metrics
    }
    assert kinds == {"explicit": "Histogram", "exponential": "ExponentialHistogram"}, moved(
        "opentelemetry-sdk", "Aggregation._create_aggregation"
    )


def test_prometheus_exporter_still_has_its_translation_collector():
    pytest.importorskip("opentelemetry.exporter.prometheus")
    try:
        translator = prometheus_translator_class()
    except ImportError:
        pytest.fail(moved("opentelemetry-exporter-prometheus", "_CustomCollector"))
    reader = InMemoryMetricReader()
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"run": "r", "host": "h"})
    )
    provider.get_meter("compat").create_counter("train.tokens").add(3)
    data = reader.get_metrics_data()
    assert data is not None
    try:
        collector = translator(
            scope_info_enabled=False, resource_attribute_filter={"run"}.__contains__
        )
        collector.add_metrics_data(data)
        families = {family.name: family for family in collector.collect()}
    except (TypeError, AttributeError) as error:
        pytest.fail(
            f"{moved('opentelemetry-exporter-prometheus', '_CustomCollector API')}: {error}"
        )
    samples = [s for s in families["train_tokens"].samples if s.name == "train_tokens_total"]
    assert [(s.value, s.labels.get("run"), "host" in s.labels) for s in samples] == [
        (3.0, "r", False)
    ]


def test_periodic_reader_still_registers_the_fork_hook_we_override():
    hook = getattr(PeriodicExportingMetricReader, PERIODIC_READER_FORK_HOOK, None)
    assert callable(hook), moved(
        "opentelemetry-sdk", f"PeriodicExportingMetricReader.{PERIODIC_READER_FORK_HOOK}"
    )
    init = inspect.getsource(PeriodicExportingMetricReader.__init__)
    assert "register_at_fork" in init and f"self.{PERIODIC_READER_FORK_HOOK}" in init, moved(
        "opentelemetry-sdk", f"os.register_at_fork(... self.{PERIODIC_READER_FORK_HOOK})"
    )
    assert callable(getattr(PeriodicExportingMetricReader, "_receive_metrics", None)), moved(
        "opentelemetry-sdk", "PeriodicExportingMetricReader._receive_metrics"
    )


class RecordingExporter(MetricExporter):
    """Keeps what a push reader hands it (the SDK ships no in-memory push exporter)."""

    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(  # type: ignore[override]
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
    ) -> MetricExportResult:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        return None


class ForkAwareReader(PeriodicExportingMetricReader):
    """Overrides the SDK's fork hook the way exporters/otlp.py does."""

    hook_ran = False

    def _at_fork_reinit(self) -> None:
        type(self).hook_ran = True
        stop_periodic_reader_thread(self)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_in_a_forked_child_the_sdk_calls_our_hook_and_restarts_no_thread():
    reader = ForkAwareReader(RecordingExporter(), export_interval_millis=60_000)
    for name in ("_daemon_thread", "_shutdown"):
        assert hasattr(reader, name), moved(
            "opentelemetry-sdk", f"PeriodicExportingMetricReader.{name}"
        )
    provider = MeterProvider(metric_readers=[reader])
    try:
        assert reader._daemon_thread is not None  # the parent's export thread runs
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            ok = ForkAwareReader.hook_ran and reader._daemon_thread is None
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, moved(
            "opentelemetry-sdk", f"a fork hook calling {PERIODIC_READER_FORK_HOOK}"
        )
    finally:
        provider.shutdown(timeout_millis=5_000)


def test_system_metrics_instrumentation_still_lists_the_names_it_knows():
    module = pytest.importorskip("opentelemetry.instrumentation.system_metrics")
    known = system_metrics_known_names(module)
    assert known is not None, moved(
        "opentelemetry-instrumentation-system-metrics", "system_metrics._DEFAULT_CONFIG"
    )
    assert "system.cpu.time" in known and "process.cpu.time" in known


def test_wandb_service_process_is_found_where_we_look(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    try:
        wandb.setup().ensure_service()
        process = wandb_service_process()
        assert process is not None, moved(
            "wandb", "wandb_setup._singleton._connection._proc._process"
        )
        assert process.poll() is None and process.pid != os.getpid()
    finally:
        wandb.teardown()


def test_point_builders_make_what_the_sdk_constructors_make():
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Metric,
        NumberDataPoint,
        Sum,
    )

    from otel_train import _sdk_compat

    assert _sdk_compat.fast_construction_matches(), (
        "the SDK's NumberDataPoint / Metric / Gauge / Sum changed layout "
        f"(checked on opentelemetry-sdk {_sdk_compat.CHECKED_ON['opentelemetry-sdk']}): "
        "the builders fall back to the constructors; update otel_train/_sdk_compat.py"
    )
    point = _sdk_compat.number_point({"dataset": "code"}, None, 5, 2.5)
    assert point == NumberDataPoint({"dataset": "code"}, None, 5, 2.5)
    assert (
        point.exemplars == []
        and point.exemplars is not _sdk_compat.number_point({}, 1, 2, 3).exemplars
    )
    gauge = _sdk_compat.gauge_metric("train.loss", "d", "1", [point])
    assert gauge == Metric("train.loss", "d", "1", Gauge([point]))
    total = _sdk_compat.sum_metric(
        "train.tokens", "", "{token}", [point], AggregationTemporality.CUMULATIVE, True
    )
    assert total == Metric(
        "train.tokens", "", "{token}", Sum([point], AggregationTemporality.CUMULATIVE, True)
    )
    assert json.loads(total.to_json()) == json.loads(
        Metric("train.tokens", "", "{token}",
               Sum([point], AggregationTemporality.CUMULATIVE, True)).to_json()
    )  # fmt: skip
    with pytest.raises(AttributeError):  # still frozen
        point.value = 3.0  # type: ignore[misc]
