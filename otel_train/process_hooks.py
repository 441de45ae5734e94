"""Process-wide hooks over every live `Telemetry`: flush at exit, on SIGTERM / SIGINT, and
go silent in a forked child. One registry (`track`) so each hook sees the same set.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
from typing import TYPE_CHECKING

from otel_train.signals import forget_in_forked_child, install_signal_flush

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry

_logger = logging.getLogger(__name__)

# Every Telemetry not shut down yet, held strongly: one the program no longer references still
# has values pending and export threads running, and must be flushed at exit (a weak set
# only kept those that happened to sit in a reference cycle).
_live: set[Telemetry] = set()


def track(telemetry: Telemetry, *, handle_signals: bool, timeout_millis: float) -> None:
    """Make `telemetry` one the exit / fork hooks act on; with `handle_signals`, also flush
    it on SIGTERM / SIGINT (installed once per process, main thread only)."""
    if handle_signals:
        install_signal_flush(_flush_live_on_signal, timeout_millis=timeout_millis)
    _live.add(telemetry)


def untrack(telemetry: Telemetry) -> None:
    """Called by `Telemetry.shutdown()`: nothing left for the hooks to do with it."""
    _live.discard(telemetry)


@atexit.register
def shutdown_live_telemetry() -> None:
    """Shut every live Telemetry down (idempotent): the exit hook, also called early by the
    W&B exporter so the tail reaches W&B before wandb's own teardown."""
    for telemetry in list(_live):
        try:
            telemetry.shutdown()
        except Exception as error:  # never turn a clean exit into a traceback
            _logger.warning("otel-train: shutdown at exit failed: %r", error)


def _flush_live_on_signal(signum: int, budget_millis: float) -> None:
    """SIGTERM ends the process: export the tail and final/*. SIGINT becomes a
    KeyboardInterrupt the program may catch: only drain what is queued."""
    for telemetry in list(_live):
        if signum == signal.SIGTERM:
            telemetry.shutdown(timeout_millis=budget_millis)
        else:
            telemetry.flush(timeout_millis=budget_millis)


def _disable_live_in_forked_child() -> None:
    # A DataLoader worker (fork) inherits every Telemetry and possibly locks held by the
    # parent's other threads: it must export nothing and must never wait on those locks.
    forget_in_forked_child()
    for telemetry in list(_live):
        telemetry._disable_in_forked_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disable_live_in_forked_child)
