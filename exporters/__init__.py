"""otel-train's exporters: real OpenTelemetry `MetricExporter`s and readers.

Heavy optional backends (wandb, prometheus, otlp) are imported when first used, so
`import exporters` needs only the OpenTelemetry SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

from exporters.jsonl import JsonLinesMetricExporter

# Marker checked by otel_train: an unrelated package named `exporters` does not carry it.
__otel_train__ = True

_LAZY = {
    "WandbMetricExporter": "exporters.wandb",
    "PrometheusExporter": "exporters.prometheus",
    "OtlpExporter": "exporters.otlp",
    "periodic_otlp_reader": "exporters.otlp",
}

__all__ = ["JsonLinesMetricExporter", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'exporters' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
