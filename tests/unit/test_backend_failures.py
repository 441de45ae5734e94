"""A raising or hanging exporter costs the loop nothing: logged once, counted, never raised."""

from __future__ import annotations

import logging
import threading
import time

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

from otel_train.testing import CapturingExporter


class RaisingExporter(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        self.calls += 1
        raise ConnectionError("backend is down")

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        pass


class SleepingExporter(MetricExporter):
    """Sleeps 5 s per export, like a backend behind a dead network with a long timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.calls = 0

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        self.calls += 1
        self.release.wait(5.0)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        self.release.set()


def test_raising_exporter_is_logged_once_counted_and_others_still_export(telemetry_factory, caplog):
    failing = RaisingExporter()
    healthy = CapturingExporter()
    tel = telemetry_factory(exporters=[failing, healthy], intervals={"train": 2, "perf": 4})
    with caplog.at_level(logging.WARNING, logger="otel_train"):
        for step in range(1, 41):
            tel.training.record(loss=1.0, tokens=1)
            tel.step(step)
        tel.flush()
    stats = tel.export_stats()
    assert stats["RaisingExporter"]["failed"] == failing.calls == 20
    assert stats["CapturingExporter"]["exported"] == 20
    assert len(healthy.steps_with("train/loss")) == 20
    failure_logs = [r for r in caplog.records if "RaisingExporter" in r.getMessage()]
    assert len(failure_logs) == 1 and "backend is down" in failure_logs[0].getMessage()


def test_sleeping_exporter_never_slows_step_nor_the_other_exporters(telemetry_factory):
    sleeping = SleepingExporter()
    healthy = CapturingExporter()
    tel = telemetry_factory(exporters=[sleeping, healthy], intervals={"train": 1, "perf": 1})
    slowest = 0.0
    for step in range(1, 201):
        tel.training.record(loss=0.1, tokens=5)
        started = time.perf_counter()
        tel.step(step)
        slowest = max(slowest, time.perf_counter() - started)
    # Every step exports here; a blocked backend would make one step() take 5 s.
    assert slowest < 0.5
    assert tel.flush(timeout_millis=300) is False  # the sleeper is still busy: honest answer
    deadline = time.monotonic() + 10
    while len(healthy.rows) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert healthy.steps_with("train/loss") == list(range(1, 201))
    started = time.perf_counter()
    tel.shutdown(timeout_millis=1_000)
    assert time.perf_counter() - started < 3.0


def test_full_queue_drops_oldest_counts_and_logs_once(telemetry_factory, caplog):
    sleeping = SleepingExporter()
    tel = telemetry_factory(exporters=[sleeping], intervals={"train": 1}, max_queue_batches=8)
    with caplog.at_level(logging.WARNING, logger="otel_train"):
        for step in range(1, 101):
            tel.training.record(loss=0.1)
            tel.step(step)
    stats = tel.export_stats()["SleepingExporter"]
    # One batch is in the exporter's hands, eight wait; every other one was dropped.
    assert stats["dropped"] >= 100 - 8 - 1
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 1
    tel.shutdown(timeout_millis=500)


def test_failures_are_exported_as_health_counters(telemetry_factory):
    failing = RaisingExporter()
    healthy = CapturingExporter()
    tel = telemetry_factory(exporters=[failing, healthy], intervals={"train": 1, "perf": 5})
    for step in range(1, 11):
        tel.training.record(loss=1.0)
        tel.step(step)
        tel.flush()
    key = "otel_train/export_failed/exporter_RaisingExporter"
    assert healthy.steps_with(key) == [5, 10]
    assert healthy.values_of(key)[-1] >= 5


def test_batches_left_at_shutdown_are_reported_as_such_not_as_a_slow_backend(
    telemetry_factory, caplog
):
    sleeping = SleepingExporter()
    tel = telemetry_factory(exporters=[sleeping], intervals={"train": 1})
    for step in range(1, 6):  # far below the queue size: nothing is slower than training
        tel.training.record(loss=0.1)
        tel.step(step)
    with caplog.at_level(logging.WARNING, logger="otel_train"):
        tel.shutdown(timeout_millis=300)
    messages = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(messages) == 1 and "shutdown budget" in messages[0]
    assert "slower than training" not in messages[0]
