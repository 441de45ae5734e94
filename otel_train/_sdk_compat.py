"""Every use of a third-party private attribute, in one place, checked against the package.

The OTel SDK, its Prometheus exporter, the system-metrics instrumentation and wandb keep some
things we need behind underscores. Each accessor below is exercised by
tests/unit/test_sdk_compat.py, which fails loudly, naming the attribute and the version it was
checked on (`CHECKED_ON`), when a release moves it, instead of silently changing what we do.
Third-party packages other than the SDK are imported lazily, where the accessor is called.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.metrics.view import (
    Aggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

# The releases each accessor below was written against (what DESIGN.md's facts were checked on).
CHECKED_ON: Mapping[str, str] = {
    "opentelemetry-sdk": "1.45.2",
    "opentelemetry-exporter-prometheus": "0.66b2",
    "opentelemetry-instrumentation-system-metrics": "0.66b2",
    "wandb": "0.31.0",
}
# PeriodicExportingMetricReader internals a subclass relies on to start no thread in a
# forked child: the hook the SDK registers with os.register_at_fork, and what it restarts.
PERIODIC_READER_FORK_HOOK = "_at_fork_reinit"


def explicit_buckets_of(instrument: Any) -> Any:
    """The `explicit_bucket_boundaries_advisory` a histogram was created with, or None."""
    advisory = getattr(
        instrument, "_advisory", None
    )  # SDK private (1.45: _MetricsHistogramAdvisory)
    return getattr(advisory, "explicit_bucket_boundaries", None)


class _ExponentialUnlessBucketsGiven(Aggregation):
    """Base-2 exponential histogram, unless the instrument was created with explicit buckets
    (then the SDK's explicit-bucket aggregation, which reads that advisory)."""

    def __init__(self) -> None:
        self._exponential = ExponentialBucketHistogramAggregation()
        self._explicit = ExplicitBucketHistogramAggregation()

    def _create_aggregation(
        self,
        instrument: Any,
        attributes: Any,
        reservoir_factory: Any,
        start_time_unix_nano: int,
    ) -> Any:
        chosen = self._explicit if explicit_buckets_of(instrument) else self._exponential
        return chosen._create_aggregation(
            instrument, attributes, reservoir_factory, start_time_unix_nano
        )


def exponential_unless_buckets_given() -> Aggregation:
    return _ExponentialUnlessBucketsGiven()


def scope_of(meter: Any) -> InstrumentationScope:
    """The scope an SDK meter stamps on its metrics (1.45: `_instrumentation_scope`)."""
    scope = getattr(meter, "_instrumentation_scope", None)
    if isinstance(scope, InstrumentationScope):
        return scope
    return InstrumentationScope(getattr(meter, "name", None) or "otel_train")


def resource_of(provider: Any) -> Any:
    """The resource a MeterProvider puts on its metrics (1.45: `_sdk_config.resource`)."""
    return provider._sdk_config.resource


def temporality_of(reader: MetricReader) -> dict[type, Any]:
    """The temporality a reader asked for, by SDK instrument class (1.45: private dict)."""
    return dict(reader._instrument_class_temporality)  # type: ignore[arg-type]


def add_to_collect(
    reader: MetricReader, extra: Callable[[MetricReader, MetricsData | None], MetricsData | None]
) -> None:
    """Make every collect of `reader` return what the SDK collected, passed through `extra`.

    The MeterProvider hands each reader its collect function (`_set_collect_callback`,
    stored as `_collect`); wrapping it is how values that never went through the SDK's
    instruments reach a reader we do not drive (a pull endpoint, a periodic OTLP reader).
    """
    original: Any = reader._collect
    if original is None:
        raise RuntimeError("add_to_collect: the reader is not registered on a MeterProvider yet")

    def collect(the_reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        return extra(the_reader, original(the_reader, timeout_millis=timeout_millis))

    reader._collect = collect  # type: ignore[assignment]


def sdk_instrument_names(provider: Any) -> list[str]:
    """Names of every instrument created on an SDK MeterProvider, by any code (1.45:
    `_meters` -> `_instrument_id_instrument`). Cheap: a few dicts."""
    names: list[str] = []
    for meter in list(provider._meters.values()):
        names.extend(
            instrument.name for instrument in list(meter._instrument_id_instrument.values())
        )
    return names


def sdk_instrument_count(provider: Any) -> int:
    """How many instruments an SDK MeterProvider holds (cheap: a few `len`s)."""
    return sum(len(meter._instrument_id_instrument) for meter in list(provider._meters.values()))


def prometheus_translator_class() -> Any:
    """The OTel Prometheus exporter's translation (names, units, labels, target_info) as a pure
    function: a collector that takes MetricsData and yields prometheus_client families.
    Private in the package (`_CustomCollector`); ImportError when the package is missing."""
    from opentelemetry.exporter.prometheus import _CustomCollector

    return _CustomCollector


def stop_periodic_reader_thread(reader: Any) -> None:
    """In a forked child, from the reader's PERIODIC_READER_FORK_HOOK: start no export thread
    (the SDK's hook would restart one, re-exporting the parent's values) and export nothing."""
    reader._daemon_thread = None  # SDK private: the thread the fork hook restarts
    reader._shutdown = True  # SDK private: makes collect() and shutdown() no-ops


def system_metrics_known_names(module: Any) -> Mapping[str, Any] | None:
    """The metric names opentelemetry-instrumentation-system-metrics can report (its private
    `_DEFAULT_CONFIG`), or None where a release no longer has it (then names go unchecked)."""
    known = getattr(module, "_DEFAULT_CONFIG", None)
    return known if isinstance(known, Mapping) else None


def wandb_service_process() -> subprocess.Popen[bytes] | None:
    """The wandb-core process this process started, the one wandb's exit hook waits for.

    wandb has no public handle on it; this follows wandb's own objects (0.2x-0.31:
    `wandb_setup._singleton._connection._proc._process`) and gives None where they differ.
    A service shared from a parent process (WANDB_SERVICE) is not ours and is not found.
    """
    # Never import wandb here: not imported means no service, and an import racing the one
    # on our init thread could fail half-way.
    wandb_setup = sys.modules.get("wandb.sdk.wandb_setup")
    connection = getattr(getattr(wandb_setup, "_singleton", None), "_connection", None)
    process = getattr(getattr(connection, "_proc", None), "_process", None)
    return process if isinstance(process, subprocess.Popen) else None


# -- building the SDK's frozen data classes without their generated __init__ ---------------
# The SDK's point classes are frozen (non-slots) dataclasses: their __init__ sets each field
# through object.__setattr__, twice the cost of filling the instance dict directly. A sampled
# step builds a few dozen of them. Same instances (equal, same fields), checked by
# tests/unit/test_sdk_compat.py against the real constructors.
def number_point(attributes: Any, start: int | None, now: int, value: float) -> NumberDataPoint:
    """`NumberDataPoint(attributes, start, now, value)`."""
    instance = object.__new__(NumberDataPoint)
    instance.__dict__.update(
        attributes=attributes,
        start_time_unix_nano=start,
        time_unix_nano=now,
        value=value,
        exemplars=[],
    )
    return instance  # type: ignore[no-any-return]


def gauge_metric(name: str, description: str, unit: str, points: list[Any]) -> Metric:
    """`Metric(name, description, unit, Gauge(points))`."""
    gauge = object.__new__(Gauge)
    gauge.__dict__["data_points"] = points
    metric = object.__new__(Metric)
    metric.__dict__.update(name=name, description=description, unit=unit, data=gauge)
    return metric  # type: ignore[no-any-return]


def sum_metric(
    name: str, description: str, unit: str, points: list[Any], temporality: Any, monotonic: bool
) -> Metric:
    """`Metric(name, description, unit, Sum(points, temporality, monotonic))`."""
    data = object.__new__(Sum)
    data.__dict__.update(
        data_points=points, aggregation_temporality=temporality, is_monotonic=monotonic
    )
    metric = object.__new__(Metric)
    metric.__dict__.update(name=name, description=description, unit=unit, data=data)
    return metric  # type: ignore[no-any-return]


def fast_construction_matches() -> bool:
    """Whether the builders above still make what the constructors make (dataclass layout)."""
    import dataclasses

    expected = {
        NumberDataPoint: ("attributes", "start_time_unix_nano", "time_unix_nano", "value",
                          "exemplars"),
        Metric: ("name", "description", "unit", "data"),
        Gauge: ("data_points",),
        Sum: ("data_points", "aggregation_temporality", "is_monotonic"),
    }  # fmt: skip
    for cls, fields in expected.items():
        if hasattr(cls, "__slots__") or not dataclasses.is_dataclass(cls):
            return False
        if tuple(f.name for f in dataclasses.fields(cls)) != fields:
            return False
    return True


def _number_point_constructed(
    attributes: Any, start: int | None, now: int, value: float
) -> NumberDataPoint:
    return NumberDataPoint(attributes, start, now, value)  # type: ignore[arg-type]


def _gauge_metric_constructed(name: str, description: str, unit: str, points: list[Any]) -> Metric:
    return Metric(name, description, unit, Gauge(points))


def _sum_metric_constructed(
    name: str, description: str, unit: str, points: list[Any], temporality: Any, monotonic: bool
) -> Metric:
    return Metric(name, description, unit, Sum(points, temporality, monotonic))


if not fast_construction_matches():  # a release changed the layout: use the constructors
    number_point = _number_point_constructed  # type: ignore[assignment]
    gauge_metric = _gauge_metric_constructed
    sum_metric = _sum_metric_constructed
