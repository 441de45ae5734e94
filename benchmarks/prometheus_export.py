"""Export-thread CPU per batch of the Prometheus exporter: shaping every batch at export time
(before: scope labels, classic buckets and the gauge merge per metric per batch) vs keeping
only the newest values and shaping at the first scrape after them (now). Python work on an
export thread holds the GIL, so it is time taken from the training thread.

Batches are captured once from a real pipeline (every step sampled), then replayed into a
fresh exporter of each kind, interleaved over rounds; the result is the ratio now / before.
Both must serve identical bytes. Usage: python benchmarks/prometheus_export.py [--rounds 7]
[--batches 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)

import otel_train
from exporters._prometheus_data import classic
from exporters.prometheus import PrometheusExporter
from otel_train.nonfinite import series_key
from otel_train.reduction import values_global_of, with_scope
from otel_train.testing import CapturingExporter

NEVER = 10**9


class EagerPrometheusExporter(PrometheusExporter):
    """The export path before: shape and merge every metric of every batch."""

    def __init__(self) -> None:
        super().__init__(port=0)
        self._shaped: dict[tuple[str, str], tuple[Any, Metric]] = {}
        self._resource_seen: Any = None

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        metrics_data = with_scope(
            metrics_data, global_values=values_global_of(metrics_data, self._context)
        )
        with self._lock:
            for resource_metrics in metrics_data.resource_metrics:
                self._resource_seen = resource_metrics.resource
                for scope_metrics in resource_metrics.scope_metrics:
                    scope = scope_metrics.scope
                    for metric in scope_metrics.metrics:
                        key = (scope.name, metric.name)
                        previous = self._shaped.get(key)
                        shaped = _merged(previous[1] if previous else None, classic(metric))
                        self._shaped[key] = (scope, shaped)
            self._version += 1
        return MetricExportResult.SUCCESS

    def rendered(self) -> bytes:
        """The render before: the shaped metrics straight into the translator."""
        from prometheus_client.exposition import generate_latest

        from exporters.prometheus import _Families, _PrometheusTranslator

        by_scope: dict[str, tuple[Any, list[Metric]]] = {}
        for scope, metric in self._shaped.values():
            by_scope.setdefault(scope.name, (scope, []))[1].append(metric)
        scopes = [ScopeMetrics(scope, metrics, "") for scope, metrics in by_scope.values()]
        data = MetricsData([ResourceMetrics(self._resource_seen, scopes, "")])
        collector = _PrometheusTranslator(
            scope_info_enabled=False, resource_attribute_filter=self._resource_labels.__contains__
        )
        collector.add_metrics_data(data)
        return generate_latest(_Families(collector.collect()))  # type: ignore[arg-type]


def _merged(previous: Metric | None, metric: Metric) -> Metric:
    if previous is None or not isinstance(metric.data, Gauge):
        return metric
    if not isinstance(previous.data, Gauge):
        return metric
    name = metric.name
    fresh = {series_key(name, p.attributes) for p in metric.data.data_points}
    kept = [p for p in previous.data.data_points if series_key(name, p.attributes) not in fresh]
    if not kept:
        return metric
    points = [*kept, *metric.data.data_points]
    return Metric(metric.name, metric.description, metric.unit, Gauge(points))


def capture(batches: int, *, extra: bool) -> list[MetricsData]:
    """Every step sampled, the standard set (as benchmarks/hot_path.py's export-thread
    measurement); `extra` adds an exponential histogram and an 8-GPU gauge."""
    with tempfile.TemporaryDirectory() as directory:
        capturing = CapturingExporter()
        tel = otel_train.setup(
            run="prom-export", output_dir=directory, exporters=[capturing],
            intervals={"train": 1, "perf": 1, "gpu": NEVER}, handle_signals=False,
            gpu_metrics=False, system_metrics=False,
        )  # fmt: skip
        latency = tel.meter.create_histogram("train.data_wait", unit="s") if extra else None
        utilization = tel.meter.create_gauge("train.device_busy", unit="%") if extra else None
        for n in range(1, batches + 1):
            tel.training.record(loss=2.5 + 1 / n, learning_rate=3e-4, grad_norm=1.25,
                                tokens=2048, samples=8, epoch=0)  # fmt: skip
            if latency is not None and utilization is not None:
                latency.record(0.001 * (n % 50 + 1))
                for device in range(8):
                    utilization.set(50.0 + (n + device) % 50, {"device": device})
            tel.step(n)
        tel.flush()
        captured = list(capturing.batches)
        tel.shutdown()
    return captured


def replay(exporter: PrometheusExporter, batches: list[MetricsData], warm: int) -> float:
    """Export-thread CPU per batch, after `warm` batches (every series already kept)."""
    for batch in batches[:warm]:
        exporter.export(batch)
    measured = batches[warm:]
    started = time.thread_time()
    for batch in measured:
        exporter.export(batch)
    return (time.thread_time() - started) / len(measured)


def render_cost(exporter: PrometheusExporter, batches: list[MetricsData]) -> tuple[float, bytes]:
    for batch in batches:
        exporter.export(batch)
    started = time.thread_time()
    if isinstance(exporter, EagerPrometheusExporter):
        body = exporter.rendered()
    else:
        body = exporter._body()[1]
    return time.thread_time() - started, body


def measure(batches: list[MetricsData], rounds: int) -> dict[str, float]:
    warm = min(50, len(batches) // 4)
    before: list[float] = []
    now: list[float] = []
    renders: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(rounds):  # interleaved: drift on a shared machine hits both alike
        before.append(replay(EagerPrometheusExporter(), batches, warm))
        now.append(replay(PrometheusExporter(port=0), batches, warm))
        render_before, body_before = render_cost(EagerPrometheusExporter(), batches)
        render_now, body_now = render_cost(PrometheusExporter(port=0), batches)
        if body_before != body_now:
            raise SystemExit("the two exporters serve different bytes: the comparison is void")
        renders["before"].append(render_before)
        renders["now"].append(render_now)
    median_before, median_now = statistics.median(before), statistics.median(now)
    render_before = statistics.median(renders["before"])
    render_now = statistics.median(renders["now"])
    return {
        "metrics_per_batch": sum(
            len(s.metrics) for r in batches[-1].resource_metrics for s in r.scope_metrics
        ),
        "before_us": median_before * 1e6,
        "now_us": median_now * 1e6,
        "ratio_now_over_before": median_now / median_before,
        "render_before_us": render_before * 1e6,
        "render_now_us": render_now * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OTEL_TRAIN_PROMETHEUS_PORT", "0")
    report: dict[str, Any] = {"rounds": args.rounds, "batches": args.batches}
    for name, extra in (("standard", False), ("standard+histogram+8 gpu gauge", True)):
        report[name] = result = measure(capture(args.batches, extra=extra), args.rounds)
        print(f"{name} ({result['metrics_per_batch']} metrics per batch): export CPU per batch "
              f"before {result['before_us']:.1f} us, now {result['now_us']:.1f} us, now / "
              f"before {result['ratio_now_over_before']:.3f}; one render (per scrape after an "
              f"export) before {result['render_before_us']:.0f} us, now "
              f"{result['render_now_us']:.0f} us")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
