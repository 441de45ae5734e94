"""`Telemetry`: the one object a training loop talks to. `step(n)` is the only clock.

Non-sampled steps cost a compare and a clock read. Sampled steps detach the due groups'
staged values and start their one device->host transfer per device, then hand the step to the
finisher thread (`otel_train.finisher`): once the copy has completed (at once on the CPU; on
CUDA when its event has) the values go into the streams, rates are derived, and the due
groups' metrics, labelled with the sampled step, go to the step-sampled reader, whose
exporters run on their own threads. Events, flush and shutdown drain the finisher first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

from otel_train import events
from otel_train.catalog import CROSS_ENTROPY_STAGES
from otel_train.errors import OtelTrainError, StepOrderError
from otel_train.export_guard import ExportGuard
from otel_train.finisher import SampledStepFinisher
from otel_train.grouped import check_names, grouped_instrument
from otel_train.instruments import TrainingInstruments
from otel_train.rates import IntervalListener, RateTracker, ThroughputSettings
from otel_train.reader import StepSampledReader
from otel_train.reduction import CrossRankReducer
from otel_train.run_context import RunContext
from otel_train.sampled_export import SampledExports
from otel_train.sampling import GroupIndex
from otel_train.series import StreamSet
from otel_train.signals import signals_deferred
from otel_train.staged_meter import StagedMeterProvider
from otel_train.staging_registry import registry_for
from otel_train.summaries import RunSummaries

_logger = logging.getLogger(__name__)

# Step durations wait for the next perf-sampled step, where they go into the histogram (each
# SDK record costs microseconds: that work belongs to sampled steps). Past this many (perf
# interval longer than this, or perf made an event group) they are recorded in one go.
_MAX_BUFFERED_STEP_TIMES = 65_536
# Events and resume wait at most this long for the sampled steps before them (normally
# microseconds: a step's copy and export work).
_DRAIN_TIMEOUT_SECONDS = 10.0


class Telemetry:
    """Built by `otel_train.setup()`. A context manager; `shutdown()` is idempotent."""

    def __init__(
        self,
        *,
        provider: SdkMeterProvider,
        reader: StepSampledReader,
        groups: GroupIndex,
        context: RunContext,
        throughput: ThroughputSettings,
        clock: Callable[[], float],
        shutdown_timeout_millis: float,
        resume_step: int = 0,
        reducer: CrossRankReducer | None = None,
        max_attribute_sets: int = 200,
        perplexity: bool | None = None,
        resource: Any = None,
        needs_sdk: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.provider = provider
        self.reader = reader
        self.context = context
        self._groups = groups
        self._clock = clock
        self._shutdown_timeout_millis = shutdown_timeout_millis
        self._registry = registry_for(provider, groups, max_attribute_sets, resource, needs_sdk)
        self._meter_provider = StagedMeterProvider(self._registry, provider)
        self._meter = self._meter_provider.get_meter("otel_train")
        if perplexity is None:  # exp(loss) means something only for a token cross-entropy
            perplexity = context.stage in CROSS_ENTROPY_STAGES
        self.training = TrainingInstruments(self._meter, self._registry, perplexity=perplexity)
        self._guard = guard = ExportGuard(self.training)
        self._busy = guard.busy
        self._closed_or_forked = guard.closed_or_forked
        start = clock()
        self._last_step = resume_step
        self._last_step_time: float | None = None
        self._step_durations: list[float] = []
        self._next_due = groups.next_due_step(resume_step)
        self._last_exported_step = resume_step
        self._rates = RateTracker(throughput, start_time=start, start_step=resume_step)
        self.summaries = RunSummaries(
            start_time=start, start_step=resume_step, perplexity=perplexity
        )
        self._reducer = reducer  # reduce_across_ranks=True: one all_reduce per sampled step
        self._exports = SampledExports(
            provider=provider,
            reader=reader,
            registry=self._registry,
            training=self.training,
            summaries=self.summaries,
            rates=self._rates,
            reducer=reducer,
        )
        # Sampled steps in flight, finished in order on their own thread.
        self._finisher = SampledStepFinisher(self._exports.finish)
        self._warned_slow_drain = False

    @property
    def meter(self) -> Meter:
        """An OTel Meter whose synchronous instruments are step-staged (tensors welcome)."""
        return self._meter

    @property
    def meter_provider(self) -> MeterProvider:
        """For library code: `opentelemetry.metrics.set_meter_provider(tel.meter_provider)`."""
        return self._meter_provider

    @property
    def streams(self) -> StreamSet:
        """The values otel-train aggregates itself (every reader gets them)."""
        return self._registry.streams

    @property
    def last_step(self) -> int:
        return self._last_step

    def interval(self, group: str) -> int | None:
        """Steps between exports of `group` (None: an event group, or no such group)."""
        return self._groups.intervals.get(group)

    @property
    def perplexity(self) -> bool:
        """Whether train/eval perplexity is derived from the loss (cross-entropy stages)."""
        return self.summaries.perplexity

    @perplexity.setter
    def perplexity(self, enabled: bool) -> None:
        """Integrations that learn the real stage (a TRL DPOConfig) switch it off."""
        self.summaries.perplexity = bool(enabled)

    def add_interval_listener(self, listener: IntervalListener) -> None:
        """Be told each perf interval's tokens as it ends (e.g. GPU energy per token)."""
        self._rates.listeners.append(listener)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def record(self, values: Mapping[str, Any] | None = None, /, **standard: Any) -> None:
        """Shortcut onto the standard instruments and any named one; see TrainingInstruments."""
        self.training.record(values, **standard)

    def record_by_group(
        self,
        name: str,
        values: Any,
        groups: Any,
        names: Sequence[str],
        *,
        attribute: str = "dataset",
    ) -> None:
        """Per-group interval means (`<name>{dataset=...}`) from per-sample `values` and
        their group indices into `names`, summed on the device: no sync, no Python loop."""
        instrument = grouped_instrument(self._registry, name, attribute)
        instrument.stage(values, groups, check_names(names))

    def sampled_callback(
        self, group: str, callback: Callable[[CallbackOptions], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """Wrap an observable callback so it only runs on steps where `group` is exported."""
        return self.reader.sampled_callback(group, callback)

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
        with self._busy():
            self._finish_pending()
            self._last_step = step
            self._last_step_time = None
            self._step_durations.clear()
            self._next_due = self._groups.next_due_step(step)
            self._exports.rebase_rates(time=self._clock(), step=step)

    def evaluate(self, loss: Any = None, *, metrics: Mapping[str, Any] | None = None) -> None:
        """Export `eval.loss` (+ `eval.perplexity`, `eval.best_perplexity` for cross-entropy
        stages, + `eval.<name>` per extra metric) now, on the current step. Tensors are fine
        (synced once: it is an event)."""
        if self._closed_or_forked():
            return
        with self._busy():
            self._finish_pending()
            events.export_eval(self._exports, self._last_step, loss, metrics)

    def end_epoch(self, epoch: int | float | None = None) -> None:
        """Export `epoch.*` summaries of the epoch that just ended (one sync: an event)."""
        if self._closed_or_forked():
            return
        with self._busy():
            self._finish_pending()
            events.export_epoch(self._exports, self._last_step, self._clock, epoch)

    def flush(self, timeout_millis: float = 10_000) -> bool:
        """Wait until everything exported so far has reached every exporter (a sampled step
        whose values are still on their way from the device is exported first)."""
        deadline = time.monotonic() + timeout_millis / 1000
        # The whole of it defers a signal: its flush needs the queues' locks this thread
        # holds while waiting (bounded by this flush's own timeout).
        with signals_deferred():
            with self._busy():
                if not self._closed_or_forked():
                    self._finisher.drain(timeout_millis / 1000)
            return self.reader.wait_idle(max(0.0, deadline - time.monotonic()) * 1000)

    def export_stats(self) -> dict[str, dict[str, int]]:
        """Per exporter: batches exported, dropped (queue full) and failed, counting every
        sampled step so far (the ones still being finished are handed over first)."""
        with signals_deferred():
            self._finisher.drain(_DRAIN_TIMEOUT_SECONDS)
            return self._exports.export_stats()

    def shutdown(self, timeout_millis: float | None = None) -> None:
        """Export what is pending (every value recorded since the last sampled step) and
        `final.*`, flush every exporter, stop. Bounded in time."""
        with self._busy():
            if self._guard.closed:
                return
            self._guard.closed = True
            if os.getpid() != self._guard.pid:
                return  # a forked child owns none of the exporters
            budget = self._shutdown_timeout_millis if timeout_millis is None else timeout_millis
            deadline = time.monotonic() + budget / 1000
            try:
                self._finisher.drain(budget / 1000)  # the steps in flight, within the budget
                periodic = frozenset(self._groups.periodic_groups())
                if self._last_step > self._last_exported_step or self._registry.pending_in(
                    periodic
                ):
                    self._begin_export(periodic, self._last_step, self._clock())
                self._finisher.stop(max(0.0, deadline - time.monotonic()))
                events.export_final(self._exports, self._last_step)
            except OtelTrainError as error:
                _logger.error("otel-train: could not export the last values at shutdown: %s", error)
            self._exports.close(max(0.0, deadline - time.monotonic()) * 1000)
            from otel_train.process_hooks import untrack

            untrack(self)

    def _sampled_step(self, previous: int, step: int, now: float) -> None:
        with self._busy():
            if self._closed_or_forked():
                return
            due = self._groups.groups_due(previous, step)
            self._next_due = self._groups.next_due_step(step)
            if due:
                self._begin_export(due, step, now, across_ranks=True)

    def _begin_export(
        self, due: frozenset[str], step: int, now: float, *, across_ranks: bool = False
    ) -> None:
        """Detach the due values, start their transfer, hand the rest to the finisher."""
        durations = None
        if "perf" in due:
            durations, self._step_durations = self._step_durations, []
        self._last_exported_step = step
        self._finisher.submit(
            self._exports.begin(due, step, now, durations, across_ranks=across_ranks)
        )

    def _finish_pending(self) -> None:
        """Export every sampled step still in flight (its copy waited for: normally done),
        so that what is exported next (an event, the tail) comes after them."""
        if not self._finisher.drain(_DRAIN_TIMEOUT_SECONDS):
            self._warn_slow_drain()

    def _warn_slow_drain(self) -> None:
        if not self._warned_slow_drain:
            self._warned_slow_drain = True
            _logger.warning(
                "otel-train: sampled steps were still being exported after %.0f s; going on "
                "without waiting for them (an observable callback or exporter hook is slow?)",
                _DRAIN_TIMEOUT_SECONDS,
            )

    def _flush_step_durations(self) -> None:
        with self._busy():
            durations, self._step_durations = self._step_durations, []
            with self._registry.streams.lock:
                self._exports.record_step_durations(durations)

    @property
    def _closed(self) -> bool:
        return self._guard.closed

    def _disable_in_forked_child(self) -> None:
        """Called in a forked child (os.register_at_fork): export nothing, take no lock the
        parent's threads may have held at the fork."""
        self._finisher.forget()  # the parent's steps in flight: not the child's to export
        self._guard.disable_in_forked_child()


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
