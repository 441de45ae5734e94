"""Interval statistics of OTel base-2 exponential histograms: mean and percentiles.

A cumulative export holds the run so far; the interval is its difference from the previous
export, taken at the coarser of the two scales (the SDK only ever lowers a histogram's scale,
merging 2^k neighbouring buckets). Bucket i holds values in (base^i, base^(i+1)] with
base = 2^(2^-scale) (OTel data model, "ExponentialHistogram"); a percentile interpolates
linearly inside its bucket and is clamped to the recorded min / max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Buckets = dict[int, float]


@dataclass(slots=True)
class _State:
    count: float
    total: float
    zero: float
    scale: int
    positive: Buckets
    negative: Buckets


@dataclass(slots=True)
class ExponentialInterval:
    count: float
    mean: float
    state: _State
    low: float
    high: float

    def quantile(self, q: float) -> float:
        base = 2.0 ** (2.0**-self.state.scale)
        ordered: list[tuple[float, float, float]] = []  # (lower, upper, count), ascending
        for index in sorted(self.state.negative, reverse=True):
            ordered.append((-(base ** (index + 1)), -(base**index), self.state.negative[index]))
        if self.state.zero > 0:
            ordered.append((0.0, 0.0, self.state.zero))
        for index in sorted(self.state.positive):
            ordered.append((base**index, base ** (index + 1), self.state.positive[index]))
        rank = q * self.count
        cumulative = 0.0
        estimate = self.high
        for lower, upper, count in ordered:
            if count <= 0:
                continue
            if cumulative + count >= rank:
                estimate = lower + (upper - lower) * ((rank - cumulative) / count)
                break
            cumulative += count
        return min(max(estimate, self.low), self.high)


def _state(point: Any) -> _State:
    def buckets(side: Any) -> Buckets:
        offset = side.offset
        return {offset + i: float(c) for i, c in enumerate(side.bucket_counts) if c}

    return _State(
        count=float(point.count),
        total=float(point.sum),
        zero=float(point.zero_count),
        scale=int(point.scale),
        positive=buckets(point.positive),
        negative=buckets(point.negative),
    )


def _downscale(buckets: Buckets, shift: int) -> Buckets:
    if shift <= 0:
        return buckets
    merged: Buckets = {}
    for index, count in buckets.items():
        merged[index >> shift] = merged.get(index >> shift, 0.0) + count
    return merged


def _minus(now: Buckets, before: Buckets) -> Buckets:
    return {i: c - before.get(i, 0.0) for i, c in now.items() if c - before.get(i, 0.0) > 0}


class ExponentialIntervals:
    """Remembers each series' previous cumulative state to turn exports into intervals."""

    def __init__(self) -> None:
        self._previous: dict[str, _State] = {}

    def interval(
        self, identity: str, point: Any, *, cumulative: bool
    ) -> ExponentialInterval | None:
        current = _state(point)
        previous = self._previous.get(identity) if cumulative else None
        if cumulative:
            self._previous[identity] = current
        if previous is not None and previous.count <= current.count:
            scale = min(previous.scale, current.scale)
            current = _State(
                count=current.count - previous.count,
                total=current.total - previous.total,
                zero=current.zero - previous.zero,
                scale=scale,
                positive=_minus(
                    _downscale(current.positive, current.scale - scale),
                    _downscale(previous.positive, previous.scale - scale),
                ),
                negative=_minus(
                    _downscale(current.negative, current.scale - scale),
                    _downscale(previous.negative, previous.scale - scale),
                ),
            )
        if current.count <= 0:
            return None
        low = point.min if point.min is not None else -float("inf")
        high = point.max if point.max is not None else float("inf")
        return ExponentialInterval(
            count=current.count,
            mean=current.total / current.count,
            state=current,
            low=low,
            high=high,
        )
