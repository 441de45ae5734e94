"""The lock a `Telemetry` takes around every export, who holds it, and whether this process
may still export (closed, or a forked child that must never touch the parent's exporters)."""

from __future__ import annotations

import os
import threading

from otel_train import signals
from otel_train.instruments import TrainingInstruments


class ExportGuard:
    """Sampled steps vs. `evaluate()` from another thread; signals deferred while held."""

    def __init__(self, training: TrainingInstruments) -> None:
        self._training = training
        self._lock = threading.RLock()
        self._section = signals.SignalsDeferred(self._lock)
        self.pid = os.getpid()
        self.closed = False

    def busy(self) -> signals.SignalsDeferred:
        """`with busy():` holds the lock. A signal arriving meanwhile is deferred until it is
        released and delivered then: its flush would otherwise wait for this very lock."""
        return self._section

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
        self._section = signals.SignalsDeferred(self._lock)
        self.closed = True
        self._training.enabled = False
