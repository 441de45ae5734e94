"""Shape the step-sampled data for Prometheus' classic exposition before it is rendered.

- Exponential histograms (our default for histograms without buckets) have no classic
  exposition: each becomes an explicit-bucket histogram whose boundaries are the exponential
  bucket bounds, so no information is lost and `histogram_quantile` works as usual.
- A batch carries only the gauge series set for its step (never a stale value); a scrape
  still shows every series' last value, so new points are merged over the kept ones.
"""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
)

from otel_train.nonfinite import series_key


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


def merged(previous: Metric | None, metric: Metric) -> Metric:
    """A gauge's new points over the previous ones (series not in this batch keep theirs)."""
    if previous is None or not isinstance(metric.data, Gauge):
        return metric
    if not isinstance(previous.data, Gauge):
        return metric
    name = metric.name
    fresh = {series_key(name, p.attributes) for p in metric.data.data_points}
    kept = [p for p in previous.data.data_points if series_key(name, p.attributes) not in fresh]
    if not kept:
        return metric
    points = [*kept, *metric.data.data_points]
    return Metric(metric.name, metric.description, metric.unit, Gauge(points))


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
