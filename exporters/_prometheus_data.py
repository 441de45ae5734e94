"""Keep the step-sampled data for Prometheus cheaply per export; shape it once per render.

- `LatestMetrics` keeps, per (scope name, metric name), the newest metric and, for gauges,
  the newest point of every series: a batch carries only the gauge series set for its step
  (never a stale value), a scrape still shows every series' last value. An export costs a
  dict update per metric; memory is bounded by the series seen, never by the batch count.
- Exponential histograms (our default for histograms without buckets) have no classic
  exposition: at render each becomes an explicit-bucket histogram whose boundaries are the
  exponential bucket bounds, so no information is lost and `histogram_quantile` works as usual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_train.nonfinite import SeriesKey, series_key
from otel_train.reduction import REDUCED_INSTRUMENTS, SCOPE_ATTRIBUTE

# A gauge's kept points: newest point per series, in the order a scrape shows them. A list of
# (key, point) only where one batch carried two points of one series (exact, but O(series)).
_Points = dict[SeriesKey, NumberDataPoint] | list[tuple[SeriesKey, NumberDataPoint]]


class _Kept:
    """One (scope name, metric name): its newest metric, and a gauge's points by series."""

    __slots__ = ("metric", "points", "scope")

    def __init__(self, scope: InstrumentationScope, metric: Metric, points: _Points | None) -> None:
        self.scope, self.metric, self.points = scope, metric, points


class LatestMetrics:
    """What the next scrape shows, updated per export without copying or converting: the
    conversions (`classic`, scope labels) run at render, once per version. Not thread-safe:
    the exporter holds its lock around `update` and `snapshot`."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], _Kept] = {}
        self.resource: Resource | None = None

    def update(self, metrics_data: MetricsData) -> None:
        kept = self._kept
        for resource_metrics in metrics_data.resource_metrics:
            self.resource = resource_metrics.resource
            for scope_metrics in resource_metrics.scope_metrics:
                scope = scope_metrics.scope
                for metric in scope_metrics.metrics:
                    name, data = metric.name, metric.data
                    entry = kept.get((scope.name, name))
                    if entry is None:
                        entry = kept[scope.name, name] = _Kept(scope, metric, None)
                    else:
                        entry.scope, entry.metric = scope, metric
                    if not isinstance(data, Gauge):
                        entry.points = None
                    elif entry.points is None:  # new, or was no gauge
                        entry.points = _series(name, data.data_points)
                    else:
                        entry.points = _fold(entry.points, name, data.data_points)

    def snapshot(self) -> list[tuple[InstrumentationScope, Metric]]:
        """Every kept metric, a gauge with all its series' newest points (the batch's own
        points last, in its order: what merging each batch over the previous one gives)."""
        shown = []
        for entry in self._kept.values():
            metric, points = entry.metric, entry.points
            if points is not None:
                values = (
                    list(points.values()) if isinstance(points, dict) else [p for _, p in points]
                )
                metric = Metric(metric.name, metric.description, metric.unit, Gauge(values))
            shown.append((entry.scope, metric))
        return shown

    def retained_points(self) -> int:
        """Data points held (bounded by the series seen, whatever the batch count)."""
        return sum(
            len(e.points) if e.points is not None else len(e.metric.data.data_points)
            for e in self._kept.values()
        )


def classic(metric: Metric) -> Metric:
    """`metric` as Prometheus can expose it (exponential histograms become explicit)."""
    data = metric.data
    if not isinstance(data, ExponentialHistogram):
        return metric
    points = [_explicit(point) for point in data.data_points]
    return Metric(
        metric.name,
        metric.description,
        metric.unit,
        Histogram(points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
    )


def _keys(name: str, points: Sequence[NumberDataPoint]) -> list[SeriesKey]:
    """Series keys of a gauge's points. Reduced instruments get `scope=` at render, over any
    `scope` attribute of their own, so that one is left out of their key."""
    if name in REDUCED_INSTRUMENTS:
        return [series_key(name, _unscoped(p.attributes)) for p in points]
    return [series_key(name, p.attributes) for p in points]


def _unscoped(attributes: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if not attributes or SCOPE_ATTRIBUTE not in attributes:
        return attributes
    return {k: v for k, v in attributes.items() if k != SCOPE_ATTRIBUTE}


def _series(name: str, points: Sequence[NumberDataPoint]) -> _Points:
    keys = _keys(name, points)
    pairs = list(zip(keys, points, strict=True))
    return dict(pairs) if len(set(keys)) == len(keys) else pairs


def _fold(kept: _Points, name: str, points: Sequence[NumberDataPoint]) -> _Points:
    """A batch's points over the kept ones: its series move to the end in its order, the
    others keep their place and last value (O(points in the batch) for the dict)."""
    if isinstance(kept, dict) and len(kept) == len(points):
        # The usual batch: the same series as last time, in the same order (equal attributes
        # give equal keys), so the batch's points replace the kept ones where they are.
        if all(o.attributes == p.attributes for o, p in zip(kept.values(), points, strict=True)):
            return dict(zip(kept, points, strict=True))
    keys = _keys(name, points)
    if isinstance(kept, dict) and (len(keys) < 2 or len(set(keys)) == len(keys)):
        for key in keys:
            kept.pop(key, None)
        kept.update(zip(keys, points, strict=True))
        return kept
    fresh = set(keys)
    pairs = kept.items() if isinstance(kept, dict) else kept
    return [*((k, p) for k, p in pairs if k not in fresh), *zip(keys, points, strict=True)]


def _explicit(point: ExponentialHistogramDataPoint) -> HistogramDataPoint:
    """Bucket i of scale s holds (base^i, base^(i+1)], base = 2^(2^-s) (OTel data model)."""
    step = 2.0**-point.scale  # base^i = 2^(i * 2^-s): exact at powers of two

    def power(index: int) -> float:
        return float(2.0 ** (index * step))

    bounds: list[float] = []
    counts: list[int] = []
    negative = point.negative
    # The SDK's histograms take no negative values, so these are normally empty; a negative
    # first bound would also make prometheus_client drop _count and _sum.
    negatives = (
        range(len(negative.bucket_counts) - 1, -1, -1) if any(negative.bucket_counts) else ()
    )
    for offset in negatives:
        index = negative.offset + offset  # magnitudes (base^i, base^(i+1)], most negative first
        bounds.append(-power(index))
        counts.append(int(negative.bucket_counts[offset]))
    if point.zero_count or bounds:  # zero bucket: (last negative bound, 0]
        bounds.append(0.0)
        counts.append(int(point.zero_count))
    positive = point.positive
    for offset, count in enumerate(positive.bucket_counts):
        bounds.append(power(positive.offset + offset + 1))
        counts.append(int(count))
    counts.append(0)  # the +Inf bucket: every value lies below the last bound
    return HistogramDataPoint(
        attributes=point.attributes,
        start_time_unix_nano=point.start_time_unix_nano,
        time_unix_nano=point.time_unix_nano,
        count=point.count,
        sum=point.sum,
        bucket_counts=counts,
        explicit_bounds=bounds,
        min=point.min,
        max=point.max,
        exemplars=[],
    )
