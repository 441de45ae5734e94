"""`StepSampledReader`: an OTel `MetricReader` driven by the training step, not a timer.

On a due step the telemetry hands it the due groups' metrics, built from otel-train's own
streams; it adds what only the SDK holds (observable instruments, exponential histograms) by
collecting the SDK when such a group is due, and forwards one batch (plus the global step, the
axis every backend plots against) to each push exporter's background queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_train._sdk_compat import exponential_unless_buckets_given
from otel_train.background import BackgroundExporter
from otel_train.bounded_collect import BoundedCollector
from otel_train.naming import KeyNamer
from otel_train.nonfinite import NonFiniteBoard, SeriesKey, series_key, with_nonfinite
from otel_train.rows import GLOBAL_STEP_INSTRUMENT, SharedRows, StepBatch
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
        self._collecting_thread: int | None = None
        self._collector = BoundedCollector(self._collect_sdk_now)
        self._shut_down = False
        self._warned_collect = False
        self._collected: MetricsData | None = None
        self._resource: Resource = Resource.get_empty()
        self._rows: SharedRows | None = None
        self._row_namer: KeyNamer | None = None
        self._row_consumers = 0
        self._values_are_global: Callable[[], bool] | None = None

    def bind(
        self,
        *,
        resource: Resource,
        namer: KeyNamer | None,
        values_are_global: Callable[[], bool] | None = None,
    ) -> None:
        """setup(): the resource batches carry, the run's key namer (exporters using it
        share one row per batch), and what the reduction did, stamped on each batch as it
        is made (an exporter reading it later, on its own thread, may be a step behind)."""
        self._resource = resource
        self._row_namer = namer
        self._values_are_global = values_are_global
        self._update_rows()

    def _update_rows(self) -> None:
        if self._row_namer is not None and self._row_consumers and self._rows is None:
            self._rows = SharedRows(self._row_namer, max_unbuilt=self._max_queue_batches)

    # -- wiring ---------------------------------------------------------------------------
    def add_exporter(self, exporter: MetricExporter, *, name: str) -> BackgroundExporter:
        worker = BackgroundExporter(exporter, name=name, max_queue_batches=self._max_queue_batches)
        self._exporters.append(worker)
        if getattr(exporter, "shares_rows", False):
            self._row_consumers += 1
            self._update_rows()
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
        self,
        groups: frozenset[str],
        direct: Mapping[InstrumentationScope, Sequence[Metric]] | None = None,
        *,
        collect_sdk: bool = True,
        fresh: Freshness | None = None,
    ) -> None:
        """Queue the metrics of `groups` for every exporter: `direct` (built by the telemetry
        from its streams, gauges only where set for this export) plus, with `collect_sdk`,
        what the SDK holds for those groups. Never raises.

        `fresh`: which series of the gauges we set on SDK instruments were set for this
        export. The SDK's gauges repeat their last value at every collection; a gauge series
        not set since the previous export of its group is left out (absent, never stale).
        """
        if self._shut_down or not groups:
            return
        collected = self._collector.collect(groups) if collect_sdk else None  # bounded wait
        batch = self._batch(groups, direct or {}, collected, fresh)
        if batch is None:
            return
        queued = []
        for worker in self._exporters:
            if worker.in_memory:
                worker.export_now(batch)
            else:
                queued.append(worker)
        if queued:
            queued_batch = self._row_only(batch, queued)
            for worker in queued:
                worker.submit(queued_batch)

    def _row_only(self, batch: MetricsData, queued: list[BackgroundExporter]) -> MetricsData:
        """The batch to queue: its row alone when every queued exporter reads only that (the
        OTel objects then die here; queued for a few ms they would be promoted by the
        garbage collector, and the full collections that follow walk the whole heap)."""
        rows = self._rows
        if rows is None or not isinstance(batch, StepBatch):
            return batch
        namer = rows.namer
        if not all(
            (hook := worker.rows_reader) is not None and hook.reads_only_shared_rows(namer)
            for worker in queued
        ):
            return batch
        return StepBatch.of_row(rows.row_of(batch), rows)

    def _collect_sdk_now(self, groups: frozenset[str]) -> MetricsData | None:
        """Runs on the collector's thread, one collect at a time (see bounded_collect)."""
        self._due = groups
        self._collecting_thread = threading.get_ident()
        self._collected = None
        try:
            self.collect(timeout_millis=10_000)
        except Exception as error:  # the SDK raises on callback timeouts; training goes on
            if not self._warned_collect:
                self._warned_collect = True
                _logger.warning("otel-train: metric collection failed (%r); skipped", error)
        finally:
            self._collecting_thread = None
            self._due = frozenset()
        collected, self._collected = self._collected, None
        return collected

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if self._collecting_thread is None:
            return  # a force_flush from outside a step: nothing is due
        self._collected = metrics_data

    def _batch(
        self,
        due: frozenset[str],
        direct: Mapping[InstrumentationScope, Sequence[Metric]],
        collected: MetricsData | None,
        fresh: Freshness | None = None,
    ) -> MetricsData | None:
        group_of = self._groups.group_of
        has_payload = any(
            metric.name != GLOBAL_STEP_INSTRUMENT
            for metrics in direct.values()
            for metric in metrics
        )
        scopes: dict[InstrumentationScope, list[Metric]] = {}
        resource = self._resource
        if collected is not None:
            for collected_resource in collected.resource_metrics:
                resource = collected_resource.resource
                for scope_metrics in collected_resource.scope_metrics:
                    kept = [
                        current
                        for metric in scope_metrics.metrics
                        if group_of(metric.name) in due
                        if (current := _without_stale(metric, fresh)) is not None
                    ]
                    if kept:
                        has_payload = True
                        scopes.setdefault(scope_metrics.scope, []).extend(kept)
        for scope, metrics in direct.items():
            scopes.setdefault(scope, []).extend(metrics)
        overrides = self.nonfinite.snapshot()  # non-finite values of SDK-held gauges
        due_overrides = {
            k: v
            for k, v in overrides.items()
            if group_of(k[0]) in due and (fresh is None or k in fresh.series)
        }
        if not has_payload and not due_overrides:
            return None
        resource_metrics = [
            ResourceMetrics(
                resource,
                [
                    ScopeMetrics(scope, metrics, scope.schema_url or "")
                    for scope, metrics in scopes.items()
                ],
                resource.schema_url,
            )
        ]
        if due_overrides:
            resource_metrics = list(
                with_nonfinite(MetricsData(resource_metrics), due_overrides).resource_metrics
            )
        stamp = self._values_are_global
        return StepBatch(
            resource_metrics,
            rows=self._rows,
            values_global=None if stamp is None else stamp(),
        )

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
        self._collector.close()
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
