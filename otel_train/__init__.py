"""otel-train: one honest, cheap, complete set of training metrics through OpenTelemetry.

`__all__` is the public face. Internals (e.g. `otel_train.rows.RowBuilder`,
`otel_train.reader.StepSampledReader`) stay importable from their modules without promise.
"""

from __future__ import annotations

from otel_train import testing
from otel_train.configure import setup
from otel_train.errors import (
    ExporterClashError,
    OtelTrainError,
    StepOrderError,
    UnknownMetricError,
)
from otel_train.model_flops import flops_per_generated_token, flops_per_token
from otel_train.naming import KeyNamer, KeySpec
from otel_train.ranks import RankInfo
from otel_train.run_context import RunContext
from otel_train.sampling import SamplingView
from otel_train.telemetry import Telemetry
from otel_train.throughput import effective_batch_size, mfu, peak_flops

__version__ = "0.1.0"

__all__ = [
    "ExporterClashError",
    "KeyNamer",
    "KeySpec",
    "OtelTrainError",
    "RankInfo",
    "RunContext",
    "SamplingView",
    "StepOrderError",
    "Telemetry",
    "UnknownMetricError",
    "__version__",
    "effective_batch_size",
    "flops_per_generated_token",
    "flops_per_token",
    "mfu",
    "peak_flops",
    "setup",
    "testing",
]


def __getattr__(name: str) -> object:
    """Names once exported here keep working (not advertised): import them from their
    modules instead."""
    moved = {
        "MetricRow": "otel_train.rows",
        "RowBuilder": "otel_train.rows",
        "StepSampledReader": "otel_train.reader",
        "TrainingInstruments": "otel_train.instruments",
    }
    if name in moved:
        import importlib

        return getattr(importlib.import_module(moved[name]), name)
    raise AttributeError(f"module 'otel_train' has no attribute {name!r}")
