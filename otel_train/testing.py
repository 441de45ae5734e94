"""Test helpers users can use too: capture what otel-train exports, as flat rows."""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from otel_train.naming import KeyNamer
from otel_train.rows import MetricRow, RowBuilder, shared_row
from otel_train.run_context import RunContext


class CapturingExporter(MetricExporter):
    """An in-memory MetricExporter: every export becomes a `MetricRow` with the W&B-style keys.

    Pass it in `setup(exporters=[CapturingExporter()])`, call `tel.flush()`, read `.rows`.
    """

    shares_rows = True  # the step-sampled reader builds each batch's row once for all

    def __init__(self, namer: KeyNamer | None = None) -> None:
        super().__init__()
        self._builder = RowBuilder(namer)
        self._lock = threading.Lock()
        self.rows: list[MetricRow] = []
        self.batches: list[MetricsData] = []
        self.shut_down = False

    def bind_run_context(self, context: RunContext) -> None:
        self._builder = RowBuilder(context.namer)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        row = shared_row(metrics_data, self._builder)
        with self._lock:
            self.batches.append(metrics_data)
            self.rows.append(row)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.shut_down = True

    def steps_with(self, key: str) -> list[int | None]:
        """Steps of the rows that carry `key`, in export order."""
        with self._lock:
            return [row.step for row in self.rows if key in row.values]

    def values_of(self, key: str) -> list[float]:
        with self._lock:
            return [row.values[key] for row in self.rows if key in row.values]
