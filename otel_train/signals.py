"""SIGTERM / SIGINT: flush every live Telemetry within a bounded time, then let the signal's
previous behaviour proceed (the default SIGTERM still terminates, SIGINT still raises
KeyboardInterrupt). atexit alone does not run on SIGTERM, so without this the tail is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

_logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_previous: dict[int, Any] = {}
_flush_all: Callable[[int, float], None] | None = None
_busy_here: Callable[[], bool] | None = None
_deferred: list[int] = []
_timeout_millis = 10_000.0


def install_signal_flush(
    flush_all: Callable[[int, float], None],
    *,
    timeout_millis: float,
    busy_here: Callable[[], bool] | None = None,
) -> bool:
    """Install once per process; chain to whatever handler was there. Main thread only
    (Python allows handlers nowhere else): returns False, changing nothing, elsewhere.

    `busy_here()` says whether the interrupted thread is inside a telemetry's locked
    section (a sampled step): the flush would wait on that lock, so it is deferred until
    the section ends (`deliver_deferred()`), a bounded wait.
    """
    global _flush_all, _timeout_millis, _busy_here
    _flush_all = flush_all
    _busy_here = busy_here
    _timeout_millis = max(_timeout_millis if _previous else 0.0, timeout_millis)
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in HANDLED_SIGNALS:
        current = signal.getsignal(signum)
        if current is _on_signal:
            continue
        if current == signal.SIG_IGN:
            continue  # nohup & co. asked for this signal to be ignored: leave it so
        _previous[signum] = current
        signal.signal(signum, _on_signal)
    return True


def uninstall_signal_flush() -> None:
    """Put the previous handlers back (tests, embedding applications)."""
    for signum, previous in list(_previous.items()):
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        del _previous[signum]


def has_deferred() -> bool:
    return bool(_deferred)


def deliver_deferred() -> None:
    """Run the signals that arrived inside a locked section, now that it has ended."""
    while _deferred:
        _on_signal(_deferred.pop(0), None)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    busy = _busy_here
    if busy is not None and busy():
        if signum not in _deferred:
            _deferred.append(signum)
        return
    flush_all = _flush_all
    if flush_all is not None:
        # On a helper thread, joined with a deadline: the main thread may have been
        # interrupted while holding a lock the flush needs, and the signal must still win.
        worker = threading.Thread(
            target=_flush_quietly,
            args=(flush_all, signum, _timeout_millis),
            name="otel-train-signal-flush",
            daemon=True,
        )
        worker.start()
        worker.join(_timeout_millis / 1000 + 0.5)
    _chain(signum, frame)


def _flush_quietly(flush_all: Callable[[int, float], None], signum: int, budget: float) -> None:
    try:
        flush_all(signum, budget)
    except Exception as error:  # never replace the signal's behaviour by a traceback
        _logger.warning("otel-train: flush on signal %d failed: %r", signum, error)


def _chain(signum: int, frame: FrameType | None) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # e.g. default_int_handler raises KeyboardInterrupt
        return
    if previous == signal.SIG_IGN:
        return
    # SIG_DFL (or a handler installed from C): re-deliver with the default disposition, so
    # the process ends the way the sender expects (exit status = killed by this signal).
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
