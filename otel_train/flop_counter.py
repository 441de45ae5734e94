"""Measured FLOPs: torch's FlopCounterMode around ONE training step, cached, never again.

A forward pre-hook on the model enters the counter at the first forward of a step and leaves
it at the first forward after `tel.step()` moved on, so forward, backward and every gradient
accumulation micro-batch of that step are counted. The result is reported as
`perf.actual_flops` (FLOPs of one optimizer step on this rank). Re-measuring every N steps
(`every_n_steps=`) makes those steps several times slower: use it for debugging only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from otel_train.errors import OtelTrainError

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry

_logger = logging.getLogger("otel_train.flop_counter")


class StepFlopCounter:
    """Counts the FLOPs of the first training step of `model` (and every N-th, if asked)."""

    def __init__(self, telemetry: Telemetry, model: Any, *, every_n_steps: int | None = None):
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
        ):
            raise OtelTrainError(f"measure_flops every_n_steps must be an int, got {every_n_steps}")
        try:
            from torch.utils.flop_counter import FlopCounterMode
        except ImportError as error:
            raise ImportError(
                'measure_flops needs torch: pip install "otel-train[torch]"'
            ) from error
        self._mode_type = FlopCounterMode
        self._telemetry = telemetry
        self._every = every_n_steps
        self._mode: Any = None
        self._measuring_step: int | None = None  # tel.last_step when counting began
        self._next_measure_after = telemetry.last_step  # measure the step after this one
        self.flops_per_step: int | None = None
        self.measurements = 0
        self._hook = model.register_forward_pre_hook(self._before_forward)
        telemetry.meter.create_observable_gauge(
            "perf.actual_flops",
            callbacks=[telemetry.reader.sampled_callback("perf", self._observe)],
            unit="{flop}",
            description="FLOPs of one optimizer step on this rank, measured by torch",
        )

    def _before_forward(self, module: Any, args: Any) -> None:
        last = self._telemetry.last_step
        if self._mode is not None:
            if last == self._measuring_step:
                return  # another micro-batch of the step being measured
            self._finish()
        if (
            self._measuring_step is None
            and last >= self._next_measure_after
            and (self.flops_per_step is None or self._every is not None)
        ):
            self._mode = self._mode_type(display=False)
            self._mode.__enter__()
            self._measuring_step = last

    def _finish(self) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        self.flops_per_step = int(mode.get_total_flops())
        self.measurements += 1
        measured = self._measuring_step or 0
        self._measuring_step = None
        if self._every is None:
            self._hook.remove()  # measured once: the model carries no hook any more
            self._next_measure_after = 2**62
        else:
            self._next_measure_after = measured + self._every
        _logger.info(
            "otel-train: measured %.4g FLOPs per step (step %d)", self.flops_per_step, measured + 1
        )

    def finish_if_measuring(self) -> None:
        """End a measurement still open (e.g. the run stopped after its first step)."""
        if self._mode is not None:
            self._finish()

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._mode is not None and self._telemetry.last_step != self._measuring_step:
            return ()  # the measured step ended but no forward has closed it yet
        if self.flops_per_step is None:
            return ()
        return (Observation(self.flops_per_step),)
