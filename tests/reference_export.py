"""The row and line builders as they were before issue 12's export-CPU work, kept verbatim.

The straightforward reference the optimised `otel_train.rows.RowBuilder` and
`exporters.jsonl.row_to_json` must match byte for byte (tests/unit/test_export_equivalence.py),
and the "before" side of `benchmarks/export_cpu.py`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    Gauge,
    Histogram,
    HistogramDataPoint,
    MetricsData,
    Sum,
)

from otel_train.exponential import ExponentialIntervals
from otel_train.naming import KeyNamer
from otel_train.rows import GLOBAL_STEP_INSTRUMENT, MetricRow

_NOT_KEY_CHARS = re.compile(r"[^A-Za-z0-9_]+")


def _sanitize_key_part(text: str) -> str:
    return _NOT_KEY_CHARS.sub("_", text).strip("_") or "_"


def attribute_suffix(attributes: Any) -> str:
    if not attributes:
        return ""
    parts = (
        f"{_sanitize_key_part(str(k))}_{_sanitize_key_part(str(v))}"
        for k, v in sorted(attributes.items())
    )
    return "/" + "_".join(parts)


def bucket_quantile(
    quantile: float,
    boundaries: Sequence[float],
    counts: Sequence[float],
    *,
    low: float = 0.0,
    high: float | None = None,
) -> float | None:
    """Linear interpolation inside the bucket holding the quantile (Prometheus' rule).

    `low` / `high` bound the first and the overflow bucket (the recorded min and max), which
    would otherwise be guessed as 0 and the last boundary.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = quantile * total
    cumulative = 0.0
    for index, count in enumerate(counts):
        if count <= 0:
            continue
        if cumulative + count >= rank:
            lower = boundaries[index - 1] if index > 0 else min(low, boundaries[0])
            if index >= len(boundaries):  # overflow bucket: up to the recorded max
                upper = high if high is not None else lower
            else:
                upper = boundaries[index] if high is None else min(boundaries[index], high)
            lower = max(lower, low) if index == 0 else lower
            return lower + (upper - lower) * ((rank - cumulative) / count)
        cumulative += count
    return float(boundaries[-1]) if boundaries else None


class ReferenceRowBuilder:
    """Stateful because histogram intervals are differences of cumulative exports."""

    def __init__(self, namer: KeyNamer | None = None) -> None:
        self.namer = namer or KeyNamer()
        self._previous_histograms: dict[str, tuple[float, float, tuple[float, ...]]] = {}
        self._exponential = ExponentialIntervals()

    def build(self, metrics_data: MetricsData) -> MetricRow:
        row = MetricRow(step=None, time=0.0)
        latest_nanos = 0
        for resource_metrics in metrics_data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = metric.data
                    for point in data.data_points:
                        latest_nanos = max(latest_nanos, point.time_unix_nano)
                    if metric.name == GLOBAL_STEP_INSTRUMENT and data.data_points:
                        row.step = int(data.data_points[-1].value)  # type: ignore[union-attr]
                    if isinstance(data, Histogram):
                        self._add_histogram(row, metric.name, data)
                    elif isinstance(data, ExponentialHistogram):
                        self._add_exponential(row, metric.name, data)
                    elif isinstance(data, (Gauge, Sum)):
                        for point in data.data_points:
                            suffix = attribute_suffix(point.attributes)
                            self._put(row, metric.name, suffix, float(point.value))
        row.time = latest_nanos / 1e9 if latest_nanos else 0.0
        return row

    def _put(self, row: MetricRow, name: str, suffix: str, value: float) -> None:
        for spec in self.namer.keys_for(name):
            key = spec.key + suffix
            scaled = value * spec.scale if spec.scale != 1.0 else value
            row.values[key] = scaled
            if not math.isfinite(scaled):
                row.nonfinite.append(key)

    def _add_histogram(self, row: MetricRow, name: str, data: Histogram) -> None:
        for point in data.data_points:
            suffix = attribute_suffix(point.attributes)
            count, total, counts = self._interval(name + suffix, data, point)
            if count <= 0:
                continue
            self._put(row, name, suffix, total / count)
            for quantile, label in ((0.5, "_p50"), (0.95, "_p95")):
                estimate = bucket_quantile(
                    quantile, point.explicit_bounds, counts, low=point.min, high=point.max
                )
                if estimate is not None:
                    self._put(row, name, suffix + label, estimate)

    def _add_exponential(self, row: MetricRow, name: str, data: ExponentialHistogram) -> None:
        cumulative = data.aggregation_temporality == AggregationTemporality.CUMULATIVE
        for point in data.data_points:
            suffix = attribute_suffix(point.attributes)
            interval = self._exponential.interval(name + suffix, point, cumulative=cumulative)
            if interval is None:
                continue
            self._put(row, name, suffix, interval.mean)
            for quantile, label in ((0.5, "_p50"), (0.95, "_p95")):
                self._put(row, name, suffix + label, interval.quantile(quantile))

    def _interval(
        self, identity: str, data: Histogram, point: HistogramDataPoint
    ) -> tuple[float, float, tuple[float, ...]]:
        counts = tuple(float(c) for c in point.bucket_counts)
        if data.aggregation_temporality == AggregationTemporality.DELTA:
            return float(point.count), float(point.sum), counts
        previous = self._previous_histograms.get(identity)
        self._previous_histograms[identity] = (float(point.count), float(point.sum), counts)
        if previous is None or previous[0] > point.count or len(previous[2]) != len(counts):
            return float(point.count), float(point.sum), counts
        return (
            point.count - previous[0],
            point.sum - previous[1],
            tuple(now - before for now, before in zip(counts, previous[2], strict=True)),
        )


def reference_row_to_json(row: MetricRow, *, run: str, stage: str, rank: int) -> str:
    """The line for one row: always valid JSON (allow_nan=False proves it)."""
    metrics = {key: (value if math.isfinite(value) else None) for key, value in row.values.items()}
    record: dict[str, Any] = {
        "step": row.step,
        # The collection time; a batch with no data point carries none, so the export's own.
        "time": round(row.time if row.time > 0 else time.time(), 6),
        "run": run,
        "stage": stage,
        "rank": rank,
        "metrics": metrics,
    }
    if row.nonfinite:
        record["nonfinite"] = {key: _spell(row.values[key]) for key in row.nonfinite}
    return _ENCODER.encode(record)


# One encoder for every line (json.dumps builds a new one per call when given options): the
# same C encoder, the same bytes. allow_nan=False: a bare NaN can never reach the file.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _spell(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
