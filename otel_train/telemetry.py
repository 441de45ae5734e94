"""`Telemetry`: the one object a training loop talks to. `step(n)` is the only clock.

Non-sampled steps cost a compare and a clock read. Sampled steps resolve staged values (one
device->host transfer per device), record them into OTel instruments, derive rates, and hand
the due groups to the step-sampled reader, whose exporters run on their own threads.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation, _Gauge
from opentelemetry.sdk.metrics import MeterProvider

from otel_train.errors import OtelTrainError, StepOrderError
from otel_train.instruments import TrainingInstruments
from otel_train.nonfinite import NonFiniteValue
from otel_train.rates import RateTracker, ThroughputSettings
from otel_train.reader import StepSampledReader
from otel_train.reduction import CrossRankReducer
from otel_train.run_context import RunContext
from otel_train.sampling import GroupIndex
from otel_train.staging import Resolved, resolve, safe_exp

_logger = logging.getLogger("otel_train")

# Groups whose instruments are fed from staged values: only these force a resolution.
_STAGED_GROUPS = frozenset({"train", "perf"})
# Step durations wait for the next perf-sampled step, where they go into the histogram (each
# SDK record costs microseconds: that work belongs to sampled steps). Past this many (perf
# interval longer than this, or perf made an event group) they are recorded in one go.
_MAX_BUFFERED_STEP_TIMES = 65_536


class Telemetry:
    """Built by `otel_train.setup()`. A context manager; `shutdown()` is idempotent."""

    def __init__(
        self,
        *,
        provider: MeterProvider,
        reader: StepSampledReader,
        groups: GroupIndex,
        context: RunContext,
        throughput: ThroughputSettings,
        clock: Callable[[], float],
        shutdown_timeout_millis: float,
        resume_step: int = 0,
        reducer: CrossRankReducer | None = None,
    ) -> None:
        self.provider = provider
        self.reader = reader
        self.context = context
        self._groups = groups
        self._clock = clock
        self._shutdown_timeout_millis = shutdown_timeout_millis
        self._meter = provider.get_meter("otel_train")
        self.training = TrainingInstruments(self._meter)
        self._event_gauges: dict[str, _Gauge] = {}
        self._lock = threading.RLock()  # sampled steps vs. evaluate() from another thread
        self._pid = os.getpid()
        self._closed = False
        self._start_time = clock()
        self._start_wall = time.time()
        self._last_step = resume_step
        self._resumed = resume_step > 0
        self._last_step_time: float | None = None
        self._step_durations: list[float] = []
        self._next_due = groups.next_due_step(resume_step)
        self._tokens_total = 0.0
        self._samples_total = 0.0
        self._last_exported_step = resume_step
        self._rates = RateTracker(throughput, start_time=self._start_time, start_step=resume_step)
        self._best_eval_loss = math.inf
        self._best_perplexity = math.inf
        self._last_loss: float | None = None
        self._epoch_start = (self._start_time, resume_step, 0.0, 0.0)
        # A running sum, not a list: a run that never ends an epoch must not grow per step.
        self._epoch_loss_sum = 0.0
        self._epoch_loss_count = 0
        self._epochs_ended = 0
        self._warned_negative = False
        self._reducer = reducer  # reduce_across_ranks=True: one all_reduce per sampled step
        self._register_health_instruments()

    # -- public surface -------------------------------------------------------------------
    @property
    def meter(self) -> Meter:
        """A plain OTel Meter: instruments made here follow the matching SamplingView."""
        return self._meter

    @property
    def last_step(self) -> int:
        return self._last_step

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def step(self, step: int) -> None:
        """Advance the clock to `step` (the optimizer step just finished). Hot path."""
        if type(step) is not int:
            step = _coerce_step(step)
        last = self._last_step
        if step <= last:
            if step == last:
                return
            raise StepOrderError(
                f"step() went backwards: {step} after {last}. Steps must increase; after "
                f"loading a checkpoint call tel.resume_from({step - 1}) first."
            )
        now = self._clock()
        if self._last_step_time is not None:
            self._step_durations.append(now - self._last_step_time)
        self._last_step_time = now
        self._last_step = step
        if step >= self._next_due:
            self._sampled_step(last, step, now)
        elif len(self._step_durations) > _MAX_BUFFERED_STEP_TIMES:
            self._flush_step_durations()

    def resume_from(self, step: int) -> None:
        """Continue the step axis from `step` (the last step a restored checkpoint finished)."""
        with self._lock:
            self._last_step = step
            self._resumed = True
            self._last_step_time = None
            self._step_durations.clear()
            self._next_due = self._groups.next_due_step(step)
            self._rates.rebase(
                time=self._clock(),
                step=step,
                tokens=self._tokens_total,
                samples=self._samples_total,
            )

    def evaluate(self, loss: Any = None, *, metrics: Mapping[str, Any] | None = None) -> None:
        """Export `eval.loss`, `eval.perplexity`, `eval.best_perplexity` (+ `eval.<name>` for
        each extra metric) now, on the current step. Values may be tensors (synced once)."""
        if self._closed_or_forked():
            return
        with self._lock:
            staged = {f"eval.{name}": value for name, value in (metrics or {}).items()}
            if loss is not None:
                staged["eval.loss"] = loss
            values = resolve(staged, ()).gauges
            if "eval.loss" in values:
                eval_loss = values["eval.loss"]
                perplexity = safe_exp(eval_loss)
                values["eval.perplexity"] = perplexity
                if math.isfinite(eval_loss):
                    self._best_eval_loss = min(self._best_eval_loss, eval_loss)
                    self._best_perplexity = min(self._best_perplexity, perplexity)
                if math.isfinite(self._best_perplexity):
                    values["eval.best_perplexity"] = self._best_perplexity
            self._export_event("eval", values)

    def end_epoch(self, epoch: int | float | None = None) -> None:
        """Export `epoch.*` summaries of the epoch that just ended (one sync, it is an event)."""
        if self._closed_or_forked():
            return
        with self._lock:
            self._resolve_and_record()
            now = self._clock()
            start_time, start_step, start_tokens, start_samples = self._epoch_start
            duration = max(now - start_time, 0.0)
            self._epochs_ended += 1
            values = {
                "epoch.number": float(epoch if epoch is not None else self._epochs_ended),
                "epoch.steps": float(self._last_step - start_step),
                "epoch.tokens": self._tokens_total - start_tokens,
                "epoch.samples": self._samples_total - start_samples,
                "epoch.duration": duration,
            }
            if duration > 0:
                values["epoch.tokens_per_second"] = values["epoch.tokens"] / duration
            if self._epoch_loss_count:
                values["epoch.train_loss_mean"] = self._epoch_loss_sum / self._epoch_loss_count
            self._epoch_start = (now, self._last_step, self._tokens_total, self._samples_total)
            self._epoch_loss_sum, self._epoch_loss_count = 0.0, 0
            self._export_event("epoch", values)

    def flush(self, timeout_millis: float = 10_000) -> bool:
        """Wait until everything exported so far has reached every exporter."""
        return self.reader.wait_idle(timeout_millis)

    def export_stats(self) -> dict[str, dict[str, int]]:
        """Per exporter: batches exported, dropped (queue full) and failed."""
        return {
            worker.name: {
                "exported": worker.exported,
                "dropped": worker.dropped,
                "failed": worker.failed,
            }
            for worker in self.reader.exporters
        }

    def shutdown(self, timeout_millis: float | None = None) -> None:
        """Export what is pending and `final.*`, flush every exporter, stop. Bounded in time."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:
                return  # a forked child owns none of the exporters
            budget = self._shutdown_timeout_millis if timeout_millis is None else timeout_millis
            try:
                if self._last_step > self._last_exported_step:
                    periodic = frozenset(self._groups.periodic_groups())
                    self._export_groups(periodic, self._last_step, self._clock())
                self._export_event("final", self._final_values())
            except OtelTrainError as error:
                _logger.error("otel-train: could not export the last values at shutdown: %s", error)
            self.reader.shutdown(timeout_millis=budget)
            try:
                self.provider.shutdown(timeout_millis=max(budget / 4, 100))
            except Exception as error:  # pull readers' servers; never raise at exit
                _logger.warning("otel-train: meter provider shutdown: %r", error)

    # -- sampled steps --------------------------------------------------------------------
    def _sampled_step(self, previous: int, step: int, now: float) -> None:
        with self._lock:
            if self._closed_or_forked():
                return
            due = self._groups.groups_due(previous, step)
            self._next_due = self._groups.next_due_step(step)
            if due:
                self._export_groups(due, step, now, across_ranks=True)

    def _export_groups(
        self, due: frozenset[str], step: int, now: float, *, across_ranks: bool = False
    ) -> None:
        if due & _STAGED_GROUPS:
            self._resolve_and_record(across_ranks=across_ranks)
        self.training.global_step.set(step)
        if "perf" in due:
            self._flush_step_durations()
            rates = self._rates.derive(
                step=step, now=now, tokens=self._tokens_total, samples=self._samples_total
            )
            for name, value in rates.items():
                self._gauge(name).set(value)
        self._last_exported_step = step
        self.reader.export_groups(due)

    def _resolve_and_record(self, *, across_ranks: bool = False) -> None:
        training = self.training
        resolved: Resolved = resolve(
            training.staged_gauges, (training.staged_tokens, training.staged_samples)
        )
        # Only on step-sampled exports, which every rank reaches: never at shutdown or in an
        # event, where a peer may already be gone and a collective would hang.
        if across_ranks and self._reducer is not None:
            resolved = self._reducer.reduce(resolved)
        gauges = resolved.gauges
        if "train.loss" in gauges:
            gauges["train.perplexity"] = safe_exp(gauges["train.loss"])
            if math.isfinite(gauges["train.loss"]):
                self._last_loss = gauges["train.loss"]
                self._epoch_loss_sum += gauges["train.loss"]
                self._epoch_loss_count += 1
        nonfinite = self._set_gauges(gauges)
        for name, increment in resolved.counter_increments.items():
            if not math.isfinite(increment) or increment < 0:
                self._warn_bad_increment(name, increment)
                continue
            counter = training.tokens if name == "train.tokens" else training.samples
            counter.add(increment)
            if name == "train.tokens":
                self._tokens_total += increment
            else:
                self._samples_total += increment
        if nonfinite:
            training.nonfinite.add(nonfinite)

    def _flush_step_durations(self) -> None:
        durations, self._step_durations = self._step_durations, []
        record = self.training.step_time.record
        for duration in durations:
            record(duration)

    def _export_event(self, group: str, values: Mapping[str, float]) -> None:
        self._set_gauges(values)
        self.training.global_step.set(self._last_step)
        self.reader.export_groups(frozenset({group}))

    def _set_gauges(self, values: Mapping[str, float]) -> int:
        """Finite values go to the SDK; non-finite ones to the board every reader patches
        from (the SDK would drop them and keep showing the previous value). Returns how
        many were non-finite."""
        board = self.reader.nonfinite
        nonfinite = 0
        for name, value in values.items():
            if math.isfinite(value):
                self._gauge(name).set(value)
                board.clear(name)
            else:
                board.mark(self._nonfinite_value(name, value))
                nonfinite += 1
        return nonfinite

    def _final_values(self) -> dict[str, float]:
        values = {
            "final.total_steps": float(self._last_step),
            "final.total_tokens": self._tokens_total,
            "final.total_samples": self._samples_total,
            "final.wall_time": time.time() - self._start_wall,
        }
        if math.isfinite(self._best_perplexity):
            values["final.best_perplexity"] = self._best_perplexity
            values["final.best_eval_loss"] = self._best_eval_loss
        if self._last_loss is not None:
            values["final.train_loss"] = self._last_loss
        return values

    # -- helpers --------------------------------------------------------------------------
    def _register_health_instruments(self) -> None:
        """Exporter drops and failures as counters: visible where the other metrics are."""

        def observe(attribute: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                # Every exporter, 0 included: a counter that only appears at the first
                # failure leaves "failures so far" panels without data.
                return [
                    Observation(getattr(worker, attribute), {"exporter": worker.name})
                    for worker in self.reader.exporters
                ]

            return self.reader.sampled_callback("health", callback)

        self._meter.create_observable_counter(
            "otel_train.export.dropped",
            callbacks=[observe("dropped")],
            unit="{batch}",
            description="Batches an exporter dropped because its queue was full",
        )
        self._meter.create_observable_counter(
            "otel_train.export.failed",
            callbacks=[observe("failed")],
            unit="{batch}",
            description="Batches an exporter failed to deliver",
        )

    def _gauge(self, name: str) -> _Gauge:
        """Standard gauges by name; event/extra gauges created once on first use."""
        gauge = self._event_gauges.get(name)
        if gauge is None:
            gauge = _STANDARD_GAUGES.get(name, lambda t: None)(self.training)
            if gauge is None:
                unit = "s" if name.endswith(("_time", ".duration", ".wall_time")) else ""
                gauge = self._meter.create_gauge(name, unit=unit, description=_describe(name))
            self._event_gauges[name] = gauge
        return gauge

    def _nonfinite_value(self, name: str, value: float) -> NonFiniteValue:
        gauge = self._gauge(name)
        return NonFiniteValue(
            instrument_name=name,
            description=getattr(gauge, "description", "") or _describe(name),
            unit=getattr(gauge, "unit", "") or "",
            value=value,
        )

    def _warn_bad_increment(self, name: str, increment: float) -> None:
        if not self._warned_negative:
            self._warned_negative = True
            _logger.error(
                "otel-train: %s got an increment of %s from a tensor; counters take per-step "
                "amounts >= 0. The value was dropped (later ones are dropped silently).",
                name,
                increment,
            )

    def _disable_in_forked_child(self) -> None:
        """Called in a forked child (os.register_at_fork): export nothing, take no lock the
        parent's threads may have held at the fork."""
        self._lock = threading.RLock()
        self._closed = True
        self.training.enabled = False

    def _closed_or_forked(self) -> bool:
        if self._closed:
            return True
        if os.getpid() != self._pid:
            # A DataLoader worker (fork) must never export or touch the parent's exporters.
            self._closed = True
            self.training.enabled = False
            return True
        return False


def _coerce_step(step: Any) -> int:
    if isinstance(step, bool):
        raise OtelTrainError(f"step() takes an int step number, got {step!r}")
    try:
        import operator

        return operator.index(step)
    except TypeError:
        raise OtelTrainError(
            f"step() takes an int step number, got {type(step).__name__}; pass the optimizer "
            "step as a Python int (a tensor here would force a device sync)"
        ) from None


_STANDARD_GAUGES: dict[str, Callable[[TrainingInstruments], _Gauge]] = {
    "train.loss": lambda t: t.loss,
    "train.learning_rate": lambda t: t.learning_rate,
    "train.grad_norm": lambda t: t.grad_norm,
    "train.epoch": lambda t: t.epoch,
    "train.perplexity": lambda t: t.perplexity,
    "perf.tokens_per_second": lambda t: t.tokens_per_second,
    "perf.samples_per_second": lambda t: t.samples_per_second,
    "perf.steps_per_second": lambda t: t.steps_per_second,
    "perf.eta": lambda t: t.eta,
    "perf.flops_per_second": lambda t: t.flops_per_second,
    "perf.mfu": lambda t: t.mfu,
}

_DESCRIPTIONS = {
    "eval.loss": "Evaluation loss",
    "eval.perplexity": "exp(evaluation loss)",
    "eval.best_perplexity": "Lowest evaluation perplexity so far",
    "epoch.number": "Epoch that just ended",
    "epoch.steps": "Optimizer steps in the epoch",
    "epoch.tokens": "Tokens in the epoch",
    "epoch.samples": "Samples in the epoch",
    "epoch.duration": "Wall time of the epoch",
    "epoch.tokens_per_second": "Mean tokens per second over the epoch",
    "epoch.train_loss_mean": "Mean of the sampled training losses of the epoch",
    "final.total_steps": "Steps at the end of the run",
    "final.total_tokens": "Tokens over the run",
    "final.total_samples": "Samples over the run",
    "final.wall_time": "Wall time from setup to shutdown",
    "final.best_perplexity": "Lowest evaluation perplexity of the run",
    "final.best_eval_loss": "Lowest evaluation loss of the run",
    "final.train_loss": "Last finite sampled training loss",
}


def _describe(name: str) -> str:
    return _DESCRIPTIONS.get(name) or f"{name} (recorded by otel-train)"
