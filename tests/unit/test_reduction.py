"""The packed vector of one all_reduce: means for gauges over the ranks that had them, sums
for counters. The element-wise sum over ranks is what all_reduce(SUM) computes."""

from __future__ import annotations

import math

from otel_train.reduction import Resolved, pack, unpack


def _all_reduce(*ranks: Resolved) -> list[float]:
    return [sum(column) for column in zip(*(pack(r) for r in ranks), strict=True)]


def test_gauges_average_over_ranks_that_recorded_them_and_counters_sum():
    rank0 = Resolved({"train.loss": 1.0, "train.grad_norm": 4.0}, {"train.tokens": 100.0})
    rank1 = Resolved({"train.loss": 3.0}, {"train.tokens": 300.0, "train.samples": 2.0})
    merged = unpack(_all_reduce(rank0, rank1), rank0)
    assert merged.gauges == {"train.loss": 2.0, "train.grad_norm": 4.0}
    assert merged.counter_increments == {"train.tokens": 400.0, "train.samples": 2.0}


def test_a_nan_on_any_rank_makes_the_global_value_nan_not_a_silent_mean():
    rank0 = Resolved({"train.loss": 1.0}, {})
    rank1 = Resolved({"train.loss": math.nan}, {})
    assert math.isnan(unpack(_all_reduce(rank0, rank1), rank0).gauges["train.loss"])


def test_every_rank_packs_the_same_length_whatever_it_recorded():
    assert len(pack(Resolved({}, {}))) == len(pack(Resolved({"train.loss": 1.0}, {"x": 1.0})))
