"""Every dashboard query names metrics that exist on both ways into Prometheus: a rank's own
endpoint (the OTel Python exporter's names, read from a real scrape) and OTLP through the
OpenTelemetry Collector (its naming rules, ported in tests/collector_naming.py)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

import otel_train
from otel_train.gpu import register_gpu_metrics
from otel_train.testing import CapturingExporter
from tests.collector_naming import collector_metric_name, collector_series_names
from tests.fakes.fake_pynvml import FakeDevice, FakeNvml

pytest.importorskip("opentelemetry.exporter.prometheus")

from exporters.prometheus import PrometheusExporter

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards/grafana/dashboards/otel-train.json"
# A metric selector in PromQL: a name followed by its label matchers.
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


def _both_paths(tmp_path: Path) -> tuple[set[str], set[str], dict[str, tuple[str, str]]]:
    """(names a scrape of our endpoint shows, names the collector would store, instrument
    name -> (unit, OTLP kind)) for a run that exports every standard group."""
    exporter = PrometheusExporter(port=0, final_scrape_grace_millis=0)
    capture = CapturingExporter()
    with otel_train.setup(
        run="names", output_dir=tmp_path, exporters=(exporter, capture),
        intervals={"train": 2, "perf": 2, "gpu": 2}, total_steps=100, flops_per_token=1e6,
        peak_flops=1e12, gpu_metrics=False, handle_signals=False,
    ) as tel:  # fmt: skip
        register_gpu_metrics(tel, nvml=FakeNvml([FakeDevice()]))
        for step in range(1, 7):
            tel.training.record(loss=1.0, learning_rate=0.1, grad_norm=0.5, tokens=8, samples=1)
            tel.step(step)
        tel.evaluate(loss=0.9)
        assert tel.flush() and exporter.url is not None
        with urllib.request.urlopen(exporter.url, timeout=10) as response:
            text = response.read().decode()
        batches = list(capture.batches)  # the same exports the scrape shows (no final/*)
    direct = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    collector: set[str] = set()
    kinds: dict[str, tuple[str, str]] = {}
    for batch in batches:
        for resource in batch.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    data = metric.data
                    kind = (
                        "histogram"
                        if isinstance(data, Histogram)
                        else "sum"
                        if isinstance(data, Sum)
                        else "gauge"
                    )
                    monotonic = isinstance(data, Sum) and data.is_monotonic
                    assert isinstance(data, (Gauge, Sum, Histogram))
                    collector |= collector_series_names(
                        metric.name, metric.unit or "", kind=kind, monotonic=monotonic
                    )
                    kinds[metric.name] = (metric.unit or "", kind)
    return direct, collector, kinds


def test_every_dashboard_query_finds_its_metrics_on_the_direct_and_the_collector_path(
    tmp_path: Path,
) -> None:
    direct, collector, _ = _both_paths(tmp_path)
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(_SELECTOR.findall(target["expr"]))
            assert names, target["expr"]
            unknown = names - direct - collector
            assert not unknown, f"{panel['title']!r} names metrics nobody exports: {unknown}"
            assert names & direct, f"{panel['title']!r} is empty when scraping the ranks"
            assert names & collector, f"{panel['title']!r} is empty behind the OTel Collector"


def test_the_collector_renames_unit_one_gauges_and_nothing_else_we_chart(tmp_path: Path) -> None:
    """The facts the dashboard is written for: on the OTLP path perf.mfu becomes
    perf_mfu_ratio (unit "1"), every other name is the one the ranks serve."""
    direct, collector, kinds = _both_paths(tmp_path)
    assert collector_metric_name("perf.mfu", "1", kind="gauge") == "perf_mfu_ratio"
    assert kinds["perf.mfu"] == ("1", "gauge") and "perf_mfu" in direct
    renamed = {name for name in collector - direct if not name.startswith("target")}
    assert renamed == {
        collector_metric_name(name, unit, kind=kind)
        for name, (unit, kind) in kinds.items()
        if unit == "1" and kind == "gauge"
    }
    assert {"perf_mfu_ratio", "hw_gpu_utilization_ratio"} <= renamed
