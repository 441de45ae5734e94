"""Bound the process exit while wandb's service is still busy with a run of ours.

At interpreter exit wandb's own atexit hook tears its service down and waits for it without a
timeout (`ServiceConnection.teardown` -> `ServiceProcess.join` -> `Popen.wait()`); the service
first ends every stream, and with an unreachable server that means retrying until wandb's own
timeouts (measured ~50 s after `shutdown()` returned). `bound_process_exit` registers a hook
that runs before wandb's (atexit is last-in, first-out: it is registered once wandb's service,
and with it wandb's hook, exists): it first lets otel-train shut down (tail and `final/*` reach
W&B before wandb tears down), then asks each exporter how long W&B may still take; past that,
it stops the service: SIGTERM, then SIGKILL. What wandb already wrote stays in its local
run files (`wandb sync` uploads them), and the JSON lines hold every row (`otel-train sync`).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable

from otel_train._sdk_compat import wandb_service_process

_logger = logging.getLogger("otel_train.wandb")

EXIT_GRACE_SECONDS = 2.0  # after a shutdown() that had to leave a wandb call running
KILL_GRACE_SECONDS = 1.0  # between SIGTERM and SIGKILL

_lock = threading.Lock()
_exit_graces: list[Callable[[], float | None]] = []


def start_service_first(mode: str | None) -> None:
    """Start wandb's service (and so register its exit hook) now, before `wandb.init` would:
    a hook registered after this one runs before wandb's teardown. Disabled W&B has none."""
    import wandb

    if (mode or os.environ.get("WANDB_MODE", "")).strip().lower() == "disabled":
        return
    ensure_service = getattr(wandb.setup(), "ensure_service", None)
    if callable(ensure_service):
        ensure_service()


def bound_process_exit(exit_grace: Callable[[], float | None]) -> None:
    """At exit, give wandb's service at most `exit_grace()` seconds (None: no W&B work of
    ours is left, nothing to bound), then stop it. Call after wandb's service started."""
    with _lock:
        if exit_grace not in _exit_graces:
            _exit_graces.append(exit_grace)
        atexit.unregister(_at_exit)  # re-registered: after wandb's latest hook, so first
        atexit.register(_at_exit)


def _at_exit() -> None:
    _shut_otel_train_down_first()
    with _lock:
        graces = [grace for grace in map(_safe_grace, _exit_graces) if grace is not None]
        _exit_graces.clear()
    if not graces:
        return  # nothing of ours is pending: wandb's own teardown is quick
    process = service_process()
    if process is None:
        _logger.debug("otel-train: wandb's service process not found; its exit is unbounded")
        return
    if process.poll() is not None:
        return
    grace = max(graces)
    # A daemon thread, so wandb's own atexit teardown (next) runs meanwhile and returns as
    # soon as its service ends, by itself or stopped by us.
    threading.Thread(
        target=_stop_after_grace, args=(process, grace), name="otel-train-wandb-exit", daemon=True
    ).start()


def _shut_otel_train_down_first() -> None:
    """otel-train's own exit hook (`otel_train.configure`, registered when otel_train was
    imported, so after wandb's in exit order) exports the tail and `final/*`; by then wandb's
    teardown has closed its service and those rows would be lost. Run it now, while W&B can
    still take them; it is idempotent, the later call finds every Telemetry shut down."""
    configure = sys.modules.get("otel_train.configure")
    shutdown_live = getattr(configure, "_shutdown_live_telemetry", None)
    if callable(shutdown_live):
        shutdown_live()


def _safe_grace(exit_grace: Callable[[], float | None]) -> float | None:
    try:
        return exit_grace()
    except Exception:  # a broken check must not turn a clean exit into a traceback
        return EXIT_GRACE_SECONDS


def _stop_after_grace(process: subprocess.Popen[bytes], grace: float) -> None:
    try:
        process.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    _logger.warning(
        "otel-train: W&B did not finish within %g s at exit (server unreachable?); stopping "
        "wandb's service. Its local run files stay for `wandb sync`; the JSON lines can be "
        "replayed with `otel-train sync`.",
        grace,
    )
    try:
        process.terminate()
        try:
            process.wait(KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    except OSError as error:  # already gone
        _logger.debug("otel-train: stopping wandb's service: %r", error)


def service_process() -> subprocess.Popen[bytes] | None:
    """The wandb-core process this process started (None where it cannot be found); wandb
    has no public handle on it, see `otel_train._sdk_compat.wandb_service_process`."""
    return wandb_service_process()
