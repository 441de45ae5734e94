"""Our own aggregation for staged values: cumulative sums, last values, explicit-bucket
histograms, turned into OTel `Metric`s for the due groups without the SDK's collect.

A profile of sampled steps put ~85% of their cost in the SDK's synchronous instruments and its
collect (measurement consumers, view matching, attribute hashing, exemplar reservoirs), none of
which a step-sampled export needs: the values arrive once per sampled step, already resolved.
A `Stream` has the SDK instruments' verbs (`add`, `set`, `record`) and the SDK's cumulative
semantics (a counter sums forever, a gauge keeps its last value, a histogram its buckets), so
the points it builds are what the SDK would have collected. Non-finite gauge values are kept
as they are (the SDK drops them): a diverging loss reads NaN, never its last good value.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry.sdk.metrics import Counter as SdkCounter
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import UpDownCounter as SdkUpDownCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_train._sdk_compat import (
    add_to_collect,
    gauge_metric,
    number_point,
    sum_metric,
    temporality_of,
)
from otel_train.signals import signals_deferred

AttributeKey = tuple[tuple[str, Any], ...] | None
CUMULATIVE = AggregationTemporality.CUMULATIVE
DELTA = AggregationTemporality.DELTA


def attribute_key(attributes: Mapping[str, Any] | None) -> AttributeKey:
    if not attributes:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attributes.items()))


class Stream:
    """One instrument's exported state, by attribute set. Written on the training thread at
    sampled steps; read (under the registry lock) by collects of other readers."""

    kind = ""

    def __init__(self, name: str, unit: str, description: str, scope: InstrumentationScope) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.scope = scope
        # key -> [attributes, start_time_unix_nano, state...]
        self.series: dict[AttributeKey, list[Any]] = {}

    def _series(self, attributes: Mapping[str, Any] | None, *state: Any) -> list[Any]:
        key = attribute_key(attributes) if attributes else None
        entry = self.series.get(key)
        if entry is None:
            entry = [dict(attributes) if attributes else {}, time_ns(), *state]
            self.series[key] = entry
        return entry

    def metric(self, now: int, memory: dict[Any, Any] | None = None) -> Metric | None:
        """The cumulative point of every series (`memory`: a delta reader's last values)."""
        raise NotImplementedError


class SumStream(Stream):
    """Counter / up-down counter: the sum since the start, like the SDK's cumulative sum."""

    kind = "sum"

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        scope: InstrumentationScope,
        *,
        monotonic: bool,
    ) -> None:
        super().__init__(name, unit, description, scope)
        self.monotonic = monotonic

    def add(self, amount: Any, attributes: Mapping[str, Any] | None = None) -> None:
        entry = self.series.get(None) if not attributes else None
        if entry is None:
            entry = self._series(attributes, 0)
        entry[2] = entry[2] + amount

    def metric(self, now: int, memory: dict[Any, Any] | None = None) -> Metric | None:
        if not self.series:
            return None
        if memory is None:
            points = [
                number_point(attributes, start, now, total)
                for attributes, start, total in self.series.values()
            ]
            temporality = CUMULATIVE
        else:  # delta, for another reader: what was added since its last collect
            points = []
            for key, (attributes, start, total) in self.series.items():
                previous = memory.get((self.name, key))
                memory[(self.name, key)] = (total, now)
                value = total if previous is None else total - previous[0]
                if previous is not None:
                    start = previous[1]
                if previous is None or value:
                    points.append(number_point(attributes, start, now, value))
            if not points:
                return None
            temporality = DELTA
        return sum_metric(
            self.name, self.description, self.unit, points, temporality, self.monotonic
        )


class GaugeStream(Stream):
    """Last value per series. NaN and inf are kept, not dropped. A step-sampled export shows
    only the series set since the previous one (never a stale value: absent instead); any
    other reader gets every series' last value, as the SDK's synchronous gauge gives it."""

    kind = "gauge"

    def set(self, value: Any, attributes: Mapping[str, Any] | None = None) -> None:
        entry = self.series.get(None) if not attributes else None
        if entry is None:
            entry = self._series(attributes, value, True)
        entry[2] = value
        entry[3] = True  # set since the last step-sampled export

    def metric(
        self, now: int, memory: dict[Any, Any] | None = None, *, fresh_only: bool = False
    ) -> Metric | None:
        if not self.series:
            return None
        if fresh_only:
            points = []
            for entry in self.series.values():
                if entry[3]:
                    entry[3] = False
                    points.append(number_point(entry[0], None, now, entry[2]))
            if not points:
                return None
        else:
            points = [
                number_point(attributes, None, now, value)
                for attributes, _start, value, _fresh in self.series.values()
            ]
        return gauge_metric(self.name, self.description, self.unit, points)


