"""`Telemetry`: the one object a training loop talks to. `step(n)` is the only clock.

Non-sampled steps cost a compare and a clock read. Sampled steps resolve the due groups'
staged values (one device->host transfer per device), record them into the SDK instruments,
derive rates, and hand the due groups to the step-sampled reader, whose exporters run on
their own threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

from otel_train import signals
from otel_train.catalog import BY_NAME, CROSS_ENTROPY_STAGES
from otel_train.errors import OtelTrainError, StepOrderError
from otel_train.grouped import check_names, grouped_instrument
from otel_train.instruments import TrainingInstruments
from otel_train.rates import IntervalListener, RateTracker, ThroughputSettings
from otel_train.reader import Freshness, StepSampledReader
from otel_train.reduction import CrossRankReducer
from otel_train.run_context import RunContext
from otel_train.sampling import GroupIndex
from otel_train.staged_meter import RecordSink, StagedMeterProvider, StagingRegistry
from otel_train.staging import safe_exp, transfer
from otel_train.summaries import RunSummaries

_logger = logging.getLogger(__name__)

# Step durations wait for the next perf-sampled step, where they go into the histogram (each
# SDK record costs microseconds: that work belongs to sampled steps). Past this many (perf
# interval longer than this, or perf made an event group) they are recorded in one go.
_MAX_BUFFERED_STEP_TIMES = 65_536


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
    ) -> None:
        self.provider = provider
        self.reader = reader
        self.context = context
        self._groups = groups
        self._clock = clock
        self._shutdown_timeout_millis = shutdown_timeout_millis
        self._registry = StagingRegistry(
            provider.get_meter("otel_train"),
            group_of=groups.group_of,
            declared=_declared_instruments(),
            max_attribute_sets=max_attribute_sets,
        )
        self._meter_provider = StagedMeterProvider(self._registry, provider)
        self._meter = self._meter_provider.get_meter("otel_train")
        if perplexity is None:  # exp(loss) means something only for a token cross-entropy
            perplexity = context.stage in CROSS_ENTROPY_STAGES
        self.training = TrainingInstruments(self._meter, self._registry, perplexity=perplexity)
        self._lock = threading.RLock()  # sampled steps vs. evaluate() from another thread
        self._busy_thread: int | None = None  # who holds the lock (signal deferral)
        self._pid = os.getpid()
        self._closed = False
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
        self._counters = [self.training.standard[n] for n in ("train.tokens", "train.samples")]
        self._generation_tokens_total = 0.0  # train.generation_tokens: PPO / GRPO rollouts
        self._register_health_instruments()

    # -- public surface -------------------------------------------------------------------
    @property
    def meter(self) -> Meter:
        """An OTel Meter whose synchronous instruments are step-staged (tensors welcome)."""
        return self._meter

    @property
    def meter_provider(self) -> MeterProvider:
        """For library code: `opentelemetry.metrics.set_meter_provider(tel.meter_provider)`."""
        return self._meter_provider

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
            self._last_step = step
            self._last_step_time = None
            self._step_durations.clear()
            self._next_due = self._groups.next_due_step(step)
            summaries = self.summaries
            self._rates.rebase(
                time=self._clock(),
                step=step,
                tokens=summaries.tokens_total,
                samples=summaries.samples_total,
                generation_tokens=self._generation_tokens_total,
            )

    def evaluate(self, loss: Any = None, *, metrics: Mapping[str, Any] | None = None) -> None:
        """Export `eval.loss` (+ `eval.perplexity`, `eval.best_perplexity` for cross-entropy
        stages, + `eval.<name>` per extra metric) now, on the current step. Tensors are fine
        (synced once: it is an event)."""
        if self._closed_or_forked():
            return
        with self._busy():
            staged = {f"eval.{name}": value for name, value in (metrics or {}).items()}
            if loss is not None:
                staged["eval.loss"] = loss
            for name, value in staged.items():
                self._registry.instrument_for(name).put(value)
            resolved = self._registry.take({"eval"})
            values = {
                inst.staged_name: value
                for inst, key, value in resolved
                if key is None and isinstance(value, float)
            }
            sink = self._apply(resolved)
            derived = self.summaries.eval_values(dict(values))
            self._set_values(derived, sink, skip=values)
            self._export_event("eval", sink)
        self._deliver_deferred_signal()

    def end_epoch(self, epoch: int | float | None = None) -> None:
        """Export `epoch.*` summaries of the epoch that just ended (one sync: an event)."""
        if self._closed_or_forked():
            return
        with self._busy():
            sink = self._apply(self._take_instruments(self._counters))
            self._add_counts(sink)
            loss_slot = self.training.standard["train.loss"].plain_slot()
            pending = loss_slot.peek(transfer([loss_slot.tensors()])[0])
            values = self.summaries.epoch_values(
                epoch, now=self._clock(), step=self._last_step, pending_loss=pending
            )
            self._set_values(values, sink)
            self._export_event("epoch", sink)
        self._deliver_deferred_signal()

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
        """Export what is pending (every value recorded since the last sampled step) and
        `final.*`, flush every exporter, stop. Bounded in time."""
        with self._busy():
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:
                return  # a forked child owns none of the exporters
            budget = self._shutdown_timeout_millis if timeout_millis is None else timeout_millis
            try:
                periodic = frozenset(self._groups.periodic_groups())
                if self._last_step > self._last_exported_step or self._registry.pending_in(
                    periodic
                ):
                    self._export_groups(periodic, self._last_step, self._clock())
                sink = RecordSink(self.reader.nonfinite)
                self._set_values(self._final_values(), sink)
                self._export_event("final", sink)
            except OtelTrainError as error:
                _logger.error("otel-train: could not export the last values at shutdown: %s", error)
            self.reader.shutdown(timeout_millis=budget)
            try:
                self.provider.shutdown(timeout_millis=max(budget / 4, 100))
            except Exception as error:  # pull readers' servers; never raise at exit
                _logger.warning("otel-train: meter provider shutdown: %r", error)

    # -- sampled steps --------------------------------------------------------------------
    def _sampled_step(self, previous: int, step: int, now: float) -> None:
        with self._busy():
            if self._closed_or_forked():
                return
            due = self._groups.groups_due(previous, step)
            self._next_due = self._groups.next_due_step(step)
            if due:
                self._export_groups(due, step, now, across_ranks=True)
        self._deliver_deferred_signal()

    def _export_groups(
        self, due: frozenset[str], step: int, now: float, *, across_ranks: bool = False
    ) -> None:
        resolved = self._registry.take(due)  # one device->host transfer per device
        if "perf" in due and "train" not in due:
            # Rates need this interval's tokens and samples; cumulative counters lose nothing
            # by being resolved early (they are exported with the train group).
            resolved += self._take_instruments(self._rate_counters())
        # Only on step-sampled exports, which every rank reaches: never at shutdown or in an
        # event, where a peer may already be gone and a collective would hang.
        if across_ranks and self._reducer is not None:
            resolved = self._reducer.reduce_taken(resolved)
        sink = self._apply(resolved)
        self._add_counts(sink)
        loss = next(
            (v for inst, key, v in resolved if key is None and inst.staged_name == "train.loss"),
            None,
        )
        if loss is not None:
            mean, _maximum, last, count = loss
            self.summaries.add_losses(mean, last, count)
            if self.summaries.perplexity:
                self._set_values({"train.perplexity": safe_exp(mean)}, sink)
        if "perf" in due:
            self._flush_step_durations()
            summaries = self.summaries
            rates = self._rates.derive(
                step=step,
                now=now,
                tokens=summaries.tokens_total,
                samples=summaries.samples_total,
                generation_tokens=self._generation_tokens_total,
                ranks=self._reducer.ranks_in_values if self._reducer is not None else 1,
            )
            self._set_values(rates, sink)
        if sink.nonfinite:
            self.training.nonfinite.add(sink.nonfinite)
        self.training.global_step.set(step)
        self._last_exported_step = step
        self.reader.export_groups(due, Freshness(self._registry.gauge_names, sink.fresh))

    def _take_instruments(self, instruments: Sequence[Any]) -> list[tuple[Any, Any, Any]]:
        slots = [(i, k, s) for i in instruments for k, s in i.slots.items() if s.pending()]
        values = transfer([slot.tensors() for _, _, slot in slots])
        return [(i, k, s.take(v)) for (i, k, s), v in zip(slots, values, strict=True)]

    def _apply(self, resolved: list[tuple[Any, Any, Any]]) -> RecordSink:
        sink = RecordSink(self.reader.nonfinite)
        for instrument, key, value in resolved:
            instrument.apply(key, value, sink)
        return sink

    def _add_counts(self, sink: RecordSink) -> None:
        increments = sink.increments
        self.summaries.add_counts(increments.get("train.tokens"), increments.get("train.samples"))
        self._generation_tokens_total += increments.get("train.generation_tokens", 0.0)

    def _rate_counters(self) -> list[Any]:
        """The counters rates need: tokens, samples and, once it exists, generation tokens."""
        generation = self._registry.instruments.get("train.generation_tokens")
        return self._counters if generation is None else [*self._counters, generation]

    def _final_values(self) -> dict[str, float]:
        """`final.*`; token and sample totals from the rate tracker: derived from the
        effective batch when the loop recorded none, left out (not 0) when unknown."""
        values = self.summaries.final_values(self._last_step)
        values.pop("final.total_tokens", None)
        values.pop("final.total_samples", None)
        totals = self._rates.totals(
            step=self._last_step,
            tokens=self.summaries.tokens_total,
            samples=self.summaries.samples_total,
        )
        if totals.tokens is not None:
            values["final.total_tokens"] = totals.tokens
        if totals.samples is not None:
            values["final.total_samples"] = totals.samples
        return values

    def _flush_step_durations(self) -> None:
        durations, self._step_durations = self._step_durations, []
        record = self.training.step_time.record
        for duration in durations:
            record(duration)

    def _set_values(
        self, values: Mapping[str, float], sink: RecordSink, *, skip: Iterable[str] = ()
    ) -> None:
        """Derived and event values straight into their SDK gauges (non-finite: the board)."""
        skipped = set(skip)
        for name, value in values.items():
            if name not in skipped:
                instrument = self._registry.instrument_for(name)
                sink.set_gauge(instrument.sdk, name, None, value)

    def _export_event(self, group: str, sink: RecordSink) -> None:
        if sink.nonfinite:
            self.training.nonfinite.add(sink.nonfinite)
        self.training.global_step.set(self._last_step)
        self.reader.export_groups(
            frozenset({group}), Freshness(self._registry.gauge_names, sink.fresh)
        )

    # -- helpers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Hold the lock and say so: a signal arriving meanwhile on this thread is deferred
        until the lock is released (its flush would otherwise wait for this very lock)."""
        with self._lock:
            outer = self._busy_thread
            self._busy_thread = threading.get_ident()
            try:
                yield
            finally:
                self._busy_thread = outer

    def busy_on_this_thread(self) -> bool:
        return self._busy_thread == threading.get_ident()

    def _deliver_deferred_signal(self) -> None:
        if signals.has_deferred() and self._busy_thread is None:
            signals.deliver_deferred()

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

    def _disable_in_forked_child(self) -> None:
        """Called in a forked child (os.register_at_fork): export nothing, take no lock the
        parent's threads may have held at the fork."""
        self._lock = threading.RLock()
        self._busy_thread = None
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


def _declared_instruments() -> dict[str, Any]:
    """The catalog plus the stage instrument sets (DPO, PPO, GRPO...), where present."""
    declared: dict[str, Any] = dict(BY_NAME)
    try:
        from otel_train.stage_metrics import STAGE_INSTRUMENTS
    except ImportError:
        return declared
    declared.update({spec.name: spec for spec in STAGE_INSTRUMENTS})
    return declared


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
