"""An export only remembers the newest values (shaping waits for a scrape): a scrape after any
sequence of batches shows exactly what shaping and merging every batch at export time showed,
and what is kept stays bounded by the series seen, however many batches come unscraped."""

from __future__ import annotations

import gc
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.exporter.prometheus")

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.exposition import generate_latest

from exporters._prometheus_data import classic
from exporters.prometheus import PrometheusExporter, _Families, _PrometheusTranslator
from otel_train.nonfinite import series_key
from otel_train.reduction import with_scope
from otel_train.run_context import RunContext

RESOURCE = Resource({"run": "lazy", "stage": "train", "rank": 0, "host.name": "h"})
OURS = InstrumentationScope("otel_train", "1.0")
USER = InstrumentationScope("user.code")
LABELS = frozenset(("run", "stage", "rank"))


class EagerReference:
    """The exporter as it was: every export shapes each metric (scope labels, classic buckets)
    and merges gauge series over the previous ones; a scrape renders the result."""

    def __init__(self, *, global_values: bool) -> None:
        self.global_values = global_values
        self.latest: dict[tuple[str, str], tuple[InstrumentationScope, Metric]] = {}
        self.resource: Resource | None = None

    def export(self, metrics_data: MetricsData) -> None:
        metrics_data = with_scope(metrics_data, global_values=self.global_values)
        for resource_metrics in metrics_data.resource_metrics:
            self.resource = resource_metrics.resource
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    key = (scope_metrics.scope.name, metric.name)
                    previous = self.latest.get(key)
                    shaped = _merged(previous[1] if previous else None, classic(metric))
                    self.latest[key] = (scope_metrics.scope, shaped)

    def render(self) -> str:
        by_scope: dict[str, tuple[InstrumentationScope, list[Metric]]] = {}
        for scope, metric in self.latest.values():
            by_scope.setdefault(scope.name, (scope, []))[1].append(metric)
        scopes = [ScopeMetrics(scope, metrics, "") for scope, metrics in by_scope.values()]
        assert self.resource is not None
        translator = _PrometheusTranslator(
            scope_info_enabled=False, resource_attribute_filter=LABELS.__contains__
        )
        translator.add_metrics_data(MetricsData([ResourceMetrics(self.resource, scopes, "")]))
        return generate_latest(_Families(translator.collect())).decode()  # type: ignore[arg-type]


def _merged(previous: Metric | None, metric: Metric) -> Metric:
    if previous is None or not isinstance(metric.data, Gauge):
        return metric
    if not isinstance(previous.data, Gauge):
        return metric
    fresh = {series_key(metric.name, p.attributes) for p in metric.data.data_points}
    kept = [
        p for p in previous.data.data_points if series_key(metric.name, p.attributes) not in fresh
    ]
    points = [*kept, *metric.data.data_points]
    return Metric(metric.name, metric.description, metric.unit, Gauge(points))


def _point(value: float, attributes: dict[str, Any], time: int) -> NumberDataPoint:
    return NumberDataPoint(
        attributes=attributes, start_time_unix_nano=0, time_unix_nano=time, value=value
    )