class HistogramStream(Stream):
    """Explicit buckets, cumulative counts, sum, min and max (the SDK's rule: a value on a
    boundary falls in the bucket that boundary closes, `bisect_left`)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        scope: InstrumentationScope,
        *,
        boundaries: Sequence[float],
    ) -> None:
        super().__init__(name, unit, description, scope)
        self.boundaries = tuple(float(b) for b in boundaries)
        # Per delta reader: the min and max since its last collect, by series.
        self._interval_extremes: list[dict[AttributeKey, list[float]]] = []

    def record(self, value: float, attributes: Mapping[str, Any] | None = None) -> None:
        entry = self.series.get(None) if not attributes else None
        if entry is None:
            entry = self._series(
                attributes, [0] * (len(self.boundaries) + 1), 0, math.inf, -math.inf
            )
        entry[2][bisect_left(self.boundaries, value)] += 1
        entry[3] = entry[3] + value
        if value < entry[4]:
            entry[4] = value
        if value > entry[5]:
            entry[5] = value
        if self._interval_extremes:
            key = attribute_key(attributes) if attributes else None
            for extremes in self._interval_extremes:
                low_high = extremes.setdefault(key, [math.inf, -math.inf])
                low_high[0], low_high[1] = min(low_high[0], value), max(low_high[1], value)

    def record_many(self, values: Sequence[float]) -> None:
        """`record` of each value, attribute-less (the step times of an interval)."""
        if not values:
            return
        if self._interval_extremes:
            for value in values:
                self.record(value)
            return
        entry = self.series.get(None)
        if entry is None:
            entry = self._series(None, [0] * (len(self.boundaries) + 1), 0, math.inf, -math.inf)
        counts, bounds, total = entry[2], self.boundaries, entry[3]
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value  # in order, as `record` (and the SDK) adds them
        entry[3] = total
        entry[4] = min(entry[4], min(values))
        entry[5] = max(entry[5], max(values))

    def metric(self, now: int, memory: dict[Any, Any] | None = None) -> Metric | None:
        if not self.series:
            return None
        bounds = self.boundaries
        if memory is None:
            points = [
                HistogramDataPoint(
                    attributes, start, now, sum(counts), total, tuple(counts), bounds, low, high
                )
                for attributes, start, counts, total, low, high in self.series.values()
            ]
            return Metric(self.name, self.description, self.unit, Histogram(points, CUMULATIVE))
        # Delta for another reader: the difference to what it collected last, with the min
        # and max of that interval (tracked per delta reader from its first collect on).
        extremes = memory.get((self.name, "extremes"))
        if extremes is None:
            extremes = memory[(self.name, "extremes")] = {}
            self._interval_extremes.append(extremes)
        points = []
        for key, (attributes, start, counts, total, low, high) in self.series.items():
            previous = memory.get((self.name, key))
            memory[(self.name, key)] = (tuple(counts), total, now)
            interval = tuple(counts)
            if previous is not None:
                interval = tuple(a - b for a, b in zip(counts, previous[0], strict=True))
                total, start = total - previous[1], previous[2]
                low, high = extremes.pop(key, (math.inf, -math.inf))
            if sum(interval):
                points.append(
                    HistogramDataPoint(
                        attributes, start, now, sum(interval), total, interval, bounds, low, high
                    )
                )
        if not points:
            return None
        return Metric(self.name, self.description, self.unit, Histogram(points, DELTA))


class StreamSet:
    """Every stream of one Telemetry, by sampling group, and the lock that guards their state
    between the training thread (sampled steps) and other readers' collects."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        # Reentrant: the finisher thread creates a derived gauge (a rate, perplexity) on its
        # first use while it holds the lock; the training thread creates streams too.
        self.lock = threading.RLock()
        self.by_group: dict[str, list[Stream]] = {}
        self.always: list[Stream] = []  # in every batch: the global step, the x-axis

    def add(self, group: str, stream: Stream, *, always: bool = False) -> None:
        # The training thread, outside any sampled step: a signal's flush needs this lock.
        with signals_deferred(), self.lock:
            (self.always if always else self.by_group.setdefault(group, [])).append(stream)

    def metrics_for(
        self, groups: Iterable[str], now: int
    ) -> dict[InstrumentationScope, list[Metric]]:
        """The due groups' metrics, by scope. Caller holds `lock`."""
        by_scope: dict[InstrumentationScope, list[Metric]] = {}
        scope: Any = None
        kept: list[Metric] = []
        for streams in (*(self.by_group.get(group, ()) for group in groups), self.always):
            for stream in streams:
                if type(stream) is GaugeStream:
                    metric = stream.metric(now, fresh_only=True)
                else:
                    metric = stream.metric(now)
                if metric is None:
                    continue
                if stream.scope is not scope:  # nearly always one scope: hash it rarely
                    scope = stream.scope
                    kept = by_scope.setdefault(scope, [])
                kept.append(metric)
        return by_scope

    def all_streams(self) -> list[Stream]:
        return [s for streams in self.by_group.values() for s in streams] + self.always

    def snapshot(
        self, wants_delta: Callable[[Stream], bool], memory: dict[Any, Any]
    ) -> dict[InstrumentationScope, list[Metric]]:
        """Every stream's metric for another reader, in the temporality it asked for."""
        now = time_ns()
        by_scope: dict[InstrumentationScope, list[Metric]] = {}
        with self.lock:
            for stream in self.all_streams():
                metric = stream.metric(now, memory if wants_delta(stream) else None)
                if metric is not None:
                    by_scope.setdefault(stream.scope, []).append(metric)
        return by_scope


