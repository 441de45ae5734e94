"""Turn one OTel export (`MetricsData`) into one flat row: step, time and `group/key` values.

Shared by the push exporters (JSON lines, W&B) so every backend shows the same keys for the
same data. Counters come out cumulative; histograms as the interval's mean, p50 and p95
(estimated from bucket deltas as Prometheus' `histogram_quantile` does); gauges as they are.
Non-finite values are kept (NaN stays NaN) and listed, so a diverging loss is never shown as
its last good value. Batches of the step-sampled reader (`StepBatch`) carry their row, built
once for every exporter that shares the run's key namer instead of once per exporter.
"""

from __future__ import annotations

import math
import operator
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from otel_train.naming import AttributeSuffixes, KeyNamer

GLOBAL_STEP_INSTRUMENT = "train.global_step"
_SCALAR, _HISTOGRAM, _EXPONENTIAL, _OTHER = range(4)  # how a metric's data turns into values
_QUANTILES = (0.5, 0.95)  # exported as _p50 / _p95
_MAX_CACHED = 8192  # (instrument, attribute set) key entries kept per builder


@dataclass(slots=True)
class MetricRow:
    """One exported row. `step` is None when the batch carried no global step."""

    step: int | None
    time: float
    values: dict[str, float] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)


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
    return bucket_quantiles((quantile,), boundaries, counts, low=low, high=high)[0]


def bucket_quantiles(
    quantiles: Sequence[float],
    boundaries: Sequence[float],
    counts: Sequence[float],
    *,
    low: float = 0.0,
    high: float | None = None,
) -> list[float | None]:
    """`bucket_quantile` of each of `quantiles` (ascending), in one walk over the buckets: the
    same cumulative sums, so the same numbers as one call per quantile."""
    total = sum(counts)
    if total <= 0:
        return [None] * len(quantiles)
    estimates: list[float | None] = []
    pending = iter(quantiles)
    rank = next(pending, None)
    cumulative = 0.0
    for index, count in enumerate(counts):
        if rank is None:
            break
        if count <= 0:
            continue
        while rank is not None and cumulative + count >= rank * total:
            lower = boundaries[index - 1] if index > 0 else min(low, boundaries[0])
            if index >= len(boundaries):  # overflow bucket: up to the recorded max
                upper = high if high is not None else lower
            else:
                upper = boundaries[index] if high is None else min(boundaries[index], high)
            lower = max(lower, low) if index == 0 else lower
            quantile_rank = rank * total
            estimates.append(lower + (upper - lower) * ((quantile_rank - cumulative) / count))
            rank = next(pending, None)
        cumulative += count
    fallback = float(boundaries[-1]) if boundaries else None
    estimates.extend(fallback for _ in range(len(quantiles) - len(estimates)))
    return estimates


