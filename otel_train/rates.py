"""Throughput, ETA and MFU from counter deltas between perf-sampled steps and the clock.

Rates over the interval since the previous perf export (the first interval starts at
`setup()`), so a slow step shows up in the next sample instead of being averaged away over
the whole run. Achieved FLOP/s = trained tokens/s x FLOPs per trained token + generated
tokens/s x FLOPs per generated token (PPO / GRPO rollouts, forward only; see
`otel_train.model_flops`); MFU = achieved / peak FLOP/s of this rank's devices (PaLM,
Chowdhery et al. 2022, appendix B). A number that cannot be known is left out, never 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

_logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputSettings:
    """What MFU needs; None leaves the metric out rather than guessing."""

    total_steps: int | None = None
    flops_per_token: float | None = None  # per trained token (record(tokens=))
    # Per generated token (counter train.generation_tokens): stages with a rollout (PPO, GRPO).
    generation_flops_per_token: float | None = None
    peak_flops: float | None = None  # FLOP/s of all devices this rank drives, dense
    # From the effective batch (setup(deepspeed_config=/batch_size=, seq_len=)): this rank's
    # samples per optimizer step, used when the loop records no samples / tokens itself.
    samples_per_step: float | None = None
    tokens_per_sample: float | None = None


@dataclass(frozen=True, slots=True)
class RunTotals:
    """Tokens and samples of the run so far; None where they were never counted."""

    tokens: float | None
    samples: float | None


class IntervalListener(Protocol):
    """Told the tokens of each perf interval as it ends (e.g. GPU energy per token)."""

    def interval_ended(self, tokens: float) -> None: ...

    def interval_restarted(self) -> None: ...


class RateTracker:
    """Remembers the last perf sample (step, time, totals) and derives rates from deltas.

    Tokens are known when the loop recorded some (`record(tokens=)`), or from samples
    (recorded, or the effective batch per step) x `seq_len`; without either, tokens/s,
    FLOP/s and MFU are left out and one warning names the options that give them.
    """

    def __init__(self, settings: ThroughputSettings, *, start_time: float, start_step: int) -> None:
        self.settings = settings
        self._last_time = start_time
        self._last_step = start_step
        self._last_tokens = 0.0
        self._last_samples = 0.0
        self._last_generation_tokens = 0.0
        self._steps_counted = 0  # steps of this process folded into perf samples so far
        self._mfu_off = False  # set once an MFU above 1 showed the configuration is wrong
        self._mfu_exported = False
        self._warned: set[str] = set()
        self.listeners: list[IntervalListener] = []

    def rebase(
        self,
        *,
        time: float,
        step: int,
        tokens: float,
        samples: float,
        generation_tokens: float = 0.0,
    ) -> None:
        """Start the next interval here (after a resume, or a pause the user excluded)."""
        self._start_interval(
            time=time,
            step=step,
            tokens=tokens,
            samples=samples,
            generation_tokens=generation_tokens,
        )
        for listener in self.listeners:
            listener.interval_restarted()

    def _start_interval(
        self, *, time: float, step: int, tokens: float, samples: float, generation_tokens: float
    ) -> None:
        self._last_time, self._last_step = time, step
        self._last_tokens, self._last_samples = tokens, samples
        self._last_generation_tokens = generation_tokens

    def totals(self, *, step: int, tokens: float, samples: float) -> RunTotals:
        """The run's tokens and samples (for `final.*`): the recorded totals, else derived
        from the effective batch over the steps this process ran; None when unknown.

        `tokens` / `samples` are the recorded totals (0 when the loop recorded none).
        """
        steps = self._steps_counted + max(0, step - self._last_step)
        per_step = self.settings.samples_per_step
        samples_total = samples if samples > 0 else (steps * per_step if per_step else None)
        return RunTotals(tokens=self._tokens_from(tokens, samples_total), samples=samples_total)

    def _tokens_from(self, recorded: float, samples: float | None) -> float | None:
        """Recorded tokens when any were recorded in the run; else samples x tokens/sample."""
        if recorded > 0:
            return recorded
        per_sample = self.settings.tokens_per_sample
        if samples is not None and per_sample:
            return samples * per_sample
        return None

    def derive(
        self,
        *,
        step: int,
        now: float,
        tokens: float,
        samples: float,
        generation_tokens: float = 0.0,
        ranks: int = 1,
    ) -> dict[str, float]:
        """Rates of the interval since the last call; `tokens`, `samples`,
        `generation_tokens` are the run's recorded totals; `ranks`: how many ranks' work the
        totals hold (the cross-rank sum on rank 0), so MFU divides by that many peaks."""
        elapsed = now - self._last_time
        steps = step - self._last_step
        if elapsed <= 0 or steps <= 0:
            return {}
        settings = self.settings
        rates = {"perf.steps_per_second": steps / elapsed}
        new_samples: float | None = samples - self._last_samples
        if samples <= 0:  # none recorded in the run: the effective batch, if known
            new_samples = steps * settings.samples_per_step if settings.samples_per_step else None
        if new_samples is not None:
            rates["perf.samples_per_second"] = new_samples / elapsed
        new_tokens = (
            tokens - self._last_tokens if tokens > 0 else self._tokens_from(0.0, new_samples)
        )
        if settings.total_steps is not None:
            remaining = max(0, settings.total_steps - step)
            rates["perf.eta"] = remaining / rates["perf.steps_per_second"]
        for listener in self.listeners:
            listener.interval_ended(new_tokens or 0.0)  # no token count: no per-token figure
        if new_tokens is None:
            self._warn_once("tokens", _NO_TOKENS)
        else:
            rates["perf.tokens_per_second"] = new_tokens / elapsed
            self._derive_flops(rates, elapsed, generation_tokens, ranks)
        self._steps_counted += steps
        self._start_interval(
            time=now,
            step=step,
            tokens=tokens,
            samples=samples,
            generation_tokens=generation_tokens,
        )
        return rates

    def _derive_flops(
        self, rates: dict[str, float], elapsed: float, generated: float, ranks: int
    ) -> None:
        settings = self.settings
        if not settings.flops_per_token:
            return
        achieved = rates["perf.tokens_per_second"] * settings.flops_per_token
        if settings.generation_flops_per_token:
            if generated > 0:
                new_generated = generated - self._last_generation_tokens
                achieved += new_generated / elapsed * settings.generation_flops_per_token
            else:
                self._warn_once("generation", _NO_GENERATION_TOKENS)
        rates["perf.flops_per_second"] = achieved
        if not settings.peak_flops:
            return
        utilisation = achieved / (settings.peak_flops * ranks)
        if utilisation <= 1.0 and not self._mfu_off:
            rates["perf.mfu"] = utilisation
            self._mfu_exported = True
            return
        if self._mfu_exported:
            # NaN, exported as null: a gauge left unset would repeat its last value.
            rates["perf.mfu"] = math.nan
        if self._mfu_off:
            return
        # Above 100% no hardware runs: the peak or the FLOPs count is wrong, so no MFU of
        # this run can be trusted; say so once with both numbers and stop exporting it.
        self._mfu_off = True
        _logger.error(
            "otel-train: configuration error, perf.mfu is not exported for this run: achieved "
            "%.4g FLOP/s is above the peak %.4g FLOP/s (MFU %.0f%%). Either the peak "
            "(setup(peak_flops=) / dtype= / OTEL_TRAIN_PEAK_FLOPS, per rank) is too low or the "
            "FLOPs per token (model= / seq_len= / stage= / flops_per_token=) too high.",
            achieved,
            settings.peak_flops,
            100.0 * utilisation,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _logger.warning(message)


_NO_TOKENS = (
    "otel-train: perf.tokens_per_second, perf.flops_per_second and perf.mfu are not exported: "
    "no token count. Record tel.training.record(tokens=<tokens this step>), or give "
    "setup(seq_len=...) with the batch size (batch_size= / micro_batch_size= / "
    "deepspeed_config=) or record(samples=...); with the Hugging Face Trainer set "
    "TrainingArguments(include_num_input_tokens_seen=True)."
)
_NO_GENERATION_TOKENS = (
    "otel-train: the rollout's generated tokens are not counted in perf.flops_per_second / "
    "perf.mfu (forward only, 2N per token): record them in the train.generation_tokens "
    "counter, tel.record({'train.generation_tokens': <tokens sampled this step>})."
)
