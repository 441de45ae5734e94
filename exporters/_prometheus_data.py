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

# A gauge's series that its newest batch did not carry: their newest point each, in the order
# a scrape shows them. A list of (key, point) only where one batch carried two points of one
# series (exact, but O(series) per change).
_Points = dict[SeriesKey, NumberDataPoint] | list[tuple[SeriesKey, NumberDataPoint]]


class _Kept:
    """One (scope name, metric name): its newest metric, and for a gauge the series older
    batches carried and the newest did not."""

    __slots__ = ("keys", "metric", "older", "scope")

    def __init__(self, scope: InstrumentationScope, metric: Metric) -> None:
        self.scope, self.metric = scope, metric
        self.older: _Points | None = None
        self.keys: list[SeriesKey] | None = None  # of the newest batch's points, once needed


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
                    entry = kept.get((scope.name, metric.name))
                    if entry is None:
                        kept[scope.name, metric.name] = _Kept(scope, metric)
                        continue
                    previous, data = entry.metric.data, metric.data
                    entry.scope, entry.metric = scope, metric
                    if not isinstance(data, Gauge) or not isinstance(previous, Gauge):
                        entry.older = entry.keys = None
                        continue
                    new, old = data.data_points, previous.data_points
                    if len(new) == len(old) and all(
                        _same(n.attributes, o.attributes) for n, o in zip(new, old, strict=True)
                    ):
                        continue  # the usual batch: the last batch's series again
                    previous_keys = entry.keys or _keys(metric.name, old)
                    entry.keys = keys = _keys(metric.name, new)
                    if keys != previous_keys:
                        entry.older = _fold(entry.older, previous_keys, old, keys)

    def snapshot(self) -> list[tuple[InstrumentationScope, Metric]]:
        """Every kept metric, a gauge with all its series' newest points (the older series
        first, then the newest batch's in its order: what merging each batch over the
        previous one gives)."""
        shown = []
        for entry in self._kept.values():
            metric, older = entry.metric, entry.older
            if older:
                kept = list(older.values()) if isinstance(older, dict) else [p for _, p in older]
                points = [*kept, *metric.data.data_points]
                metric = Metric(metric.name, metric.description, metric.unit, Gauge(points))
            shown.append((entry.scope, metric))
        return shown

    def retained_points(self) -> int:
        """Data points held (bounded by the series seen, whatever the batch count)."""
        return sum(len(e.metric.data.data_points) + len(e.older or ()) for e in self._kept.values())


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


def _same(attributes: Mapping[str, Any] | None, other: Mapping[str, Any] | None) -> bool:
    """Surely one series, without building keys: both without attributes, or one mapping.
    (Equal mappings are not enough: {"gpu": 1} == {"gpu": 1.0}, two series for the keys.)"""
    return attributes is other or (not attributes and not other)


def _unscoped(attributes: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if not attributes or SCOPE_ATTRIBUTE not in attributes:
        return attributes
    return {k: v for k, v in attributes.items() if k != SCOPE_ATTRIBUTE}


def _fold(
    older: _Points | None,
    previous_keys: list[SeriesKey],
    previous: Sequence[NumberDataPoint],
    keys: list[SeriesKey],
) -> _Points:
    """The series not in the new batch (`keys`): the older ones, then the previous batch's,
    in their order. With unique keys, O(points of the two batches), whatever the series kept."""
    fresh = set(keys)
    if len(set(previous_keys)) == len(previous_keys) and not isinstance(older, list):
        kept = {} if older is None else older
        for key in keys:
            kept.pop(key, None)
        kept.update((k, p) for k, p in zip(previous_keys, previous, strict=True) if k not in fresh)
        return kept
    pairs = () if older is None else older.items() if isinstance(older, dict) else older
    return [
        (k, p) for k, p in (*pairs, *zip(previous_keys, previous, strict=True)) if k not in fresh
    ]


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
