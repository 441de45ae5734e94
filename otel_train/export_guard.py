"""The lock a `Telemetry` takes around every export, who holds it, and whether this process
may still export (closed, or a forked child that must never touch the parent's exporters)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from otel_train import signals
from otel_train.instruments import TrainingInstruments


class ExportGuard:
    """Sampled steps vs. `evaluate()` from another thread; signals deferred while held."""

    def __init__(self, training: TrainingInstruments) -> None:
        self._training = training
        self._lock = threading.RLock()
        self._busy_thread: int | None = None  # who holds the lock (signal deferral)
        self.pid = os.getpid()
        self.closed = False

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Hold the lock and say so: a signal arriving meanwhile on this thread is deferred
        until the lock is released (its flush would otherwise wait for this very lock)."""
        with self._lock:
            outer = self._busy_thread
            self._busy_thread = threading.get_ident()
            try:
                yield
            finally:
                self._busy_thread = outer

    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """`busy()`, then deliver a signal deferred meanwhile (not after an exception)."""
        with self.busy():
            yield
        self.deliver_deferred_signal()

    def busy_on_this_thread(self) -> bool:
        return self._busy_thread == threading.get_ident()

    def deliver_deferred_signal(self) -> None:
        if signals.has_deferred() and self._busy_thread is None:
            signals.deliver_deferred()

    def closed_or_forked(self) -> bool:
        if self.closed:
            return True
        if os.getpid() != self.pid:
            # A DataLoader worker (fork) must never export or touch the parent's exporters.
            self.closed = True
            self._training.enabled = False
            return True
        return False

    def disable_in_forked_child(self) -> None:
        """Export nothing, take no lock the parent's threads may have held at the fork."""
        self._lock = threading.RLock()
        self._busy_thread = None
        self.closed = True
        self._training.enabled = False