class RowBuilder:
    """Stateful because histogram intervals are differences of cumulative exports.

    Runs off the training thread once per batch (on the finisher, or the first export thread
    that asks), holding the GIL the training thread needs, so
    what does not change between batches is worked out once: each (instrument, attribute set)
    pair's output keys and scales, and each data type's kind.
    """

    def __init__(self, namer: KeyNamer | None = None) -> None:
        self.namer = namer or KeyNamer()
        self._previous_histograms: dict[str, tuple[float, float, tuple[float, ...]]] = {}
        self._exponential = ExponentialIntervals()
        self._suffixes = AttributeSuffixes()
        self._keys: dict[str, tuple[tuple[str, float], ...]] = {}  # (instrument, "") keys
        self._suffixed_keys: dict[tuple[str, str], tuple[tuple[str, float], ...]] = {}
        self._kinds: dict[type, int] = {}

    def build(self, metrics_data: MetricsData) -> MetricRow:
        values: dict[str, float] = {}
        nonfinite: list[str] = []
        step: int | None = None
        latest_nanos = 0
        isfinite = math.isfinite
        keys_of, suffix_of, kinds = self._keys, self._suffixes.of, self._kinds
        for resource_metrics in metrics_data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = metric.data
                    points = data.data_points
                    if not points:
                        continue
                    name = metric.name
                    kind = kinds.get(type(data))
                    if kind is None:
                        kind = kinds[type(data)] = _kind_of(data)
                    if name == GLOBAL_STEP_INSTRUMENT:
                        step = int(points[-1].value)  # type: ignore[union-attr]
                    if kind != _SCALAR:
                        for point in points:
                            if point.time_unix_nano > latest_nanos:
                                latest_nanos = point.time_unix_nano
                        row = MetricRow(step=None, time=0.0, values=values, nonfinite=nonfinite)
                        if kind == _HISTOGRAM:
                            self._add_histogram(row, name, data)  # type: ignore[arg-type]
                        elif kind == _EXPONENTIAL:
                            self._add_exponential(row, name, data)  # type: ignore[arg-type]
                        continue
                    for point in points:
                        if point.time_unix_nano > latest_nanos:
                            latest_nanos = point.time_unix_nano
                        attributes = point.attributes
                        if attributes:
                            keys = self._keys_for(name, suffix_of(attributes))
                        else:
                            keys = keys_of.get(name) or self._keys_for(name, "")
                        value = float(point.value)  # type: ignore[union-attr]
                        for key, scale in keys:
                            scaled = value * scale if scale != 1.0 else value
                            values[key] = scaled
                            if not isfinite(scaled):
                                nonfinite.append(key)
        return MetricRow(
            step=step,
            time=latest_nanos / 1e9 if latest_nanos else 0.0,
            values=values,
            nonfinite=nonfinite,
        )

    def _keys_for(self, name: str, suffix: str) -> tuple[tuple[str, float], ...]:
        """The output keys of one instrument's data point with this attribute suffix."""
        keys = self._suffixed_keys.get((name, suffix))
        if keys is None:
            keys = tuple((spec.key + suffix, spec.scale) for spec in self.namer.keys_for(name))
            if len(self._suffixed_keys) >= _MAX_CACHED:
                self._suffixed_keys.clear()  # bounded, whatever attributes a user records
            self._suffixed_keys[(name, suffix)] = keys
            if not suffix:
                self._keys[name] = keys
        return keys

    def _put(self, row: MetricRow, name: str, suffix: str, value: float) -> None:
        for key, scale in self._keys_for(name, suffix):
            scaled = value * scale if scale != 1.0 else value
            row.values[key] = scaled
            if not math.isfinite(scaled):
                row.nonfinite.append(key)

    def _add_histogram(self, row: MetricRow, name: str, data: Histogram) -> None:
        for point in data.data_points:
            suffix = self._suffixes.of(point.attributes)
            count, total, counts = self._interval(name + suffix, data, point)
            if count <= 0:
                continue
            self._put(row, name, suffix, total / count)
            p50, p95 = bucket_quantiles(
                _QUANTILES, point.explicit_bounds, counts, low=point.min, high=point.max
            )
            if p50 is not None:
                self._put(row, name, suffix + "_p50", p50)
            if p95 is not None:
                self._put(row, name, suffix + "_p95", p95)

    def _add_exponential(self, row: MetricRow, name: str, data: ExponentialHistogram) -> None:
        cumulative = data.aggregation_temporality == AggregationTemporality.CUMULATIVE
        for point in data.data_points:
            suffix = self._suffixes.of(point.attributes)
            interval = self._exponential.interval(name + suffix, point, cumulative=cumulative)
            if interval is None:
                continue
            self._put(row, name, suffix, interval.mean)
            for quantile, label in ((0.5, "_p50"), (0.95, "_p95")):
                self._put(row, name, suffix + label, interval.quantile(quantile))

    def _interval(
        self, identity: str, data: Histogram, point: HistogramDataPoint
    ) -> tuple[float, float, tuple[float, ...]]:
        counts = tuple(map(float, point.bucket_counts))
        if data.aggregation_temporality == AggregationTemporality.DELTA:
            return float(point.count), float(point.sum), counts
        previous = self._previous_histograms.get(identity)
        self._previous_histograms[identity] = (float(point.count), float(point.sum), counts)
        if previous is None or previous[0] > point.count or len(previous[2]) != len(counts):
            return float(point.count), float(point.sum), counts
        return (
            point.count - previous[0],
            point.sum - previous[1],
            tuple(map(operator.sub, counts, previous[2])),  # lengths checked above
        )


