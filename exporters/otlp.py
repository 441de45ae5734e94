"""OTLP to a collector: the SDK's OTLP/HTTP (protobuf) metric exporter.

Step-sampled by default (a push exporter behind our reader and its background queue); time-
based on request (`OTEL_TRAIN_OTLP_INTERVAL_MILLIS`, or `periodic_otlp_reader()`). Endpoint,
headers, timeout, compression come from the standard `OTEL_EXPORTER_OTLP_*` variables.
A failing collector is logged once (the SDK would log every batch), then counted.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)

from otel_train._sdk_compat import stop_periodic_reader_thread
from otel_train.env import OTLP_INTERVAL_MILLIS
from otel_train.errors import OtelTrainError
from otel_train.reduction import values_global_of, with_scope
from otel_train.run_context import RunContext

try:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        f'{error}; OTLP export needs: pip install "otel-train[otlp]"', name=error.name
    ) from error

_logger = logging.getLogger(__name__)

INTERVAL_ENV = OTLP_INTERVAL_MILLIS.name


# The SDK exporter (and its HTTP client) log on this logger: one ERROR per failed batch and
# one WARNING per retry.
SDK_LOGGER = "opentelemetry.exporter.otlp.proto.http.metric_exporter"


class _ExportCapture(threading.local):
    records: list[logging.LogRecord] | None = None


_capture = _ExportCapture()


class _HoldSdkRecordsDuringOurExports(logging.Filter):
    """On the SDK exporter's logger: records emitted on a thread inside `OtlpExporter.export`
    are held for it instead of printed; every other use of the SDK exporter is untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        held = _capture.records
        if held is None:
            return True
        held.append(record)
        return False


_filter = _HoldSdkRecordsDuringOurExports()


logging.getLogger(SDK_LOGGER).addFilter(_filter)


class OtlpExporter(OTLPMetricExporter):
    """The SDK's OTLP/HTTP metric exporter. Every argument is optional and falls back to
    `OTEL_EXPORTER_OTLP_METRICS_*` / `OTEL_EXPORTER_OTLP_*` (SDK rules).

    Two differences on top: the first failure is logged once, with the SDK's reason, and later
    ones are only counted (`failures`, and `otel_train.export.failed` under `setup()`); the
    reduced instruments carry a `scope` attribute ("global" on the rank that exports all-rank
    values, else "rank") so a collector's Prometheus never sums a global value with per-rank
    ones.
    """

    # The background queue reads this: the exporter logs its own failure once (with detail).
    logs_own_failures = True
    # Class-level defaults: the constructor stays the SDK's own.
    _context: RunContext | None = None
    _failure_logged = False
    failures = 0

    def bind_run_context(self, context: RunContext) -> None:
        self._context = context  # what the reduction really did, for batches not stamped

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        global_values = values_global_of(metrics_data, self._context)
        metrics_data = with_scope(metrics_data, global_values=global_values)
        held: list[logging.LogRecord] = []
        _capture.records = held
        try:
            result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        finally:
            _capture.records = None
        if result != MetricExportResult.SUCCESS:
            self.failures += 1
            if not self._failure_logged:
                self._failure_logged = True
                reason = held[-1].getMessage() if held else f"result {result}"
                _logger.error(
                    "otel-train: OTLP export to %s failed (%s); training continues, further "
                    "failures are counted, not logged (otel_train.export.failed).",
                    self._endpoint,
                    reason,
                )
        for record in held:
            _logger.debug("otel-train: OTLP SDK: %s", record.getMessage())
        return result


class ForkSafePeriodicReader(PeriodicExportingMetricReader):
    """A time-based reader that stays silent in forked children and bounds its shutdown.

    The SDK restarts the export thread in a forked child (a DataLoader worker would then
    re-export the parent's values); here the child gets no thread and exports nothing. The
    SDK's shutdown does a last collect whose export can outlast the reader's timeout on a dead
    endpoint: it runs on a daemon thread joined with the budget instead.
    """

    def __init__(
        self,
        exporter: MetricExporter,
        *,
        export_interval_millis: float,
        export_timeout_millis: float = 10_000,
    ) -> None:
        if not export_interval_millis > 0:
            raise OtelTrainError(
                f"export_interval_millis must be > 0, got {export_interval_millis!r}"
            )
        self._owner_pid = os.getpid()
        self._wrapped = exporter
        super().__init__(
            exporter,
            export_interval_millis=export_interval_millis,
            export_timeout_millis=export_timeout_millis,
        )

    def bind_run_context(self, context: RunContext) -> None:
        bind = getattr(self._wrapped, "bind_run_context", None)
        if callable(bind):
            bind(context)

    def _at_fork_reinit(self) -> None:
        # The SDK registers this with os.register_at_fork (its PERIODIC_READER_FORK_HOOK,
        # checked in tests/unit/test_sdk_compat.py): in a forked child, start no thread.
        stop_periodic_reader_thread(self)

    def _receive_metrics(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any):  # type: ignore[no-untyped-def]
        if os.getpid() != self._owner_pid:
            return None
        return super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if os.getpid() != self._owner_pid:
            return
        closer = threading.Thread(
            target=super().shutdown,
            kwargs={"timeout_millis": timeout_millis},
            name="otel-train-otlp-shutdown",
            daemon=True,
        )
        closer.start()
        closer.join(timeout_millis / 1000)
        if closer.is_alive():
            _logger.warning(
                "otel-train: OTLP shutdown did not finish within %.0f ms; the last export was "
                "abandoned",
                timeout_millis,
            )


def periodic_otlp_reader(
    *,
    export_interval_millis: float,
    exporter: MetricExporter | None = None,
    export_timeout_millis: float = 10_000,
) -> ForkSafePeriodicReader:
    """Time-based OTLP: pass the result in `setup(exporters=[...])`."""
    return ForkSafePeriodicReader(
        exporter or OtlpExporter(),
        export_interval_millis=export_interval_millis,
        export_timeout_millis=export_timeout_millis,
    )


def create_for_run(context: RunContext) -> MetricExporter | ForkSafePeriodicReader:
    """`exporters=("otlp",)`: every rank pushes its own series (the resource names the rank)."""
    interval: float | None = OTLP_INTERVAL_MILLIS.read()
    if interval is None:
        exporter = OtlpExporter()
        exporter.bind_run_context(context)
        return exporter
    reader = periodic_otlp_reader(export_interval_millis=interval)
    reader.bind_run_context(context)
    return reader
