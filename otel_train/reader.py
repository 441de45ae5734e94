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

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricExporter,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)

from otel_train.background import BackgroundExporter
from otel_train.rows import GLOBAL_STEP_INSTRUMENT
from otel_train.sampling import GroupIndex

_logger = logging.getLogger("otel_train.reader")


@dataclass(frozen=True, slots=True)
class NonFiniteValue:
    """A NaN/inf the SDK would drop (keeping the previous value): we carry it ourselves."""

    instrument_name: str
    description: str
    unit: str
    value: float


class StepSampledReader(MetricReader):
    """Collects on sampled steps and forwards only the due groups' metrics, off-thread."""

    def __init__(self, group_index: GroupIndex, *, max_queue_batches: int = 1024) -> None:
        super().__init__()
        self._groups = group_index
        self._max_queue_batches = max_queue_batches
        self._exporters: list[BackgroundExporter] = []
        self._due: frozenset[str] = frozenset()
        self._nonfinite: list[NonFiniteValue] = []
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
    def export_groups(
        self, groups: frozenset[str], nonfinite: Iterable[NonFiniteValue] = ()
    ) -> None:
        """Collect now and queue the metrics of `groups` for every exporter. Never raises."""
        if self._shut_down or not groups:
            return
        with self._collect_lock:
            self._due = groups
            self._nonfinite = list(nonfinite)
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
                self._nonfinite = []

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
        replacements = {v.instrument_name: v for v in self._nonfinite}
        resource_metrics = []
        has_payload = False
        for resource in metrics_data.resource_metrics:
            scopes = []
            for scope in resource.scope_metrics:
                kept = []
                for metric in scope.metrics:
                    name = metric.name
                    if name == GLOBAL_STEP_INSTRUMENT:
                        kept.append(metric)
                    elif group_of(name) in due:
                        replacement = replacements.pop(name, None)
                        kept.append(_with_value(metric, replacement) if replacement else metric)
                        has_payload = True
                if kept:
                    scopes.append(ScopeMetrics(scope.scope, kept, scope.schema_url))
            if replacements and resource is metrics_data.resource_metrics[0] and scopes:
                # Non-finite values of instruments that never held a finite one.
                extra = [
                    _new_gauge(v)
                    for v in replacements.values()
                    if group_of(v.instrument_name) in due
                ]
                if extra:
                    first = scopes[0]
                    scopes[0] = ScopeMetrics(
                        first.scope, [*first.metrics, *extra], first.schema_url
                    )
                    has_payload = True
            if scopes:
                resource_metrics.append(
                    ResourceMetrics(resource.resource, scopes, resource.schema_url)
                )
        if not has_payload:
            return None
        return MetricsData(resource_metrics)

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


def _with_value(metric: Metric, replacement: NonFiniteValue) -> Metric:
    points = list(metric.data.data_points)
    if not points or not isinstance(metric.data, Gauge):
        return metric
    last = points[-1]
    if not isinstance(last, NumberDataPoint):
        return metric
    points[-1] = NumberDataPoint(
        attributes=last.attributes,
        start_time_unix_nano=last.start_time_unix_nano,
        time_unix_nano=time.time_ns(),
        value=replacement.value,
        exemplars=last.exemplars,
    )
    return Metric(metric.name, metric.description, metric.unit, Gauge(points))  # type: ignore[arg-type]


def _new_gauge(value: NonFiniteValue) -> Metric:
    point = NumberDataPoint(
        attributes={},
        start_time_unix_nano=0,
        time_unix_nano=time.time_ns(),
        value=value.value,
    )
    return Metric(value.instrument_name, value.description, value.unit, Gauge([point]))
