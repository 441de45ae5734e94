"""Non-finite gauge values, carried beside the SDK (which drops NaN/inf and keeps showing the
previous value): a diverging loss must read NaN in every backend, never its last good value.

The board holds each gauge's current non-finite value until a finite one replaces it; every
reader (the step-sampled one and pull readers such as Prometheus) patches its collection with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)


@dataclass(frozen=True, slots=True)
class NonFiniteValue:
    instrument_name: str
    description: str
    unit: str
    value: float


class NonFiniteBoard:
    """Current non-finite gauge values by instrument name; written on the training thread,
    read by exporters' and scrape threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, NonFiniteValue] = {}

    def mark(self, value: NonFiniteValue) -> None:
        with self._lock:
            self._values[value.instrument_name] = value

    def clear(self, instrument_name: str) -> None:
        if instrument_name in self._values:
            with self._lock:
                self._values.pop(instrument_name, None)

    def snapshot(self) -> dict[str, NonFiniteValue]:
        if not self._values:
            return {}
        with self._lock:
            return dict(self._values)


def with_nonfinite(
    metrics_data: MetricsData,
    overrides: Mapping[str, NonFiniteValue],
    include: Callable[[str], bool] = lambda name: True,
) -> MetricsData:
    """A copy of `metrics_data` whose gauges named in `overrides` carry the non-finite value;
    gauges that never held a finite value (absent from the SDK's collection) are added."""
    if not overrides:
        return metrics_data
    pending = {name: v for name, v in overrides.items() if include(name)}
    resources = []
    for index, resource in enumerate(metrics_data.resource_metrics):
        scopes = []
        for scope in resource.scope_metrics:
            metrics = [
                _replaced(metric, pending.pop(metric.name)) if metric.name in pending else metric
                for metric in scope.metrics
            ]
            scopes.append(ScopeMetrics(scope.scope, metrics, scope.schema_url))
        if index == 0 and pending and scopes:
            first = scopes[0]
            added = [_new_gauge(value) for value in pending.values()]
            scopes[0] = ScopeMetrics(first.scope, [*first.metrics, *added], first.schema_url)
            pending = {}
        resources.append(ResourceMetrics(resource.resource, scopes, resource.schema_url))
    return MetricsData(resources)


def _replaced(metric: Metric, value: NonFiniteValue) -> Metric:
    if not isinstance(metric.data, Gauge) or not metric.data.data_points:
        return metric
    points: list[NumberDataPoint] = list(metric.data.data_points)
    last = points[-1]
    points[-1] = NumberDataPoint(
        attributes=last.attributes,
        start_time_unix_nano=last.start_time_unix_nano,
        time_unix_nano=time.time_ns(),
        value=value.value,
        exemplars=last.exemplars,
    )
    return Metric(metric.name, metric.description, metric.unit, Gauge(points))


def _new_gauge(value: NonFiniteValue) -> Metric:
    point = NumberDataPoint(
        attributes={}, start_time_unix_nano=0, time_unix_nano=time.time_ns(), value=value.value
    )
    return Metric(value.instrument_name, value.description, value.unit, Gauge([point]))
