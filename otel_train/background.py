"""Export off the training thread: one bounded queue and one daemon thread per push exporter.

A slow or dead backend fills its own queue and loses its oldest batches (counted, logged
once); it never blocks `step()` and never delays the other exporters. An exporter that only
updates memory (`InMemoryExport`: Prometheus) is called at once instead (`export_now`), on
the finisher thread: it has no backend to wait for, and a batch that is not queued dies where
it was made instead of living long enough to be promoted by the garbage collector.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from otel_train.exporter_contract import InMemoryExport, ReadsOnlySharedRows

_logger = logging.getLogger("otel_train.export")

# The training thread never wakes an export thread (on a busy machine a wake-up cost a sampled
# step ~0.2 ms: the woken thread took the CPU): each one looks at its queue this often, and
# at once when asked to flush or stop. Batches wait at most this long.
_POLL_SECONDS = 0.02


class BackgroundExporter:
    """Owns one exporter, its queue and its thread. Not itself an exporter: it is plumbing."""

    def __init__(self, exporter: MetricExporter, *, name: str, max_queue_batches: int) -> None:
        self.exporter = exporter
        self.name = name
        self._queue: deque[MetricsData] = deque()
        self._max = max_queue_batches
        self._condition = threading.Condition()
        self._busy = False
        self._stopping = False
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self._warned_drop = False
        self._warned_failure = False
        # Declared hooks, looked up once (a Protocol isinstance check costs ~10 us).
        self.in_memory = (
            isinstance(exporter, InMemoryExport) and exporter.export_is_in_memory is True
        )
        self.rows_reader: ReadsOnlySharedRows | None = (
            exporter if isinstance(exporter, ReadsOnlySharedRows) else None
        )
        self._thread = threading.Thread(
            target=self._run, name=f"otel-train-export-{name}", daemon=True
        )
        self._thread.start()

    def submit(self, batch: MetricsData) -> None:
        """Called on the training thread: O(1), never waits for the backend, wakes no one."""
        with self._condition:
            if self._stopping:
                self._count_drop(1, reason="arrived after shutdown began")
                return
            if len(self._queue) >= self._max:
                self._queue.popleft()
                self._count_drop(1)
            self._queue.append(batch)

    def export_now(self, batch: MetricsData) -> None:
        """An `in_memory` exporter, on the caller's thread (the finisher): no backend to wait
        for. Counted and guarded like a queued export; after shutdown began, a drop."""
        with self._condition:
            if self._stopping:
                self._count_drop(1, reason="arrived after shutdown began")
                return
            self._busy = True
        self._export_while_busy(batch)

    def _count_drop(self, count: int, *, reason: str | None = None) -> None:
        self.dropped += count
        if not self._warned_drop:
            self._warned_drop = True
            if reason is None:
                reason = f"it is slower than training (queue of {self._max} full)"
            _logger.warning(
                "otel-train: exporter %r is dropping queued batches (%d now): %s. Further drops "
                "are counted, not logged (otel_train.export.dropped).",
                self.name,
                count,
                reason,
            )

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._stopping:
                    self._condition.wait(_POLL_SECONDS)
                if not self._queue and self._stopping:
                    return
                batch = self._queue.popleft()
                self._busy = True
            self._export_while_busy(batch)

    def _export_while_busy(self, batch: MetricsData) -> None:
        """Export with `_busy` set (by the caller, under the condition); then clear it and
        tell `wait_idle`."""
        try:
            self._export_one(batch)
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()

    def _export_one(self, batch: MetricsData) -> None:
        try:
            result = self.exporter.export(batch, timeout_millis=10_000)
        except Exception as error:  # a backend must never take training down
            self._record_failure(repr(error))
            return
        if result == MetricExportResult.SUCCESS:
            self.exported += 1
        elif getattr(self.exporter, "logs_own_failures", False):
            self.failed += 1  # it logged the first failure itself, with the backend's reason
        else:
            self._record_failure(f"result {result}")

    def _record_failure(self, detail: str) -> None:
        self.failed += 1
        if not self._warned_failure:
            self._warned_failure = True
            _logger.warning(
                "otel-train: exporter %r failed (%s); training continues, further failures are "
                "counted, not logged (otel_train.export.failed).",
                self.name,
                detail,
            )

    def wait_idle(self, timeout_millis: float) -> bool:
        """Wait until everything queued so far has been handed to the exporter."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._condition:
            self._condition.notify_all()  # the export thread: look at the queue now
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def shutdown(self, timeout_millis: float) -> None:
        """Drain what is queued within the budget, then shut the exporter down. Bounded."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._condition:
            if self._queue:
                self._count_drop(
                    len(self._queue),
                    reason=f"not delivered within the shutdown budget ({timeout_millis:.0f} ms)",
                )
                self._queue.clear()
        # Flush and shutdown run on a helper thread: a hanging backend cannot hold exit.
        closer = threading.Thread(
            target=self._shutdown_exporter,
            args=(max(0.0, (deadline - time.monotonic()) * 1000),),
            name=f"otel-train-close-{self.name}",
            daemon=True,
        )
        closer.start()
        closer.join(max(0.05, deadline - time.monotonic()))

    def _shutdown_exporter(self, timeout_millis: float) -> None:
        try:
            self.exporter.force_flush(timeout_millis=timeout_millis)
            self.exporter.shutdown(timeout_millis=timeout_millis)
        except Exception as error:
            self._record_failure(f"shutdown: {error!r}")