def _histogram(step: int, time: int) -> Metric:
    """A cumulative exponential histogram whose buckets and scale change as values come."""
    counts = [1 + step // 3, step % 4, 2 * step]
    point = ExponentialHistogramDataPoint(
        attributes={}, start_time_unix_nano=0, time_unix_nano=time, count=sum(counts) + step,
        sum=0.5 * step, scale=max(0, 3 - step // 15), zero_count=step, positive=Buckets(step % 5, counts),
        negative=Buckets(0, []), flags=0, min=0.0, max=8.0,
    )  # fmt: skip
    data = ExponentialHistogram([point], AggregationTemporality.CUMULATIVE)
    return Metric("train.latency", "Step latency", "s", data)


def _batch(step: int, rng: random.Random) -> MetricsData:
    """One export: the series set of its step only, like the step-sampled reader sends."""
    time = step * 1_000
    gpus = rng.sample(range(6), rng.randint(1, 4))  # a changing, reordered series set
    gpu = [_point(step + g / 10, {"gpu": g}, time) for g in gpus]
    on = range(4) if step % 9 else range(2)  # mostly the same series as the last batch
    memory = [_point(step * g, {"gpu": g}, time) for g in on]
    if step % 7 == 1:  # two points of one series in one batch: 1 and "1" print alike
        gpu.append(_point(-1.0, {"gpu": str(gpus[0])}, time))
    phases = rng.sample(["warmup", "main", "cool"], rng.randint(1, 2))
    loss = [_point(1 / step, {"phase": p}, time) for p in phases]  # a reduced instrument
    if step % 5 == 0:  # its own `scope` attribute is overwritten by the label
        loss.append(_point(2.0, {"phase": phases[0], "scope": "mine"}, time))
    ours = [
        Metric("gpu.utilization", "Busy", "%", Gauge(gpu)),
        Metric("gpu.memory", "Used", "By", Gauge(memory)),
        # Equal attributes, two series: 1 == 1.0, but the labels read "1" and "1.0".
        Metric("gpu.clock", "Clock", "Hz", Gauge([_point(step, {"gpu": 1 if step % 2 else 1.0}, time)])),
        Metric("train.loss", "Loss", "1", Gauge(loss)),
        Metric("train.tokens", "Tokens", "{token}", Sum(
            [_point(10.0 * step, {}, time)], AggregationTemporality.CUMULATIVE, True)),
        Metric("train.global_step", "Step", "{step}", Gauge([_point(step, {}, time)])),
    ]  # fmt: skip
    if step % 3 == 0:  # a group due every 3rd step only
        ours.append(_histogram(step, time))
    shape: Gauge | Sum = Gauge([_point(step, {"k": step % 3}, time)])
    if step % 4 == 0:  # an instrument whose kind changes: a sum replaces the kept gauge
        shape = Sum([_point(step, {}, time)], AggregationTemporality.CUMULATIVE, False)
    user = [Metric("train.loss", "Theirs", "1", Gauge([_point(step, {"w": step % 3}, time)]))]
    user.append(Metric("user.shape", "Shape", "1", shape))
    scopes = [ScopeMetrics(OURS, ours, ""), ScopeMetrics(USER, user, "")]
    if step % 6 == 0:  # no user metrics in this batch
        scopes = scopes[:1]
    return MetricsData([ResourceMetrics(RESOURCE, scopes, "")])


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def exporter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrometheusExporter]:
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=0)
    exporter.bind_run_context(
        RunContext(
            run="lazy", stage="train", rank=0, local_rank=0, world_size=2, host="h",
            output_dir=tmp_path, exports_global_values=request.param,
        )
    )  # fmt: skip
    yield exporter
    exporter.shutdown()


@pytest.mark.parametrize("exporter", [True, False], indirect=True, ids=["global", "rank"])
def test_a_scrape_after_any_batches_shows_what_eager_shaping_showed(
    exporter: PrometheusExporter,
) -> None:
    reference = EagerReference(global_values=exporter._context.values_are_global())
    rng = random.Random(12)
    assert exporter.url is not None
    compared = 0
    for step in range(1, 61):
        batch = _batch(step, rng)
        exporter.export(batch)
        reference.export(batch)
        # Scrapes see some versions, not all; among them a duplicate series (every 7th) and
        # a gauge replacing a sum (after every 4th step).
        if rng.random() < 0.2 or step % 7 == 1 or step % 8 == 5 or step == 60:
            assert _scrape(exporter.url) == reference.render(), f"after step {step}"
            compared += 1
    text = _scrape(exporter.url)
    assert exporter.renders == compared  # once per version that a scrape saw
    scope = "global" if exporter._context.values_are_global() else "rank"
    # What makes the comparison meaningful: all series seen, buckets, scope labels.
    assert all(f'gpu_utilization_percent{{gpu="{g}"' in text for g in range(6))  # each kept
    assert text.count("train_latency_seconds_bucket{") > 3 and "train_latency_seconds_sum" in text
    assert f'train_loss{{phase="cool",rank="0",run="lazy",scope="{scope}"' in text
    assert 'scope="mine"' not in text
    assert 'gpu_clock_hertz{gpu="1"' in text and 'gpu_clock_hertz{gpu="1.0"' in text
    assert all(f'user_shape{{k="{k}"' in text for k in range(3))  # a gauge again


def _retained_bytes(root: object) -> int:
    """Bytes reachable from `root` (types and modules excluded): what the exporter keeps."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type) or type(item).__name__ == "module":
            continue
        seen.add(id(item))
        total += item.__sizeof__()
        stack.extend(gc.get_referents(item))
    return total


def test_what_an_unscraped_exporter_keeps_does_not_grow_with_the_batch_count() -> None:
    exporter = PrometheusExporter(port=0)  # never started: nobody scrapes
    rng = random.Random(3)
    cycle = [_batch(step, rng) for step in range(1, 85)]  # every series set and shape once
    for batch in cycle:
        exporter.export(batch)
    after_one = (_retained_bytes(exporter._latest), exporter._latest.retained_points())
    for _ in range(40):
        for batch in cycle:
            exporter.export(batch)
    after_many = (_retained_bytes(exporter._latest), exporter._latest.retained_points())
    assert after_many[1] == after_one[1]
    assert after_many[0] <= after_one[0] + 1024, (after_one, after_many)
    assert exporter.renders == 0  # nothing was shaped or rendered for nobody
