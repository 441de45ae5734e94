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


# -- what the values are called: scope="global" only when an all_reduce replaced them ---------
class _FinishedReduction:
    """Stands in for an all_reduce in flight (`InFlight`): one process cannot run a real one
    of two ranks. `values()` gives the element-wise sum, or raises as a broken group does."""

    world_size = 2

    def __init__(self, summed: list[float] | None) -> None:
        self._summed = summed

    def values(self) -> list[float]:
        if self._summed is None:
            raise RuntimeError("connection reset by peer")
        return self._summed


def test_the_scope_is_global_only_after_a_reduction_replaced_the_values_and_rank_after_failure():
    from otel_train.reduction import CrossRankReducer
    from otel_train.run_context import ValueScope

    scope = ValueScope()
    reducer = CrossRankReducer(keep_on_this_rank=True, scope=scope, expected_world_size=2)
    summed = _all_reduce(Resolved({"train.loss": 1.0}, {}), Resolved({"train.loss": 3.0}, {}))
    reducer.finish(_FinishedReduction(summed), [])  # type: ignore[arg-type]
    assert scope.global_values and reducer.ranks_in_values == 2
    reducer.finish(_FinishedReduction(None), [])  # type: ignore[arg-type]
    assert not scope.global_values and reducer.ranks_in_values == 1  # MFU: one peak again


def test_reduce_across_ranks_without_torch_distributed_labels_values_rank_and_says_so_once(
    tmp_path, caplog
):
    import urllib.request

    import otel_train
    from exporters.prometheus import PrometheusExporter

    prometheus = PrometheusExporter(port=0, final_scrape_grace_millis=0)
    tel = otel_train.setup(
        run="nodist", output_dir=tmp_path, exporters=[prometheus, "jsonl"],
        intervals={"train": 5}, handle_signals=False, gpu_metrics=False, system_metrics=False,
        reduce_across_ranks=True, ranks=otel_train.RankInfo(rank=0, local_rank=0, world_size=2),
    )  # fmt: skip
    assert tel.context.exports_global_values  # what setup was asked for...
    for step in range(1, 21):
        tel.record(loss=2.0, tokens=100)
        tel.step(step)
    assert tel.flush(5_000)
    assert prometheus.url is not None
    with urllib.request.urlopen(prometheus.url, timeout=5) as response:
        text = response.read().decode()
    tel.shutdown(timeout_millis=2_000)
    # ...but no all_reduce ran: these are rank 0's own values, and say so
    assert 'train_loss{rank="0",run="nodist",scope="rank"' in text
    assert 'scope="global"' not in text
    warnings = [r for r in caplog.records if "torch.distributed is not initialised" in r.message]
    assert len(warnings) == 1 and 'scope="rank"' in warnings[0].getMessage()


def test_otlp_labels_a_batch_as_the_reduction_stood_when_it_was_made(tmp_path):
    """The OTLP thread exports a batch later than the finisher made it; the scope label is
    the one stamped on the batch then, not the live flag, which a later step already moved."""
    from opentelemetry.sdk.metrics.export import (
        Gauge,
        Metric,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    import otel_train
    from exporters.otlp import OtlpExporter
    from otel_train.rows import StepBatch
    from tests.integration.otlp_receiver import OtlpReceiver

    tel = otel_train.setup(
        run="stamp", output_dir=tmp_path, exporters=["jsonl"], handle_signals=False,
        gpu_metrics=False, system_metrics=False, reduce_across_ranks=True,
        ranks=otel_train.RankInfo(rank=0, local_rank=0, world_size=2),
    )  # fmt: skip
    context = tel.context
    tel.shutdown(timeout_millis=2_000)
    assert context.value_scope is not None and not context.values_are_global()

    def batch(values_global):
        point = NumberDataPoint({}, 0, 1, 2.5)
        loss = Metric("train.loss", "", "", Gauge([point]))
        scope = InstrumentationScope("otel_train")
        resource = ResourceMetrics(Resource.create({}), [ScopeMetrics(scope, [loss], "")], "")
        return StepBatch([resource], values_global=values_global)

    with OtlpReceiver() as rx:
        exporter = OtlpExporter(endpoint=rx.endpoint, timeout=5)
        exporter.bind_run_context(context)
        for stamp in (True, None, False):
            exporter.export(batch(stamp))
        assert rx.wait_for(lambda got: len(got) == 3, timeout=10)
        labels = [received.points["train.loss"][0][0]["scope"] for received in rx.snapshot()]
        exporter.shutdown()
    # stamped global; unstamped: the live flag (rank: no all_reduce ran); stamped rank
    assert labels == ["global", "rank", "rank"]