def feed_reader(reader: MetricReader, streams: StreamSet) -> None:
    """A reader we do not drive (a pull endpoint, a periodic OTLP reader, a user's) gets the
    streams in each of its collects, beside what the SDK itself holds, in its temporality."""
    preferences = temporality_of(reader)

    def preferred(kind: type) -> Any:
        return next((t for cls, t in preferences.items() if issubclass(cls, kind)), CUMULATIVE)

    delta_counter = preferred(SdkCounter) == DELTA
    delta_up_down = preferred(SdkUpDownCounter) == DELTA
    delta_histogram = preferred(SdkHistogram) == DELTA

    def wants_delta(stream: Stream) -> bool:
        if isinstance(stream, SumStream):
            return delta_counter if stream.monotonic else delta_up_down
        return delta_histogram and isinstance(stream, HistogramStream)

    memory: dict[Any, Any] = {}

    def with_streams(_reader: MetricReader, collected: MetricsData | None) -> MetricsData | None:
        return merged(streams.resource, collected, streams.snapshot(wants_delta, memory))

    add_to_collect(reader, with_streams)


def merged(
    resource: Resource,
    base: MetricsData | None,
    extra: Mapping[InstrumentationScope, Sequence[Metric]],
) -> MetricsData | None:
    """`base` (what the SDK collected) with `extra` metrics added under their scopes."""
    if not extra:
        return base
    scopes: dict[InstrumentationScope, list[Metric]] = {}
    if base is not None:
        for resource_metrics in base.resource_metrics:
            resource = resource_metrics.resource
            for scope_metrics in resource_metrics.scope_metrics:
                scopes.setdefault(scope_metrics.scope, []).extend(scope_metrics.metrics)
    for scope, metrics in extra.items():
        scopes.setdefault(scope, []).extend(metrics)
    return metrics_data(resource, scopes)


def metrics_data(
    resource: Resource, scopes: Mapping[InstrumentationScope, Sequence[Metric]]
) -> MetricsData:
    return MetricsData(
        [
            ResourceMetrics(
                resource,
                [
                    ScopeMetrics(scope, list(metrics), scope.schema_url or "")
                    for scope, metrics in scopes.items()
                ],
                resource.schema_url,
            )
        ]
    )
