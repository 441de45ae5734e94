"""The W&B run's life for the live exporter: opened on a helper thread, waited for (bounded) by
the export thread, finished (bounded) at shutdown, and its interpreter exit bounded too."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from exporters._bounded_call import BoundedCall
from exporters._wandb_exit import EXIT_GRACE_SECONDS, bound_process_exit, start_service_first
from exporters._wandb_run import LOGIN_HINT

_logger = logging.getLogger("otel_train.wandb")


class WandbRunLifecycle:
    """Owns the run handle and the calls that may hang (`wandb.init`, `run.finish`).

    `open_run` does the W&B work (on the helper thread, after wandb's service started);
    `on_started` runs on the export thread once the run is up (e.g. to keep its id for a resume).
    `lock` guards the handle: the exporter holds it around each `wandb.log` as well.
    """

    def __init__(
        self,
        *,
        open_run: Callable[[], Any],
        on_started: Callable[[Any], None],
        mode: Callable[[], str | None],
        init_timeout_seconds: float,
        finish_timeout_seconds: float,
    ) -> None:
        self._open_run = open_run
        self._on_started = on_started
        self._mode = mode
        self.init_timeout_seconds = init_timeout_seconds
        self.finish_timeout_seconds = finish_timeout_seconds
        self.lock = threading.Lock()
        self.owns_run = True  # False once the user's active run is adopted
        self.run: Any = None
        self.broken: str | None = None
        self.closed = False
        self._starting: BoundedCall | None = None
        self._finishing: BoundedCall | None = None

    def begin(self) -> None:
        """Start W&B on a helper thread now (setup() calls this), so its ~1 s start-up (import,
        the wandb-core process) overlaps the first steps instead of waiting for the first
        export; the export thread then waits for it, bounded, and training never does."""
        with self.lock:
            self._begin_locked()

    def _begin_locked(self) -> BoundedCall:
        if self._starting is None:
            self._starting = BoundedCall(self._open, "init", if_late=self._finish_late)
        return self._starting

    def _open(self) -> Any:
        import wandb  # noqa: F401  (a missing package fails here, as ImportError)

        start_service_first(self._mode())
        bound_process_exit(self.exit_grace)
        return self._open_run()

    def _finish_late(self, run: Any) -> None:
        if self.owns_run:
            run.finish()

    def current_or_start(self) -> Any:
        """With `lock` held, on the export thread: the run, waiting (bounded) for the one the
        helper thread is opening; None once W&B could not start (logged once)."""
        if self.run is not None:
            return self.run
        starting = self._begin_locked()
        # A little more than W&B's own timeout: ours only matters if init hangs anyway.
        bound = self.init_timeout_seconds + min(5.0, max(1.0, self.init_timeout_seconds))
        try:
            run = starting.result(bound)
        except Exception as error:
            self.broken = repr(error)
            hint = (
                'install it with pip install "otel-train[wandb]"'
                if isinstance(error, ImportError)
                else f"{LOGIN_HINT}; check the network"
            )
            _logger.error(
                "otel-train: W&B could not start (%s); W&B logging is off for this run (%s). "
                "Training and the other exporters continue.",
                self.broken,
                hint,
            )
            return None
        self.run = run
        self._on_started(run)
        return run

    def shutdown(self, timeout_millis: float) -> None:
        """`run.finish()`, bounded: a hanging W&B cannot hold the process, at shutdown or at
        exit (see `exporters._wandb_exit`)."""
        budget = min(self.finish_timeout_seconds, max(timeout_millis / 1000, 0.05))
        self.closed = True  # later exports fail fast, even while an init still hangs
        if not self.lock.acquire(timeout=budget):
            _logger.error("otel-train: W&B is still starting at shutdown; not waiting for it")
            return
        try:
            run = self._take_run(budget)
        finally:
            self.lock.release()
        if run is None or not self.owns_run:
            return
        self._finishing = BoundedCall(run.finish, "finish")
        try:
            self._finishing.result(budget)
        except Exception as error:
            _logger.error("otel-train: wandb finish failed or timed out (%r)", error)

    def _take_run(self, budget: float) -> Any:
        run, self.run = self.run, None
        starting = self._starting
        if run is None and starting is not None and self.broken is None:
            # Started at setup but nothing exported yet: finish that run too. If it is still
            # starting, it is finished whenever it comes up (if_late).
            waited = time.monotonic() - starting.started
            try:
                run = starting.result(waited + budget / 2)
            except Exception as error:
                _logger.debug("otel-train: W&B run never came up before shutdown: %r", error)
        return run

    def exit_grace(self) -> float | None:
        """At interpreter exit: how long wandb's teardown may take for our run (None: no
        bound needed). Past it, `exporters._wandb_exit` stops wandb's service."""
        if not self.owns_run:
            return None  # the user's run: its teardown is theirs
        starting, finishing = self._starting, self._finishing
        if any(call is not None and not call.done for call in (starting, finishing)):
            # An init or finish that shutdown() gave up on, or an init still running at exit:
            # W&B is unreachable. Rows already logged stay in wandb's local files (`wandb
            # sync`), and every row is in the JSON lines (`otel-train sync`).
            return EXIT_GRACE_SECONDS
        if not self.closed and self.run is not None:
            # Still open at exit (otel-train's exit flush did not reach us): wandb's teardown
            # finishes our run; give it what our own finish would get.
            return self.finish_timeout_seconds
        return None
