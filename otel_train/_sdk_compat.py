"""Every use of an opentelemetry-sdk private attribute, in one place, checked against the SDK.

The SDK keeps some facts we need behind underscores (an instrument's bucket advisory). Each
accessor below fails loudly in tests (tests/unit/test_sdk_compat.py) when an SDK release
moves it, instead of silently changing what we export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics.export import MetricReader, MetricsData
from opentelemetry.sdk.metrics.view import (
    Aggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope


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
