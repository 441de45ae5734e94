"""SIGTERM / SIGINT: flush every live Telemetry within a bounded time, then let the signal's
previous behaviour proceed (the default SIGTERM still terminates, SIGINT still raises
KeyboardInterrupt). atexit alone does not run on SIGTERM, so without this the tail is lost.

The handler runs on the main thread between two bytecodes of whatever it interrupted, and
waits there for the flush (on a helper thread). Had it interrupted the training thread while
that held a lock the flush needs, both would wait until the deadline and the tail would be
lost. Such code runs inside `signals_deferred()`: a signal landing there, even between the
lock's acquisition and the next bytecode, is deferred to the section's end.
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
_deferred: list[int] = []
_timeout_millis = 10_000.0
_sections = threading.local()  # .depth: how many deferring sections this thread is inside


class SignalsDeferred:
    """A section in which a signal waits for the section's end: counted before `lock` (if
    any) is taken and after it is released, so that no bytecode holds the lock uncounted."""

    __slots__ = ("_lock",)

    def __init__(self, lock: Any = None) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        _sections.depth = getattr(_sections, "depth", 0) + 1
        if self._lock is not None:
            self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        if self._lock is not None:
            self._lock.release()
        depth = _sections.depth = _sections.depth - 1
        if not depth and _deferred and threading.current_thread() is threading.main_thread():
            deliver_deferred()  # also after an exception: a SIGTERM must not be lost


_SECTION = SignalsDeferred()


def signals_deferred() -> SignalsDeferred:
    """`with signals_deferred():` around code that holds a lock the signal flush needs
    (`SignalsDeferred(lock)` takes the lock itself). A SIGTERM / SIGINT arriving inside waits
    for the section's end (bounded: the section is), then flushes as usual; sections nest."""
    return _SECTION


def in_deferring_section() -> bool:
    return getattr(_sections, "depth", 0) > 0


def install_signal_flush(flush_all: Callable[[int, float], None], *, timeout_millis: float) -> bool:
    """Install once per process; chain to whatever handler was there. Main thread only
    (Python allows handlers nowhere else): returns False, changing nothing, elsewhere."""
    global _flush_all, _timeout_millis
    _flush_all = flush_all
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


def deliver_deferred() -> None:
    """Run the signals that arrived inside a deferring section, now that it has ended."""
    while _deferred:
        _on_signal(_deferred.pop(0), None)


def forget_in_forked_child() -> None:
    """A forked child: the parent's deferred signals and sections are not its own."""
    global _sections
    _sections = threading.local()
    _deferred.clear()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if in_deferring_section():
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
