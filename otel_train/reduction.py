"""Cross-rank reduction at sampled steps: ONE packed all_reduce of the resolved values.

Gauges (loss, grad norm, ...) become the mean over the ranks that recorded them, counter
increments (tokens, samples) the sum. Every rank reaches the same sampled steps (sampling is
by step), so the collective cannot deadlock a healthy job; every rank must call `step()`.
The collective is issued at the sampled step with `async_op=True` on a vector packed on the
device (no sync), and awaited with the step's transfer: on CUDA the training thread never waits.
Label-based backends tell the all-rank values apart by a `scope` attribute (`with_scope`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)

from otel_train.catalog import STANDARD_INSTRUMENTS
from otel_train.run_context import RunContext, ValueScope

_logger = logging.getLogger(__name__)

# A fixed slot order, identical on every rank: the packed vector must line up element-wise.
# From the catalog: "mean" reductions (loss, lr, grad norm, epoch), "sum" ones (tokens, ...).
GAUGE_SLOTS = tuple(s.name for s in STANDARD_INSTRUMENTS if s.reduce == "mean")
COUNTER_SLOTS = tuple(s.name for s in STANDARD_INSTRUMENTS if s.reduce == "sum")
REDUCED = frozenset((*GAUGE_SLOTS, *COUNTER_SLOTS))

# Instruments whose values are the all-rank reduction on the rank that keeps it (rank 0) and
# that rank's own values elsewhere: the reduced slots and what is derived from them (rates
# from the global token count, perplexity from the mean loss, epoch/final totals).
REDUCED_INSTRUMENTS: frozenset[str] = frozenset(
    {
        *GAUGE_SLOTS,
        *COUNTER_SLOTS,
        "train.perplexity",
        "perf.tokens_per_second",
        "perf.samples_per_second",
        "perf.flops_per_second",
        "perf.mfu",
        "epoch.tokens",
        "epoch.samples",
        "epoch.tokens_per_second",
        "epoch.train_loss_mean",
        "final.total_tokens",
        "final.total_samples",
        "final.train_loss",
    }
)
# The attribute label-based backends (Prometheus, OTLP via a collector) get on those
# instruments: "global" on the reducing rank, "rank" everywhere else. A sum over ranks of the
# "rank" series never includes a global value; the dashboard prefers "global" where it exists.
SCOPE_ATTRIBUTE = "scope"
GLOBAL_SCOPE = "global"
RANK_SCOPE = "rank"


@dataclass(slots=True)
class Resolved:
    """This rank's resolved standard values: gauges (interval means) and counter increments."""

    gauges: dict[str, float]
    counter_increments: dict[str, float]


