"""Throughput, ETA and MFU from counter deltas between perf-sampled steps and the clock.

Rates over the interval since the previous perf export (the first interval starts at
`setup()`), so a slow step shows up in the next sample instead of being averaged away over
the whole run. MFU = achieved FLOP/s / (peak FLOP/s of all devices of this rank), with
achieved FLOP/s = tokens/s x FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputSettings:
    """What MFU needs; None leaves the metric out rather than guessing."""

    total_steps: int | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None  # FLOP/s of all devices this rank drives, dense
    # From the effective batch (setup(deepspeed_config=/batch_size=, seq_len=)): this rank's
    # samples per optimizer step, used when the loop records no samples / tokens itself.
    samples_per_step: float | None = None
    tokens_per_sample: float | None = None


class IntervalListener(Protocol):
    """Told the tokens of each perf interval as it ends (e.g. GPU energy per token)."""

    def interval_ended(self, tokens: float) -> None: ...

    def interval_restarted(self) -> None: ...


class RateTracker:
    """Remembers the last perf sample (step, time, totals) and derives rates from deltas."""

    def __init__(self, settings: ThroughputSettings, *, start_time: float, start_step: int) -> None:
        self.settings = settings
        self._last_time = start_time
        self._last_step = start_step
        self._last_tokens = 0.0
        self._last_samples = 0.0
        self.listeners: list[IntervalListener] = []

    def rebase(self, *, time: float, step: int, tokens: float, samples: float) -> None:
        """Start the next interval here (after a resume, or a pause the user excluded)."""
        self._start_interval(time=time, step=step, tokens=tokens, samples=samples)
        for listener in self.listeners:
            listener.interval_restarted()

    def _start_interval(self, *, time: float, step: int, tokens: float, samples: float) -> None:
        self._last_time, self._last_step = time, step
        self._last_tokens, self._last_samples = tokens, samples

    def derive(self, *, step: int, now: float, tokens: float, samples: float) -> dict[str, float]:
        elapsed = now - self._last_time
        steps = step - self._last_step
        if elapsed <= 0 or steps <= 0:
            return {}
        settings = self.settings
        new_tokens, new_samples = tokens - self._last_tokens, samples - self._last_samples
        if settings.samples_per_step and new_samples == 0:
            new_samples = steps * settings.samples_per_step
        if settings.samples_per_step and settings.tokens_per_sample and new_tokens == 0:
            new_tokens = new_samples * settings.tokens_per_sample
        for listener in self.listeners:
            listener.interval_ended(new_tokens)
        rates = {
            "perf.tokens_per_second": new_tokens / elapsed,
            "perf.samples_per_second": new_samples / elapsed,
            "perf.steps_per_second": steps / elapsed,
        }
        if settings.total_steps is not None:
            remaining = max(0, settings.total_steps - step)
            rates["perf.eta"] = remaining / rates["perf.steps_per_second"]
        if settings.flops_per_token:
            achieved = rates["perf.tokens_per_second"] * settings.flops_per_token
            rates["perf.flops_per_second"] = achieved
            if settings.peak_flops:
                rates["perf.mfu"] = achieved / settings.peak_flops
        self._start_interval(time=now, step=step, tokens=tokens, samples=samples)
        return rates
