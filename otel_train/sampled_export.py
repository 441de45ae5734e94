"""A sampled step's export, from its detached values to the reader: resolved values applied,
rates and perplexity derived, step durations and exporter health recorded.

Owned by `Telemetry`, which keeps the clock and the one sampled step in flight; the event
exports (`otel_train.events`) go through the same apply / set / export primitives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from time import time_ns
from typing import Any

from otel_train.instruments import TrainingInstruments
from otel_train.rates import RateTracker
from otel_train.reader import Freshness, StepSampledReader
from otel_train.reduction import REDUCED, CrossRankReducer
from otel_train.staged_meter import RecordSink, StagingRegistry, TakenValues
from otel_train.staging import safe_exp
from otel_train.summaries import RunSummaries

_logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingExport:
    """A sampled step whose values are on their way to the host: everything it needs from
    the moment it was sampled (its step, clock, step durations), exported once they arrive."""

    due: frozenset[str]
    step: int
    now: float
    time_nanos: int
    taken: TakenValues
    reduction: Any  # the cross-rank all_reduce in flight, or None
    durations: list[float] | None
    local_only: bool = False  # reduce_across_ranks, but no all_reduce issued (not initialised)

    def ready(self) -> bool:
        return self.taken.ready() and (self.reduction is None or self.reduction.ready())


class SampledExports:
    """Turns detached values into exports; holds the host-side totals the exports derive from.

    Callers hold the Telemetry's lock (sampled steps vs. `evaluate()` from another thread)."""

    def __init__(
        self,
        *,
        provider: Any,
        reader: StepSampledReader,
        registry: StagingRegistry,
        training: TrainingInstruments,
        summaries: RunSummaries,
        rates: RateTracker,
        reducer: CrossRankReducer | None,
    ) -> None:
        self.provider = provider
        self.reader = reader
        self.registry = registry
        self.training = training
        self.summaries = summaries
        self.rates = rates
        self.reducer = reducer  # reduce_across_ranks=True: one all_reduce per sampled step
        self.counters = [training.standard[n] for n in ("train.tokens", "train.samples")]
        self.generation_tokens_total = 0.0  # train.generation_tokens: PPO / GRPO rollouts
        self._health = _register_health_instruments(registry)

    # -- a sampled step -------------------------------------------------------------------
    def begin(
        self,
        due: frozenset[str],
        step: int,
        now: float,
        durations: list[float] | None,
        *,
        across_ranks: bool,
    ) -> PendingExport:
        """Detach the due values and start their transfer (and cross-rank reduction)."""
        # Rates need this interval's tokens and samples; cumulative counters lose nothing by
        # being resolved early (they are exported with the train group).
        also = self._rate_counters() if "perf" in due and "train" not in due else ()
        # Only on step-sampled exports, which every rank reaches: never at shutdown or in an
        # event, where a peer may already be gone and a collective would hang. Issued now,
        # at the sampled step, on every rank alike; awaited with the transfer.
        reducer = self.reducer if across_ranks and self.reducer is not None else None
        reduced = REDUCED if reducer is not None and reducer.active() else frozenset()
        taken = self.registry.begin_take(due, also, interval_values_of=reduced)
        reduction = reducer.start(taken.interval_values) if reduced and reducer else None
        local_only = reducer is not None and reduction is None
        return PendingExport(due, step, now, time_ns(), taken, reduction, durations, local_only)

    def finish(self, job: PendingExport) -> None:
        """Export a sampled step (waits for its copy: normally done)."""
        resolved = job.taken.finish()
        if job.reduction is not None and self.reducer is not None:
            resolved = self.reducer.finish(job.reduction, resolved)
        elif job.local_only and self.reducer is not None:
            self.reducer.exported_local_values()
        streams = self.registry.streams
        with streams.lock:
            sink = self.apply(resolved)
            self.add_counts(sink)
            self._derive(job, resolved, sink)
            if sink.nonfinite:
                self.training.nonfinite.add(sink.nonfinite)
            if "health" in job.due:
                self._update_health()
            self.training.global_step.set(job.step)
            direct = streams.metrics_for(job.due, job.time_nanos)
        self.reader.export_groups(
            job.due, direct, collect_sdk=self._sdk_due(job.due), fresh=self._fresh(sink)
        )

    def _derive(self, job: PendingExport, resolved: list[Any], sink: RecordSink) -> None:
        """Perplexity from the interval's loss; step times and rates on perf steps."""
        loss = next(
            (v for inst, key, v in resolved if key is None and inst.staged_name == "train.loss"),
            None,
        )
        summaries = self.summaries
        if loss is not None:
            mean, _maximum, last, count = loss
            summaries.add_losses(mean, last, count)
            if summaries.perplexity:
                self.set_values({"train.perplexity": safe_exp(mean)}, sink)
        if "perf" in job.due:
            self.record_step_durations(job.durations or [])
            rates = self.rates.derive(
                step=job.step,
                now=job.now,
                tokens=summaries.tokens_total,
                samples=summaries.samples_total,
                generation_tokens=self.generation_tokens_total,
                ranks=self.reducer.ranks_in_values if self.reducer is not None else 1,
            )
            self.set_values(rates, sink)

    def _rate_counters(self) -> list[Any]:
        """The counters rates need: tokens, samples and, once it exists, generation tokens."""
        generation = self.registry.instruments.get("train.generation_tokens")
        return self.counters if generation is None else [*self.counters, generation]

    def record_step_durations(self, durations: list[float]) -> None:
        """Caller holds the streams' lock."""
        step_time = self.training.step_time
        record_many = getattr(step_time, "record_many", None)
        if record_many is not None:  # our stream: one call for the interval
            record_many(durations)
            return
        for duration in durations:  # an SDK histogram (a view re-aggregates step times)
            step_time.record(duration)

    # -- primitives shared with the event exports ----------------------------------------
    def apply(self, resolved: list[tuple[Any, Any, Any]]) -> RecordSink:
        sink = RecordSink(self.reader.nonfinite)
        for instrument, key, value in resolved:
            instrument.apply(key, value, sink)
        return sink

    def add_counts(self, sink: RecordSink) -> None:
        increments = sink.increments
        self.summaries.add_counts(increments.get("train.tokens"), increments.get("train.samples"))
        self.generation_tokens_total += increments.get("train.generation_tokens", 0.0)

    def set_values(
        self, values: Mapping[str, float], sink: RecordSink, *, skip: Iterable[str] = ()
    ) -> None:
        """Derived and event values straight into their SDK gauges (non-finite: the board)."""
        skipped = set(skip)
        for name, value in values.items():
            if name not in skipped:
                instrument = self.registry.instrument_for(name)
                sink.set_gauge(instrument.sdk, name, None, value)

    def export_event(self, group: str, sink: RecordSink, step: int) -> None:
        """Export an event group (eval, epoch, final) labelled with `step`."""
        groups = frozenset({group})
        streams = self.registry.streams
        with streams.lock:
            if sink.nonfinite:
                self.training.nonfinite.add(sink.nonfinite)
            self.training.global_step.set(step)
            direct = streams.metrics_for(groups, time_ns())
        self.reader.export_groups(
            groups, direct, collect_sdk=self._sdk_due(groups), fresh=self._fresh(sink)
        )

    def _fresh(self, sink: RecordSink) -> Freshness:
        """The gauges set on SDK instruments for this export (streams know it themselves)."""
        return Freshness(self.registry.gauge_names, sink.fresh)

    def _sdk_due(self, groups: frozenset[str]) -> bool:
        """Whether exporting `groups` needs an SDK collect (observables, SDK-held values)."""
        registry = self.registry
        registry.refresh_sdk_groups(self.provider)
        return not registry.sdk_groups.isdisjoint(groups)

    def rebase_rates(self, *, time: float, step: int) -> None:
        """Rates continue from `step` (resume_from), with the totals counted so far."""
        summaries = self.summaries
        self.rates.rebase(
            time=time,
            step=step,
            tokens=summaries.tokens_total,
            samples=summaries.samples_total,
            generation_tokens=self.generation_tokens_total,
        )

    def close(self, budget_millis: float) -> None:
        """Flush and stop every exporter, then the meter provider. Bounded; never raises."""
        self.reader.shutdown(timeout_millis=budget_millis)
        try:
            self.provider.shutdown(timeout_millis=max(budget_millis / 4, 100))
        except Exception as error:  # pull readers' servers; never raise at exit
            _logger.warning("otel-train: meter provider shutdown: %r", error)

    # -- exporter health ------------------------------------------------------------------
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


def _register_health_instruments(
    registry: StagingRegistry,
) -> list[tuple[str, Any, dict[str, int]]]:
    """Exporter drops and failures as counters: visible where the other metrics are.

    Streams, set from the export queues' tallies when the health group is exported (an
    observable instrument would cost an SDK collect on every perf-sampled step)."""
    meter = registry.sdk_meter
    return [
        (attribute, registry.output(meter, "counter", name, "{batch}", description), {})
        for attribute, name, description in (
            ("dropped", "otel_train.export.dropped",
             "Batches an exporter dropped because its queue was full"),
            ("failed", "otel_train.export.failed", "Batches an exporter failed to deliver"),
        )
    ]  # fmt: skip
