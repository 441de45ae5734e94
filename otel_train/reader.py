"""`StepSampledReader`: an OTel `MetricReader` driven by the training step, not a timer.

On a due step the telemetry asks it to export some groups; it collects once and forwards only
the metrics of those groups (plus the global step, the axis every backend plots against) to
each push exporter's background queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import Histogram
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricExporter,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)

from otel_train._sdk_compat import exponential_unless_buckets_given
from otel_train.background import BackgroundExporter
from otel_train.nonfinite import NonFiniteBoard, SeriesKey, series_key, with_nonfinite
from otel_train.rows import GLOBAL_STEP_INSTRUMENT
from otel_train.sampling import GroupIndex

_logger = logging.getLogger("otel_train.reader")


class StepSampledReader(MetricReader):
    """Collects on sampled steps and forwards only the due groups' metrics, off-thread."""

    def __init__(
        self,
        group_index: GroupIndex,
        *,
        max_queue_batches: int = 1024,
        nonfinite: NonFiniteBoard | None = None,
    ) -> None:
        # Histograms without explicit buckets: base-2 exponential buckets, so percentiles of
        # small values are within a few percent (the SDK default 0, 5, 10, ... is not).
        super().__init__(preferred_aggregation={Histogram: exponential_unless_buckets_given()})
        self.nonfinite = nonfinite or NonFiniteBoard()
        self._groups = group_index
        self._max_queue_batches = max_queue_batches
        self._exporters: list[BackgroundExporter] = []
        self._due: frozenset[str] = frozenset()
        self._fresh: Freshness | None = None
        self._collecting_thread: int | None = None
        self._collect_lock = threading.Lock()
        self._shut_down = False
        self._warned_collect = False

    # -- wiring ---------------------------------------------------------------------------
    def add_exporter(self, exporter: MetricExporter, *, name: str) -> BackgroundExporter:
        worker = BackgroundExporter(exporter, name=name, max_queue_batches=self._max_queue_batches)
        self._exporters.append(worker)
        return worker

    @property
    def exporters(self) -> tuple[BackgroundExporter, ...]:
        return tuple(self._exporters)

    def is_due(self, group: str) -> bool:
        """For observable callbacks: False while this reader collects a step where `group`
        is not due, so e.g. NVML is only queried on GPU-sampled steps."""
        if self._collecting_thread != threading.get_ident():
            return True  # a pull reader (Prometheus scrape) or a user's collect
        return group in self._due

    def sampled_callback(
        self, group: str, callback: Callable[[Any], Iterable[Any]]
    ) -> Callable[[Any], Iterable[Any]]:
        """Wrap an observable-instrument callback so it only runs when its group is due."""

        def run_when_due(options: Any) -> Iterable[Any]:
            if not self.is_due(group):
                return ()
            return callback(options)

        return run_when_due

    # -- the step-driven export -----------------------------------------------------------
    def export_groups(self, groups: frozenset[str], fresh: Freshness | None = None) -> None:
        """Collect now and queue the metrics of `groups` for every exporter. Never raises.

        `fresh`: which series of our synchronous gauges were set for this export. The SDK's
        gauges repeat their last value at every collection; a gauge series not set since
        the previous export of its group is left out (absent, never a stale value).
        """
        if self._shut_down or not groups:
            return
        with self._collect_lock:
            self._fresh = fresh
            self._due = groups
            self._collecting_thread = threading.get_ident()
            try:
                self.collect(timeout_millis=10_000)
            except Exception as error:  # the SDK raises on callback timeouts; training goes on
                if not self._warned_collect:
                    self._warned_collect = True
                    _logger.warning("otel-train: metric collection failed (%r); skipped", error)
            finally:
                self._collecting_thread = None
                self._due = frozenset()
                self._fresh = None

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if self._collecting_thread is None:
            return  # a force_flush from outside a step: nothing is due
        batch = self._select_due(metrics_data)
        if batch is None:
            return
        for worker in self._exporters:
            worker.submit(batch)

    def _select_due(self, metrics_data: MetricsData) -> MetricsData | None:
        due = self._due
        group_of = self._groups.group_of
        resource_metrics = []
        has_payload = False
        for resource in metrics_data.resource_metrics:
            scopes = []
            for scope in resource.scope_metrics:
                kept = [
                    current
                    for metric in scope.metrics
                    if metric.name == GLOBAL_STEP_INSTRUMENT or group_of(metric.name) in due
                    if (current := _without_stale(metric, self._fresh)) is not None
                ]
                has_payload = has_payload or any(
                    metric.name != GLOBAL_STEP_INSTRUMENT for metric in kept
                )
                if kept:
                    scopes.append(ScopeMetrics(scope.scope, kept, scope.schema_url))
            if scopes:
                resource_metrics.append(
                    ResourceMetrics(resource.resource, scopes, resource.schema_url)
                )
        overrides = self.nonfinite.snapshot()
        fresh = self._fresh
        due_overrides = {
            k: v
            for k, v in overrides.items()
            if group_of(k[0]) in due and (fresh is None or k in fresh.series)
        }
        if not has_payload and not due_overrides:
            return None
        return with_nonfinite(MetricsData(resource_metrics), due_overrides)

    # -- lifecycle ------------------------------------------------------------------------
    def wait_idle(self, timeout_millis: float = 10_000) -> bool:
        """Block until every queued batch has reached its exporter (tests, flush())."""
        deadline = time.monotonic() + timeout_millis / 1000
        ok = True
        for worker in self._exporters:
            remaining = max(0.0, (deadline - time.monotonic()) * 1000)
            ok = worker.wait_idle(remaining) and ok
        return ok

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.wait_idle(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        deadline = time.monotonic() + timeout_millis / 1000
        # Drain all exporters in parallel so one slow backend does not eat the others' budget.
        closers = [
            threading.Thread(
                target=worker.shutdown,
                args=(max(0.0, (deadline - time.monotonic()) * 1000),),
                daemon=True,
            )
            for worker in self._exporters
        ]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(max(0.0, deadline - time.monotonic()) + 0.1)


@dataclass(frozen=True, slots=True)
class Freshness:
    """The synchronous gauges we own (`names`) and which of their series were just set."""

    names: frozenset[str] | set[str]
    series: set[SeriesKey]


def _without_stale(metric: Metric, fresh: Freshness | None) -> Metric | None:
    if fresh is None or metric.name not in fresh.names or not isinstance(metric.data, Gauge):
        return metric
    points = [
        point
        for point in metric.data.data_points
        if series_key(metric.name, point.attributes) in fresh.series
    ]
    if len(points) == len(metric.data.data_points):
        return metric
    if not points:
        return None
    return Metric(metric.name, metric.description, metric.unit, Gauge(points))