class CrossRankReducer:
    """Packs [value, present] per gauge and the counter increments into one float64 vector."""

    def __init__(
        self,
        *,
        keep_on_this_rank: bool,
        scope: ValueScope | None = None,
        expected_world_size: int = 1,
    ) -> None:
        # Every rank takes part in the collective; only rank 0 replaces its values by the
        # global ones, so summing `train_tokens_total` over ranks never double-counts.
        self.keep_on_this_rank = keep_on_this_rank
        self.reductions = 0
        # How many ranks' work this rank's last values hold: the world size once rank 0 has
        # replaced its values by global ones, else 1 (MFU divides by that many peaks).
        self.ranks_in_values = 1
        self._scope = scope  # what label-based exporters call these values (scope=...)
        self._expected_world_size = expected_world_size  # from the launcher's environment
        self._warned = False
        self._warned_not_initialised = False

    def active(self) -> bool:
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        dist = torch.distributed
        return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)

    def start(self, interval_values: Mapping[str, Any]) -> InFlight | None:
        """Issue this sampled step's all_reduce on the standard instruments' interval values
        (numbers, or 0-dim tensors where they live: no device sync). None when not
        distributed or on failure."""
        if not self.active():
            return None
        try:
            return self._start(interval_values)
        except Exception as error:  # a broken group must not take the training loop down
            self._warn(error)
            return None

    def finish(
        self, flight: InFlight, taken: list[tuple[Any, Any, Any]]
    ) -> list[tuple[Any, Any, Any]]:
        """`taken` with the global values in place of this rank's own (rank 0 only)."""
        try:
            summed = flight.values()
        except Exception as error:
            self._warn(error)
            self.exported_local_values()
            return taken
        if not self.keep_on_this_rank:
            return taken
        merged = _merged(taken, local := _local(taken), unpack(summed, local))
        self.ranks_in_values = flight.world_size
        if self._scope is not None:
            self._scope.global_values = True
        return merged

    def exported_local_values(self) -> None:
        """A sampled step was exported with this rank's own values (no reduction in flight,
        or it failed): MFU divides by one peak, and the values are labelled scope="rank".
        Called on the finisher thread, in step order, like `finish`."""
        self.ranks_in_values = 1
        if self._scope is not None:
            self._scope.global_values = False
        if self._expected_world_size > 1 and not self._warned_not_initialised and not self._warned:
            self._warned_not_initialised = True
            _logger.warning(
                "otel-train: reduce_across_ranks=True in a job of %d ranks, but "
                "torch.distributed is not initialised at this sampled step: each rank exports "
                'its own values (scope="rank") until it is. Call '
                "torch.distributed.init_process_group() before training.",
                self._expected_world_size,
            )

    def _start(self, interval_values: Mapping[str, Any]) -> InFlight:
        import torch
        import torch.distributed as dist

        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        terms: list[Any] = []
        for name in GAUGE_SLOTS:
            value = interval_values.get(name)
            terms += [0.0, 0.0] if value is None else [value, 1.0]
        for name in COUNTER_SLOTS:
            terms.append(interval_values.get(name, 0.0))
        vector = _packed_on(device, terms)
        work = dist.all_reduce(vector, op=dist.ReduceOp.SUM, async_op=True)
        self.reductions += 1
        if device.type == "cuda":
            from otel_train.transfer import DeviceTransfer

            work.wait()  # NCCL: the current stream waits for the collective, the host does not
            copy = DeviceTransfer().start([[vector]])
            return InFlight(work=None, vector=None, copy=copy, world_size=dist.get_world_size())
        return InFlight(work=work, vector=vector, copy=None, world_size=dist.get_world_size())

    def _warn(self, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            _logger.error(
                "otel-train: cross-rank reduction failed (%r); exporting this rank's own "
                "values instead",
                error,
            )


class InFlight:
    """One all_reduce in flight: gloo (CPU) finishes on its own thread, NCCL's result is
    copied to pinned host memory behind an event (`ready()` never blocks)."""

    def __init__(self, *, work: Any, vector: Any, copy: Any, world_size: int) -> None:
        self._work, self._vector, self._copy = work, vector, copy
        self.world_size = world_size

    def ready(self) -> bool:
        if self._copy is not None:
            return bool(self._copy.ready())
        return bool(self._work.is_completed())

    def values(self) -> list[float]:
        if self._copy is not None:
            return list(self._copy.values()[0])
        self._work.wait()
        return list(self._vector.tolist())


def _packed_on(device: Any, terms: list[Any]) -> Any:
    """One float64 vector on `device` from host numbers and 0-dim tensors, without a sync."""
    import torch

    tensors = [(i, t) for i, t in enumerate(terms) if not isinstance(t, (int, float))]
    host = torch.tensor(
        [0.0 if not isinstance(t, (int, float)) else float(t) for t in terms], dtype=torch.float64
    )
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    if not tensors:
        return host
    zero = torch.zeros((), dtype=torch.float64, device=device)
    placed = [zero] * len(terms)
    for index, tensor in tensors:
        placed[index] = tensor.to(device=device, dtype=torch.float64)
    return host + torch.stack(placed)


def _local(taken: list[tuple[Any, Any, Any]]) -> Resolved:
    local = Resolved(gauges={}, counter_increments={})
    for instrument, key, value in taken:
        name = instrument.staged_name
        if key is not None or value is None:
            continue
        if name in GAUGE_SLOTS:
            local.gauges[name] = value[0] if isinstance(value, tuple) else value
        elif name in COUNTER_SLOTS and value:
            local.counter_increments[name] = sum(value)
    return local


def _merged(
    taken: list[tuple[Any, Any, Any]], local: Resolved, reduced: Resolved
) -> list[tuple[Any, Any, Any]]:
    merged = []
    for instrument, key, value in taken:
        name = instrument.staged_name
        if key is None and value is not None:
            if name in reduced.gauges and name in local.gauges:
                mean = reduced.gauges[name]
                value = (mean, *value[1:]) if isinstance(value, tuple) else mean
            elif name in reduced.counter_increments and name in local.counter_increments:
                value = [reduced.counter_increments[name]]
        merged.append((instrument, key, value))
    return merged


def pack(resolved: Resolved) -> list[float]:
    values: list[float] = []
    for name in GAUGE_SLOTS:
        value = resolved.gauges.get(name)
        values += [0.0, 0.0] if value is None else [value, 1.0]
    for name in COUNTER_SLOTS:
        values.append(resolved.counter_increments.get(name, 0.0))
    return values


def unpack(summed: list[float], local: Resolved) -> Resolved:
    """Means for gauges (over the ranks that had one), sums for counters."""
    gauges = dict(local.gauges)
    for index, name in enumerate(GAUGE_SLOTS):
        total, count = summed[2 * index], summed[2 * index + 1]
        if count > 0:
            gauges[name] = total / count
    increments: dict[str, Any] = dict(local.counter_increments)
    offset = 2 * len(GAUGE_SLOTS)
    for index, name in enumerate(COUNTER_SLOTS):
        total = summed[offset + index]
        if total or name in increments:
            increments[name] = total
    return Resolved(gauges=gauges, counter_increments=increments)


def values_global_of(metrics_data: MetricsData, context: RunContext | None) -> bool:
    """Whether `metrics_data`'s reduced values are all ranks' (scope="global"): the stamp our
    reader put on the batch as it made it, in step order (`StepBatch.values_global`), else
    (a batch from elsewhere) what the run context says now."""
    stamped = getattr(metrics_data, "values_global", None)
    if stamped is not None:
        return bool(stamped)
    return context is not None and context.values_are_global()


def with_scope(metrics_data: MetricsData, *, global_values: bool) -> MetricsData:
    """A copy of `metrics_data` whose data points of `REDUCED_INSTRUMENTS` carry
    `scope="global"` (this rank exports the all-rank values) or `scope="rank"`.

    Only label-based exporters call this: JSON lines and W&B rows are per rank already, and
    their keys must not change with the attribute.
    """
    scope = GLOBAL_SCOPE if global_values else RANK_SCOPE
    resources = []
    changed = False
    for resource in metrics_data.resource_metrics:
        scopes = []
        for scope_metrics in resource.scope_metrics:
            metrics = []
            for metric in scope_metrics.metrics:
                if metric.name in REDUCED_INSTRUMENTS:
                    metric = _scoped(metric, scope)
                    changed = True
                metrics.append(metric)
            scopes.append(ScopeMetrics(scope_metrics.scope, metrics, scope_metrics.schema_url))
        resources.append(ResourceMetrics(resource.resource, scopes, resource.schema_url))
    return MetricsData(resources) if changed else metrics_data


def _scoped(metric: Metric, scope: str) -> Metric:
    data = metric.data
    if not isinstance(data, (Gauge, Sum)):
        return metric  # no reduced instrument is a histogram
    points = [
        NumberDataPoint(
            attributes={**(point.attributes or {}), SCOPE_ATTRIBUTE: scope},
            start_time_unix_nano=point.start_time_unix_nano,
            time_unix_nano=point.time_unix_nano,
            value=point.value,
            exemplars=point.exemplars,
        )
        for point in data.data_points
    ]
    if isinstance(data, Sum):
        scoped: Gauge | Sum = Sum(points, data.aggregation_temporality, data.is_monotonic)
    else:
        scoped = Gauge(points)
    return Metric(metric.name, metric.description, metric.unit, scoped)
