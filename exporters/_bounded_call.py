"""Run a call that may hang (wandb.init, run.finish) on a daemon thread and wait for it, bounded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

_logger = logging.getLogger(__name__)


class CallTimedOut(TimeoutError):
    """The call did not return in time; it goes on running on its daemon thread."""


class BoundedCall:
    """`function` running on its own daemon thread; the caller waits for it with a timeout.

    A call the caller gave up on is not killed; should it return later, `if_late` gets the
    result (e.g. to finish a W&B run that started too late to be used).
    """

    def __init__(
        self,
        function: Callable[[], Any],
        name: str,
        *,
        if_late: Callable[[Any], object] | None = None,
    ) -> None:
        self.name = name
        self.started = time.monotonic()
        self._function = function
        self._if_late = if_late
        self._lock = threading.Lock()
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=self._target, name=f"otel-train-wandb-{name}", daemon=True
        )
        self._thread.start()

    def _target(self) -> None:
        try:
            value = self._function()
        except BaseException as error:  # handed to whoever waits in result()
            with self._lock:
                self._outcome["error"] = error
            return
        with self._lock:
            self._outcome["value"] = value
            late = self._outcome.get("abandoned", False)
        if late and self._if_late is not None:
            try:
                self._if_late(value)
            except Exception as error:
                _logger.debug("otel-train: cleaning up a late wandb %s: %r", self.name, error)

    @property
    def done(self) -> bool:
        """The call has returned or raised (including any `if_late` clean-up after it)."""
        return not self._thread.is_alive()

    def result(self, bound_seconds: float) -> Any:
        """The return value, waiting until `bound_seconds` after the call started at most."""
        self._thread.join(max(0.0, self.started + bound_seconds - time.monotonic()))
        with self._lock:
            if "error" in self._outcome:
                raise self._outcome["error"]
            if "value" in self._outcome:
                return self._outcome["value"]
            self._outcome["abandoned"] = True
        raise CallTimedOut(f"wandb {self.name} did not return within {bound_seconds:g} s")
