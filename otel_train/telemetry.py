"""`Telemetry`: the one object a training loop talks to. `step(n)` is the only clock.

Non-sampled steps cost a compare and a clock read. Sampled steps detach the due groups'
staged values and start their one device->host transfer per device; once it has completed
(at once on the CPU; on CUDA polled at later steps, forced at the next sampled step, an event
or shutdown) the values go into the streams, rates are derived, and the due groups' metrics,
labelled with the sampled step, go to the step-sampled reader, whose exporters run on their
own threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from time import time_ns
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
from otel_train.reduction import REDUCED, CrossRankReducer
from otel_train.run_context import RunContext
from otel_train.sampling import GroupIndex
from otel_train.series import StreamSet
from otel_train.staged_meter import RecordSink, StagedMeterProvider, StagingRegistry, TakenValues
from otel_train.staging import safe_exp
from otel_train.summaries import RunSummaries
from otel_train.transfer import transfer

_logger = logging.getLogger(__name__)

# Step durations wait for the next perf-sampled step, where they go into the histogram (each
# SDK record costs microseconds: that work belongs to sampled steps). Past this many (perf
# interval longer than this, or perf made an event group) they are recorded in one go.
_MAX_BUFFERED_STEP_TIMES = 65_536


@dataclass(slots=True)
class _PendingExport:
    """A sampled step whose values are on their way to the host: everything it needs from
    the moment it was sampled (its step, clock, step durations), exported once they arrive."""

    due: frozenset[str]
    step: int
    now: float
    time_nanos: int
    taken: TakenValues
    reduction: Any  # the cross-rank all_reduce in flight, or None
    durations: list[float] | None

    def ready(self) -> bool:
        return self.taken.ready() and (self.reduction is None or self.reduction.ready())


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
        if resource is None:
            from otel_train._sdk_compat import resource_of

            resource = resource_of(provider)
        self._registry = StagingRegistry(
            provider.get_meter("otel_train"),
            group_of=groups.group_of,
            declared=_declared_instruments(),
            max_attribute_sets=max_attribute_sets,
            streams=StreamSet(resource),
            needs_sdk=needs_sdk,
        )
        self._pending: _PendingExport | None = None  # at most one sampled step in flight
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
        else:
            if self._pending is not None:  # CUDA: export once the copy has completed
                self._poll_pending()
            if len(self._step_durations) > _MAX_BUFFERED_STEP_TIMES:
                self._flush_step_durations()

    def resume_from(self, step: int) -> None:
        """Continue the step axis from `step` (the last step a restored checkpoint finished)."""
        with self._busy():
            self._finish_pending()
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
            self._finish_pending()
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
            with self._registry.streams.lock:
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
            self._finish_pending()
            resolved = self._registry.begin_take(frozenset(), self._counters).finish()
            loss_slot = self.training.standard["train.loss"].plain_slot()
            pending = loss_slot.peek(transfer([loss_slot.tensors()])[0])
            with self._registry.streams.lock:
                sink = self._apply(resolved)
                self._add_counts(sink)
                values = self.summaries.epoch_values(
                    epoch, now=self._clock(), step=self._last_step, pending_loss=pending
                )
                self._set_values(values, sink)
            self._export_event("epoch", sink)
        self._deliver_deferred_signal()

    def flush(self, timeout_millis: float = 10_000) -> bool:
        """Wait until everything exported so far has reached every exporter (a sampled step
        whose values are still on their way from the device is exported first)."""
        with self._busy():
            if not self._closed_or_forked():
                self._finish_pending()
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
                self._finish_pending()
                periodic = frozenset(self._groups.periodic_groups())
                if self._last_step > self._last_exported_step or self._registry.pending_in(
                    periodic
                ):
                    self._begin_export(periodic, self._last_step, self._clock())
                    self._finish_pending()
                sink = RecordSink(self.reader.nonfinite)
                with self._registry.streams.lock:
                    self._set_values(self._final_values(), sink)
                self._export_event("final", sink)
            except OtelTrainError as error:
                _logger.error("otel-train: could not export the last values at shutdown: %s", error)
            self.reader.shutdown(timeout_millis=budget)
            try:
                self.provider.shutdown(timeout_millis=max(budget / 4, 100))
            except Exception as error:  # pull readers' servers; never raise at exit
                _logger.warning("otel-train: meter provider shutdown: %r", error)
            from otel_train.process_hooks import untrack

            untrack(self)

    # -- sampled steps --------------------------------------------------------------------
    def _sampled_step(self, previous: int, step: int, now: float) -> None:
        with self._busy():
            if self._closed_or_forked():
                return
            self._finish_pending()  # the previous sampled step first: exports stay in order
            due = self._groups.groups_due(previous, step)
            self._next_due = self._groups.next_due_step(step)
            if due:
                self._begin_export(due, step, now, across_ranks=True)
        self._deliver_deferred_signal()

    def _poll_pending(self) -> None:
        with self._busy():
            pending = self._pending
            if pending is not None and pending.ready() and not self._closed_or_forked():
                self._finish_pending()
        self._deliver_deferred_signal()

    def _begin_export(
        self, due: frozenset[str], step: int, now: float, *, across_ranks: bool = False
    ) -> None:
        """Detach the due values and start their transfer; export now if it is complete."""
        # Rates need this interval's tokens and samples; cumulative counters lose nothing by
        # being resolved early (they are exported with the train group).
        also = self._rate_counters() if "perf" in due and "train" not in due else ()
        # Only on step-sampled exports, which every rank reaches: never at shutdown or in an
        # event, where a peer may already be gone and a collective would hang. Issued now,
        # at the sampled step, on every rank alike; awaited with the transfer.
        reducer = self._reducer if across_ranks and self._reducer is not None else None
        reduced = REDUCED if reducer is not None and reducer.active() else frozenset()
        taken = self._registry.begin_take(due, also, interval_values_of=reduced)
        reduction = reducer.start(taken.interval_values) if reduced and reducer else None
        durations = None
        if "perf" in due:
            durations, self._step_durations = self._step_durations, []
        self._last_exported_step = step
        self._pending = _PendingExport(due, step, now, time_ns(), taken, reduction, durations)
        if self._pending.ready():  # the CPU: at once, in this step
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Export the sampled step in flight, if any (waits for its copy: normally done)."""
        job, self._pending = self._pending, None
        if job is None:
            return
        resolved = job.taken.finish()
        if job.reduction is not None and self._reducer is not None:
            resolved = self._reducer.finish(job.reduction, resolved)
        streams = self._registry.streams
        with streams.lock:
            sink = self._apply(resolved)
            self._add_counts(sink)
            loss = next(
                (
                    v
                    for inst, key, v in resolved
                    if key is None and inst.staged_name == "train.loss"
                ),
                None,
            )
            if loss is not None:
                mean, _maximum, last, count = loss
                self.summaries.add_losses(mean, last, count)
                if self.summaries.perplexity:
                    self._set_values({"train.perplexity": safe_exp(mean)}, sink)
            if "perf" in job.due:
                self._record_step_durations(job.durations or [])
                summaries = self.summaries
                rates = self._rates.derive(
                    step=job.step,
                    now=job.now,
                    tokens=summaries.tokens_total,
                    samples=summaries.samples_total,
                    generation_tokens=self._generation_tokens_total,
                    ranks=self._reducer.ranks_in_values if self._reducer is not None else 1,
                )
                self._set_values(rates, sink)
            if sink.nonfinite:
                self.training.nonfinite.add(sink.nonfinite)
            if "health" in job.due:
                self._update_health()
            self.training.global_step.set(job.step)
            direct = streams.metrics_for(job.due, job.time_nanos)
        self.reader.export_groups(
            job.due, direct, collect_sdk=self._sdk_due(job.due), fresh=self._fresh(sink)
        )

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
        with self._registry.streams.lock:
            self._record_step_durations(durations)

    def _record_step_durations(self, durations: list[float]) -> None:
        step_time = self.training.step_time
        record_many = getattr(step_time, "record_many", None)
        if record_many is not None:  # our stream: one call for the interval
            record_many(durations)
            return
        for duration in durations:  # an SDK histogram (a view re-aggregates step times)
            step_time.record(duration)

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
        groups = frozenset({group})
        streams = self._registry.streams
        with streams.lock:
            if sink.nonfinite:
                self.training.nonfinite.add(sink.nonfinite)
            self.training.global_step.set(self._last_step)
            direct = streams.metrics_for(groups, time_ns())
        self.reader.export_groups(
            groups, direct, collect_sdk=self._sdk_due(groups), fresh=self._fresh(sink)
        )

    def _fresh(self, sink: RecordSink) -> Freshness:
        """The gauges set on SDK instruments for this export (streams know it themselves)."""
        return Freshness(self._registry.gauge_names, sink.fresh)

    def _sdk_due(self, groups: frozenset[str]) -> bool:
        """Whether exporting `groups` needs an SDK collect (observables, SDK-held values)."""
        registry = self._registry
        registry.refresh_sdk_groups(self.provider)
        return not registry.sdk_groups.isdisjoint(groups)

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
        """Exporter drops and failures as counters: visible where the other metrics are.

        Streams, set from the export queues' tallies when the health group is exported (an
        observable instrument would cost an SDK collect on every perf-sampled step)."""
        meter = self._registry.sdk_meter
        self._health: list[tuple[str, Any, dict[str, int]]] = [
            (
                attribute,
                self._registry.output(meter, "counter", name, "{batch}", description),
                {},
            )
            for attribute, name, description in (
                ("dropped", "otel_train.export.dropped",
                 "Batches an exporter dropped because its queue was full"),
                ("failed", "otel_train.export.failed", "Batches an exporter failed to deliver"),
            )
        ]  # fmt: skip

    def _update_health(self) -> None:
        """Every exporter, 0 included: a counter that only appears at the first failure
        leaves "failures so far" panels without data. Caller holds the streams' lock."""
        for attribute, stream, reported in self._health:
            for worker in self.reader.exporters:
                total = getattr(worker, attribute)
                previous = reported.get(worker.name)
                if previous is None or total != previous:
                    stream.add(total - (previous or 0), {"exporter": worker.name})
                    reported[worker.name] = total

    def _disable_in_forked_child(self) -> None:
        """Called in a forked child (os.register_at_fork): export nothing, take no lock the
        parent's threads may have held at the fork."""
        self._lock = threading.RLock()
        self._busy_thread = None
        self._pending = None  # the parent's copy in flight: not the child's to export
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
