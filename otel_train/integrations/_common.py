"""What every framework adapter needs: a clock that moves after a step's values are in,
the train interval, and warnings said once."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from otel_train.errors import OtelTrainError

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry


class StepDriver:
    """Moves `tel.step()` for an adapter whose framework reports a step's values after the
    hook that ends it (HF's `on_log` after `on_step_end`, Lightning's loggers after
    `on_train_batch_end`): `defer(step)`, then `advance()` once they are recorded."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.pending: int | None = None

    def defer(self, step: int) -> None:
        self.pending = step

    def step(self, step: int) -> None:
        self.pending = None
        if step > self.telemetry.last_step:
            self.telemetry.step(step)

    def advance(self) -> None:
        if self.pending is not None:
            self.step(self.pending)


def train_interval(telemetry: Telemetry) -> int | None:
    """Steps between train-group exports (None: the train group is an event group)."""
    return telemetry.interval("train")


def warn_once(logger: logging.Logger, seen: set[str], what: str, message: str, *args: Any) -> None:
    """A problem inside a framework hook: logged once per adapter and kind, never raised."""
    if what not in seen:
        seen.add(what)
        logger.warning(message, *args)


def telemetry_factory(factory: Any, telemetry: Any) -> Any:
    """Adapters take a ready `telemetry=` or a `factory=` called in each process (default
    `otel_train.setup`), never both."""
    if factory is not None and telemetry is not None:
        raise OtelTrainError("pass factory= or telemetry=, not both")
    if factory is None and telemetry is None:
        import otel_train

        return otel_train.setup
    return factory