def _kind_of(data: Any) -> int:
    if isinstance(data, Histogram):
        return _HISTOGRAM
    if isinstance(data, ExponentialHistogram):
        return _EXPONENTIAL
    if isinstance(data, (Gauge, Sum)):
        return _SCALAR
    return _OTHER


class StepBatch(MetricsData):
    """A real `MetricsData` (any exporter takes it) that also carries its place in the
    reader's sequence, so exporters sharing one key namer build its row only once."""

    rows: SharedRows | None
    row: MetricRow | None
    # Whether the reduced values are all ranks' (scope="global"), as it stood when the batch
    # was made, in step order; None: unknown (the exporter asks the run context).
    values_global: bool | None

    def __init__(
        self,
        resource_metrics: Sequence[Any],
        *,
        rows: SharedRows | None = None,
        values_global: bool | None = None,
    ) -> None:
        super().__init__(resource_metrics)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "row", None)  # built on the first export thread that asks
        object.__setattr__(self, "values_global", values_global)
        if rows is not None:
            rows.register(self)

    @classmethod
    def of_row(cls, row: MetricRow, rows: SharedRows) -> StepBatch:
        """A batch holding only its already built row (no OTel data): for exporters that
        read nothing else (`ReadsOnlySharedRows`)."""
        batch = cls([])  # values_global: None (rows carry no scope label)
        object.__setattr__(batch, "rows", rows)
        object.__setattr__(batch, "row", row)
        return batch


class SharedRows:
    """One `RowBuilder` for every exporter using `namer`: each batch's row is built once, on
    whichever export thread asks first, and batches are built in the order they were made
    (histogram intervals are differences of consecutive exports)."""

    def __init__(self, namer: KeyNamer, *, max_unbuilt: int) -> None:
        self.namer = namer
        self._builder = RowBuilder(namer)
        self._lock = threading.Lock()
        self._unbuilt: deque[StepBatch] = deque()
        self._max_unbuilt = max_unbuilt

    def register(self, batch: StepBatch) -> None:
        with self._lock:
            self._unbuilt.append(batch)
            if len(self._unbuilt) > self._max_unbuilt:
                self._unbuilt.popleft()  # every queue dropped it already (it is older than all)

    def row_of(self, batch: StepBatch) -> MetricRow:
        with self._lock:
            if batch.row is None:
                while self._unbuilt:
                    older = self._unbuilt.popleft()
                    object.__setattr__(older, "row", self._builder.build(older))
                    if older is batch:
                        break
            if batch.row is None:  # left out of the sequence: build it on its own
                object.__setattr__(batch, "row", self._builder.build(batch))
            assert batch.row is not None
            return batch.row


class SharedRowConsumer:
    """Base for exporters that read nothing of a step-sampled batch but its row (JSON lines,
    W&B): the reader builds each batch's row once for all of them (`shares_rows`), and may
    queue the row alone (`ReadsOnlySharedRows`). Subclasses keep their `RowBuilder` in
    `_rows`, bound to the run's namer by `setup()`."""

    shares_rows = True
    _rows: RowBuilder

    def reads_only_shared_rows(self, namer: KeyNamer) -> bool:
        return self._rows.namer is namer  # the rows `shared_row` would take for us


def shared_row(metrics_data: MetricsData, builder: RowBuilder) -> MetricRow:
    """The row of `metrics_data`: the shared one when it is a `StepBatch` whose rows use
    `builder`'s namer, else `builder`'s own. Treat it as read-only: other exporters see it."""
    if isinstance(metrics_data, StepBatch):
        rows = metrics_data.rows
        if rows is not None and rows.namer is builder.namer:
            return rows.row_of(metrics_data)
    return builder.build(metrics_data)
