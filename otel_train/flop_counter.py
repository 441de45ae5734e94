"""Measured FLOPs: torch's FlopCounterMode around ONE training step, cached, never again.

A forward pre-hook on the model enters the counter at the first forward of a step and leaves
it at the first forward after `tel.step()` moved on, so forward, backward and every gradient
accumulation micro-batch of that step are counted. The result is reported as
`perf.actual_flops` (FLOPs of one optimizer step on this rank). Re-measuring every N steps
(`every_n_steps=`) makes those steps several times slower: use it for debugging only.
torch 2.13's counter misses CPU attention; `flop_counter_mode()` adds it (pytorch#195460).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from otel_train.errors import OtelTrainError

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry

_logger = logging.getLogger(__name__)


def _cpu_attention_formulas() -> dict[Any, Any]:
    """torch's own SDPA formulas for the CPU flash-attention ops it does not register: on
    CPU, `scaled_dot_product_attention` (and so `nn.MultiheadAttention`) dispatches to
    `_scaled_dot_product_flash_attention_for_cpu`, counted as 0 FLOPs (pytorch/pytorch#195460)."""
    import torch
    from torch.utils import flop_counter

    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    count = getattr(flop_counter, "sdpa_flop_count", None)
    count_backward = getattr(flop_counter, "sdpa_backward_flop_count", None)
    registry = getattr(flop_counter, "flop_registry", {})
    if None in (forward, backward, count, count_backward) or forward in registry:
        return {}  # an older torch without the op, or a newer one that counts it already

    def forward_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
        return int(count(query, key, value))  # type: ignore[misc]

    def backward_flops(
        grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any
    ) -> int:
        return int(count_backward(grad_out, query, key, value))  # type: ignore[misc]

    return {forward: forward_flops, backward: backward_flops}


def flop_counter_mode(*, display: bool = False) -> Any:
    """torch's `FlopCounterMode`, counting CPU attention too (see `_cpu_attention_formulas`)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError as error:
        raise ImportError('measure_flops needs torch: pip install "otel-train[torch]"') from error
    return FlopCounterMode(display=display, custom_mapping=_cpu_attention_formulas())


class StepFlopCounter:
    """Counts the FLOPs of the first training step of `model` (and every N-th, if asked)."""

    def __init__(self, telemetry: Telemetry, model: Any, *, every_n_steps: int | None = None):
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
        ):
            raise OtelTrainError(f"measure_flops every_n_steps must be an int, got {every_n_steps}")
        flop_counter_mode()  # fails here, at setup, when torch is missing
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
            self._mode = flop_counter_mode()
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

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._mode is not None and self._telemetry.last_step != self._measuring_step:
            return ()  # the measured step ended but no forward has closed it yet
        if self.flops_per_step is None:
            return ()
        return (Observation(self.flops_per_step),)
