"""dashboards/otel-collector/config.yaml: structurally sound, and it receives what we send.

No collector binary exists in the package registries CI can use, so this checks the config's
wiring, not a running collector; the OTLP tests use a real protobuf-decoding receiver instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

CONFIG = Path(__file__).resolve().parents[2] / "dashboards" / "otel-collector" / "config.yaml"


def test_collector_pipeline_receives_otlp_http_and_only_uses_defined_components():
    config = yaml.safe_load(CONFIG.read_text())
    pipeline = config["service"]["pipelines"]["metrics"]
    for kind in ("receivers", "processors", "exporters"):
        for name in pipeline[kind]:
            assert name in config[kind], f"{kind} {name!r} is used but not defined"
    # Our exporter speaks OTLP/HTTP (protobuf) to :4318/v1/metrics by default.
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert "otlp" in pipeline["receivers"]
    # Rank and run must survive into Prometheus labels, or ranks collapse into one series.
    prometheus = config["exporters"]["prometheus"]
    assert prometheus["resource_to_telemetry_conversion"]["enabled"] is True


def test_sdk_exporter_default_endpoint_matches_the_collector_port(monkeypatch):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.metric_exporter")
    from exporters.otlp import OtlpExporter

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    exporter = OtlpExporter()
    try:
        assert exporter._endpoint == "http://localhost:4318/v1/metrics"
    finally:
        exporter.shutdown()
