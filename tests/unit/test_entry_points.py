"""`OTEL_METRICS_EXPORTER=jsonl`: our exporters load through the OTel SDK's own configurator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader

REPO_ROOT = Path(__file__).resolve().parents[2]


def _declared() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return pyproject["project"]["entry-points"]["opentelemetry_metrics_exporter"]


def test_declared_entry_points_load_metric_exporters_that_need_no_arguments():
    import importlib

    for name, target in _declared().items():
        module, _, attribute = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except ImportError:
            continue  # an optional extra that is not installed here
        assert issubclass(cls, MetricExporter), name
        cls().shutdown()  # the SDK's configurator builds it with no arguments


def test_otel_metrics_exporter_jsonl_writes_lines_via_the_sdk_configurator(tmp_path, monkeypatch):
    from opentelemetry.sdk._configuration import _import_exporters

    from exporters.jsonl import JsonLinesMetricExporter

    try:
        _, metric_exporters, _ = _import_exporters([], ["jsonl"], [])
    except RuntimeError:
        pytest.skip("otel-train is not installed (pip install -e .): no entry-point metadata")
    assert metric_exporters["jsonl"] is JsonLinesMetricExporter
    monkeypatch.setenv("OTEL_TRAIN_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "plain-otel")
    reader = PeriodicExportingMetricReader(
        metric_exporters["jsonl"](), export_interval_millis=60_000
    )
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("app")
    meter.create_gauge("train.loss").set(1.5)
    meter.create_gauge("train.global_step").set(3)
    provider.force_flush()
    provider.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "plain-otel" / "rank0.jsonl").open()]
    assert rows[0]["run"] == "plain-otel"
    assert rows[0]["metrics"]["train/loss"] == 1.5 and rows[0]["step"] == 3
