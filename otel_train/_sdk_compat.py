"""Every use of an opentelemetry-sdk private attribute, in one place, checked against the SDK.

The SDK keeps some facts we need behind underscores (an instrument's bucket advisory). Each
accessor below fails loudly in tests (tests/unit/test_sdk_compat.py) when an SDK release
moves it, instead of silently changing what we export.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.view import (
    Aggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)


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
