"""The event exports: `eval.*` (evaluate), `epoch.*` (end_epoch) and `final.*` (shutdown).

Each is one export on the current step, outside the sampling schedule; the caller
(`Telemetry`) holds its lock and has exported the sampled step in flight first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from otel_train.sampled_export import SampledExports
from otel_train.staged_meter import RecordSink
from otel_train.transfer import transfer


def export_eval(
    exports: SampledExports, step: int, loss: Any, metrics: Mapping[str, Any] | None
) -> None:
    """`eval.loss`, `eval.<name>` per extra metric and the derived `eval.*` values."""
    registry = exports.registry
    staged = {f"eval.{name}": value for name, value in (metrics or {}).items()}
    if loss is not None:
        staged["eval.loss"] = loss
    for name, value in staged.items():
        registry.instrument_for(name).put(value)
    resolved = registry.take({"eval"})
    values = {
        inst.staged_name: value
        for inst, key, value in resolved
        if key is None and isinstance(value, float)
    }
    with registry.streams.lock:
        sink = exports.apply(resolved)
        derived = exports.summaries.eval_values(dict(values))
        exports.set_values(derived, sink, skip=values)
    exports.export_event("eval", sink, step)


def export_epoch(
    exports: SampledExports, step: int, clock: Callable[[], float], epoch: int | float | None
) -> None:
    """`epoch.*` of the epoch that just ended: this interval's counts and loss synced once."""
    registry = exports.registry
    training = exports.training
    resolved = registry.begin_take(frozenset(), exports.counters).finish()
    loss_slot = training.standard["train.loss"].plain_slot()
    pending = loss_slot.peek(transfer([loss_slot.tensors()])[0])
    with registry.streams.lock:
        sink = exports.apply(resolved)
        exports.add_counts(sink)
        values = exports.summaries.epoch_values(epoch, now=clock(), step=step, pending_loss=pending)
        exports.set_values(values, sink)
    exports.export_event("epoch", sink, step)


def export_final(exports: SampledExports, step: int) -> None:
    """`final.*` at shutdown."""
    sink = RecordSink(exports.reader.nonfinite)
    with exports.registry.streams.lock:
        exports.set_values(final_values(exports, step), sink)
    exports.export_event("final", sink, step)


def final_values(exports: SampledExports, step: int) -> dict[str, float]:
    """`final.*`; token and sample totals from the rate tracker: derived from the
    effective batch when the loop recorded none, left out (not 0) when unknown."""
    summaries = exports.summaries
    values = summaries.final_values(step)
    values.pop("final.total_tokens", None)
    values.pop("final.total_samples", None)
    totals = exports.rates.totals(
        step=step, tokens=summaries.tokens_total, samples=summaries.samples_total
    )
    if totals.tokens is not None:
        values["final.total_tokens"] = totals.tokens
    if totals.samples is not None:
        values["final.total_samples"] = totals.samples
    return values
