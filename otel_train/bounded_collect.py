"""The SDK's collect (observable callbacks: GPU probes, system metrics, a user's) on its own
thread, waited for a bounded time.

Observable callbacks are the one place we run code whose duration nobody bounds: an NVML
query can hang for good after a GPU falls off the bus. Run on the finisher, such a callback
held every later sampled step, and once 256 were behind, every `step()` waited 10 s for room
(measured: 10.0 s per step, forever). Here the finisher waits `COLLECT_WAIT_SECONDS` at most;
past that, the step is exported without what the SDK holds (absent, never stale), and while
the callback has still not returned, later steps skip the collect at once. When it returns,
collects resume. One warning says which, and when it recovered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from opentelemetry.sdk.metrics.export import MetricsData

_logger = logging.getLogger(__name__)

# Far above any healthy collect (a GPU probe: ~1 ms), far below the room wait (10 s).
COLLECT_WAIT_SECONDS = 2.0

Groups = frozenset[str]


class BoundedCollector:
    """One collect at a time on a daemon thread; `collect()` returns None when it took too
    long, or when the previous one still has not returned."""

    def __init__(
        self,
        collect: Callable[[Groups], MetricsData | None],
        *,
        name: str = "otel-train-collect",
        wait_seconds: float | None = None,
    ) -> None:
        self._collect = collect
        self._name = name
        self._wait_seconds = wait_seconds
        self._condition = threading.Condition()
        self._request: tuple[int, Groups] | None = None
        self._answered = 0  # the last request number answered (its result is _result)
        self._result: MetricsData | None = None
        self._running = False  # a collect is in progress, possibly hung
        self._stalled = False  # the running one was abandoned: say so when it returns
        self._closed = False
        self._asked = 0
        self._thread: threading.Thread | None = None
        self.abandoned = 0  # collects not waited for to the end
        self.skipped = 0  # steps exported without a collect: the last one was still running

    def collect(self, groups: Groups) -> MetricsData | None:
        wait = COLLECT_WAIT_SECONDS if self._wait_seconds is None else self._wait_seconds
        with self._condition:
            if self._closed:
                return None
            if self._running:
                self.skipped += 1
                return None
            self._asked += 1
            number = self._asked
            self._request = (number, groups)
            self._running = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._condition.notify_all()
            deadline = time.monotonic() + wait
            while self._answered != number:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._abandon(wait)
                    return None
                self._condition.wait(remaining)
            result, self._result = self._result, None
            return result

    def close(self) -> None:
        """End the thread once it is idle (a hung callback keeps it: it is a daemon)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _abandon(self, wait: float) -> None:
        """Caller holds the condition."""
        self.abandoned += 1
        self._stalled = True
        if self.abandoned == 1:
            _logger.warning(
                "otel-train: an observable-instrument callback (a GPU probe, a system metric, "
                "or one of yours) has not returned after %.1f s; steps are exported without "
                "the SDK's metrics until it does. Training and every other metric go on.",
                wait,
            )

    def _run(self) -> None:
        condition = self._condition
        while True:
            with condition:
                while self._request is None:
                    if self._closed:
                        return
                    condition.wait()
                number, groups = self._request
                self._request = None
            result: MetricsData | None = None
            try:
                result = self._collect(groups)
            except Exception as error:  # the collect logs its own failures; never end here
                _logger.debug("otel-train: collect failed: %r", error)
            with condition:
                self._running = False
                self._answered = number
                self._result = None if self._stalled else result  # a late one: stale
                recovered, self._stalled = self._stalled, False
                without = self.abandoned + self.skipped
                condition.notify_all()
            if recovered:
                _logger.warning(
                    "otel-train: the slow observable callback returned; the SDK's metrics "
                    "are exported again (%d step(s) so far went without them).",
                    without,
                )
