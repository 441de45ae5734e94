"""Non-finite gauge values, carried beside the SDK (which drops NaN/inf and keeps showing the
previous value): a diverging loss must read NaN in every backend, never its last good value.

The board holds each gauge series' current non-finite value (by instrument name and attribute
set) until a finite one replaces it; every reader (the step-sampled one and pull readers such
as Prometheus) patches its collection with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)

SeriesKey = tuple[str, tuple[tuple[str, Any], ...]]


def series_key(name: str, attributes: Mapping[str, Any] | None) -> SeriesKey:
    if not attributes:
        return (name, ())
    return (name, tuple(sorted((k, str(v)) for k, v in attributes.items())))


@dataclass(frozen=True, slots=True)
class NonFiniteValue:
    instrument_name: str
    description: str
    unit: str
    value: float
    attributes: Mapping[str, Any] | None = None


class NonFiniteBoard:
    """Current non-finite gauge values by series; written on the training thread, read by
    exporters' and scrape threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[SeriesKey, NonFiniteValue] = {}

    def mark(
        self,
        name: str,
        attributes: Mapping[str, Any] | None,
        value: float,
        *,
        unit: str = "",
        description: str = "",
    ) -> None:
        entry = NonFiniteValue(name, description, unit, value, dict(attributes or {}))
        with self._lock:
            self._values[series_key(name, attributes)] = entry

    def clear(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        if not self._values:
            return
        key = series_key(name, attributes)
        if key in self._values:
            with self._lock:
                self._values.pop(key, None)

    def snapshot(self) -> dict[SeriesKey, NonFiniteValue]:
        if not self._values:
            return {}
        with self._lock:
            return dict(self._values)


def with_nonfinite(
    metrics_data: MetricsData, overrides: Mapping[SeriesKey, NonFiniteValue]
) -> MetricsData:
    """A copy of `metrics_data` whose gauge points named in `overrides` carry the non-finite
    value; series that never held a finite value (absent from the collection) are added."""
    if not overrides:
        return metrics_data
    pending = dict(overrides)
    names = {key[0] for key in pending}
    resources = []
    for index, resource in enumerate(metrics_data.resource_metrics):
        scopes = []
        for scope in resource.scope_metrics:
            metrics = [
                _replaced(metric, pending) if metric.name in names else metric
                for metric in scope.metrics
            ]
            scopes.append(ScopeMetrics(scope.scope, metrics, scope.schema_url))
        if index == 0 and pending and scopes:
            first = scopes[0]
            added = _new_gauges(pending.values())
            scopes[0] = ScopeMetrics(first.scope, [*first.metrics, *added], first.schema_url)
            pending = {}
        resources.append(ResourceMetrics(resource.resource, scopes, resource.schema_url))
    return MetricsData(resources)


def _replaced(metric: Metric, pending: dict[SeriesKey, NonFiniteValue]) -> Metric:
    """Patch matching points; consumed entries leave `pending`, the rest are added later
    to this metric (a NaN series next to finite ones of the same instrument)."""
    if not isinstance(metric.data, Gauge):
        return metric
    now = time.time_ns()
    points: list[NumberDataPoint] = []
    for point in metric.data.data_points:
        entry = pending.pop(series_key(metric.name, point.attributes), None)
        if entry is None:
            points.append(point)
        else:
            points.append(_point(entry, point.start_time_unix_nano, now, point.attributes))
    for key in [k for k in pending if k[0] == metric.name]:
        entry = pending.pop(key)
        points.append(_point(entry, 0, now, entry.attributes))
    return Metric(metric.name, metric.description, metric.unit, Gauge(points))


def _point(entry: NonFiniteValue, start: int, now: int, attributes: Any) -> NumberDataPoint:
    return NumberDataPoint(
        attributes=attributes or {}, start_time_unix_nano=start, time_unix_nano=now,
        value=entry.value,
    )  # fmt: skip


def _new_gauges(entries: Any) -> list[Metric]:
    by_name: dict[str, list[NonFiniteValue]] = {}
    for entry in entries:
        by_name.setdefault(entry.instrument_name, []).append(entry)
    now = time.time_ns()
    return [
        Metric(
            name,
            group[0].description,
            group[0].unit,
            Gauge([_point(entry, 0, now, entry.attributes) for entry in group]),
        )
        for name, group in by_name.items()
    ]
