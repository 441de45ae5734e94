"""Finish sampled steps off the training thread, one at a time, in the order they were sampled.

A sampled step on the training thread only detaches its values and starts their copy to the
host (`SampledExports.begin`). Everything after that (reading the copy, the streams, rates,
the `MetricsData` and the hand-off to the exporters) is this thread's work, so `step()` never
waits for the device nor for our own bookkeeping. The thread polls: the training thread never
wakes it (on a loaded machine a wake-up hands it the CPU in the middle of a step). A CUDA copy
is finished once its event has completed; `drain()` (events, flush, shutdown, resume) forces
whatever is still in flight, so an event is exported after every sampled step before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

_logger = logging.getLogger(__name__)

# How long a finished copy waits, at most, for this thread to look (it never sleeps while a
# job is ready). 5 ms against export intervals of many steps: nobody sees the delay.
POLL_SECONDS = 0.005
# Sampled steps waiting to be finished before `submit` waits for room (see there).
MAX_IN_FLIGHT = 256
_ROOM_TIMEOUT_SECONDS = 10.0


class Finishable(Protocol):
    def ready(self) -> bool: ...


Job = TypeVar("Job", bound=Finishable)


class SampledStepFinisher(Generic[Job]):
    """A FIFO of sampled steps in flight and the daemon thread that finishes them."""

    def __init__(
        self,
        finish: Callable[[Job], None],
        *,
        name: str = "otel-train-finish",
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._finish = finish
        self._name = name
        self._poll = poll_seconds
        self._jobs: deque[Job] = deque()
        self._condition = threading.Condition()
        self._busy = False
        self._forcing = 0  # drains waiting: finish the head even if its copy is in flight
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.finished = 0
        self.failed = 0
        self._warned = False
        self._warned_behind = False

    def submit(self, job: Job) -> None:
        """Training thread: O(1), wakes no one (the thread is started on first use). Only
        when this thread has fallen `MAX_IN_FLIGHT` steps behind (something it runs, e.g. an
        observable callback, is slower than training) does the training thread wait for
        room: the steps in flight hold their detached tensors, and none may be dropped."""
        with self._condition:
            if self._stopping:
                return
            if len(self._jobs) >= MAX_IN_FLIGHT:
                self._wait_for_room()
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _wait_for_room(self) -> None:
        """Caller holds the condition."""
        if not self._warned_behind:
            self._warned_behind = True
            _logger.warning(
                "otel-train: exporting sampled steps fell %d steps behind training; step() "
                "waits for room (a slow observable callback or exporter hook?)",
                MAX_IN_FLIGHT,
            )
        self._forced_wait(lambda: len(self._jobs) >= MAX_IN_FLIGHT, _ROOM_TIMEOUT_SECONDS)

    def _forced_wait(self, waiting: Callable[[], bool], timeout_seconds: float) -> bool:
        """Wait, holding the condition, while `waiting()`; the thread finishes jobs whose copy
        is still in flight meanwhile. False on timeout or if the thread is gone."""
        deadline = time.monotonic() + timeout_seconds
        self._forcing += 1
        self._condition.notify_all()
        try:
            while waiting():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread_alive():
                    return False
                self._condition.wait(remaining)
            return True
        finally:
            self._forcing -= 1

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def in_flight(self) -> int:
        with self._condition:
            return len(self._jobs) + (1 if self._busy else 0)

    def drain(self, timeout_seconds: float) -> bool:
        """Finish every job submitted so far (copies in flight are waited for). True when
        all are done within the timeout; from the finisher thread itself: at once, False."""
        if threading.current_thread() is self._thread:
            return False  # an observable callback calling flush(): it cannot wait for itself
        with self._condition:
            if not self._jobs and not self._busy:
                return True
            return self._forced_wait(lambda: bool(self._jobs) or self._busy, timeout_seconds)

    def stop(self, timeout_seconds: float) -> bool:
        """Drain within the timeout, then end the thread. Jobs left are dropped (logged)."""
        drained = self.drain(timeout_seconds)
        with self._condition:
            self._stopping = True
            left = len(self._jobs)
            self._jobs.clear()
            self._condition.notify_all()
        if left:
            _logger.warning(
                "otel-train: %d sampled step(s) were not exported within the shutdown budget",
                left,
            )
        return drained

    def forget(self) -> None:
        """A forked child: the parent's jobs and thread are not its own."""
        self._condition = threading.Condition()
        self._jobs = deque()
        self._busy = False
        self._forcing = 0
        self._stopping = True
        self._thread = None

    def _run(self) -> None:
        condition = self._condition
        while True:
            with condition:
                while True:
                    if self._stopping and not self._jobs:
                        return
                    jobs = self._jobs
                    if jobs and (self._forcing or jobs[0].ready()):
                        job = jobs.popleft()
                        self._busy = True
                        break
                    condition.wait(self._poll)
            try:
                self._finish(job)
                self.finished += 1
            except Exception as error:  # one broken step must not stop the later ones
                self.failed += 1
                if not self._warned:
                    self._warned = True
                    _logger.error(
                        "otel-train: exporting a sampled step failed (%r); later steps are "
                        "still exported, further failures are counted, not logged",
                        error,
                    )
            finally:
                with condition:
                    self._busy = False
                    condition.notify_all()
