"""otel-train: one honest, cheap, complete set of training metrics through OpenTelemetry."""

from __future__ import annotations

from otel_train.configure import setup
from otel_train.errors import OtelTrainError, StepOrderError, UnknownMetricError
from otel_train.instruments import TrainingInstruments
from otel_train.model_flops import flops_per_generated_token, flops_per_token
from otel_train.naming import KeyNamer, KeySpec
from otel_train.ranks import RankInfo
from otel_train.reader import StepSampledReader
from otel_train.rows import MetricRow, RowBuilder
from otel_train.run_context import RunContext
from otel_train.sampling import SamplingView
from otel_train.telemetry import Telemetry
from otel_train.throughput import effective_batch_size, mfu, peak_flops

__version__ = "0.1.0"

__all__ = [
    "KeyNamer",
    "KeySpec",
    "MetricRow",
    "OtelTrainError",
    "RankInfo",
    "RowBuilder",
    "RunContext",
    "SamplingView",
    "StepOrderError",
    "StepSampledReader",
    "Telemetry",
    "TrainingInstruments",
    "UnknownMetricError",
    "__version__",
    "effective_batch_size",
    "flops_per_generated_token",
    "flops_per_token",
    "mfu",
    "peak_flops",
    "setup",
]
