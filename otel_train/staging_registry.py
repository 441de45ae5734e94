"""Every staged instrument of one Telemetry: creation with its name checks, the choice of
stream or SDK instrument behind it, and `take`, which resolves a sampled step's slots."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from opentelemetry.metrics import Meter

from otel_train._sdk_compat import scope_of, sdk_instrument_count, sdk_instrument_names
from otel_train.catalog import InstrumentSpec, describe
from otel_train.errors import OtelTrainError
from otel_train.series import (
    AttributeKey,
    GaugeStream,
    HistogramStream,
    Stream,
    StreamSet,
    SumStream,
)
from otel_train.staged_instruments import _CLASSES, StagedHistogram, StagedInstrument, StagedMean
from otel_train.transfer import DeviceTransfer, PendingValues

DEFAULT_MAX_ATTRIBUTE_SETS = 200  # per instrument, then one overflow series (see StagedInstrument)

# The OTel API's instrument-name syntax (the SDK logs and drops others silently).
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_./-]{0,254}$")
_PROMETHEUS_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
GLOBAL_STEP = "train.global_step"  # in every exported batch: the x-axis of every backend


class StagingRegistry:
    """Every staged instrument of one Telemetry, by name and by sampling group."""

    def __init__(
        self,
        sdk_meter: Meter,
        *,
        group_of: Callable[[str], str],
        declared: Mapping[str, InstrumentSpec],
        max_attribute_sets: int = DEFAULT_MAX_ATTRIBUTE_SETS,
        streams: StreamSet | None = None,
        needs_sdk: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.sdk_meter = sdk_meter
        self.group_of = group_of
        self.declared = declared
        self.max_attribute_sets = max_attribute_sets
        self.enabled = True
        self.instruments: dict[str, StagedInstrument] = {}
        self.by_group: dict[str, list[StagedInstrument]] = {}
        self._prometheus_names: dict[str, str] = {}
        self.gauge_names: set[str] = set()  # every synchronous gauge series we set ourselves
        self.streams = streams if streams is not None else StreamSet(_empty_resource())
        self._needs_sdk = needs_sdk  # a view changes aggregation or attributes: the SDK's job
        self.sdk_groups: set[str] = set()  # groups whose export needs an SDK collect
        self._sdk_instrument_count = 0
        self.transfer: Any = DeviceTransfer()  # a seam: tests stand in for a CUDA copy
        self._create_lock = threading.RLock()

    def output(
        self,
        meter: Meter,
        kind: str,
        name: str,
        unit: str,
        description: str,
        *,
        buckets: Sequence[float] | None = None,
    ) -> Any:
        """Where an instrument's resolved numbers go: our own stream (cheap, exported
        without a collect), or an SDK instrument where only the SDK can do it right."""
        group = self.group_of(name)
        exponential = kind == "histogram" and not _valid_buckets(buckets)
        if exponential or self._needs_sdk(name):
            self.sdk_groups.add(group)
            if kind == "histogram":
                return meter.create_histogram(
                    name,
                    unit=unit,
                    description=description,
                    explicit_bucket_boundaries_advisory=buckets,
                )
            create = {
                "counter": meter.create_counter,
                "up_down_counter": meter.create_up_down_counter,
                "gauge": meter.create_gauge,
            }[kind]
            return create(name, unit=unit, description=description)
        scope = scope_of(meter)
        stream: Stream
        if kind in ("counter", "up_down_counter"):
            stream = SumStream(name, unit, description, scope, monotonic=kind == "counter")
        elif kind == "gauge":
            stream = GaugeStream(name, unit, description, scope)
        else:
            stream = HistogramStream(name, unit, description, scope, boundaries=buckets or ())
        self.streams.add(group, stream, always=name == GLOBAL_STEP)
        return stream

    def observable_created(self, name: str) -> None:
        """Observable instruments are the SDK's: their group's exports collect the SDK."""
        self.sdk_groups.add(self.group_of(name))

    def refresh_sdk_groups(self, provider: Any) -> None:
        """Instruments other code created on the SDK provider itself (e.g. the system metrics
        instrumentation) are exported by an SDK collect too: find their groups (cheap when
        nothing changed: one count)."""
        count = sdk_instrument_count(provider)
        if count != self._sdk_instrument_count:
            names = sdk_instrument_names(provider)
            self._sdk_instrument_count = count
            self.sdk_groups.update(self.group_of(name) for name in names)

    def create(
        self,
        kind: str,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        sdk_meter: Meter | None = None,
        buckets: Sequence[float] | None = None,
    ) -> StagedInstrument:
        existing = self.instruments.get(name)
        if existing is not None:
            if existing.kind != kind:
                raise OtelTrainError(
                    f"instrument {name!r} already exists as a {existing.kind}; it cannot also "
                    f"be a {kind}. Use another name."
                )
            return existing
        description = description or describe(name)
        cls = _CLASSES[kind]

        meter = sdk_meter or self.sdk_meter

        def build() -> StagedInstrument:
            if cls is StagedHistogram:
                return StagedHistogram(
                    self,
                    meter,
                    name,
                    unit,
                    description,
                    explicit_bucket_boundaries_advisory=buckets,
                )
            return cls(self, meter, name, unit, description)  # type: ignore[call-arg,arg-type]

        return self.create_custom(name, build)

    def create_custom(self, name: str, build: Callable[[], StagedInstrument]) -> StagedInstrument:
        """Register a new instrument (name checked once, here) under its sampling group.

        Under the lock: the training thread and the finisher thread (derived gauges) both
        create instruments."""
        with self._create_lock:
            existing = self.instruments.get(name)
            if existing is not None:
                return existing
            return self._register(name, build)

    def _register(self, name: str, build: Callable[[], StagedInstrument]) -> StagedInstrument:
        _check_name(name)
        self._reject_prometheus_collision(name)
        instrument = build()
        self.instruments[name] = instrument
        self.by_group.setdefault(self.group_of(name), []).append(instrument)
        if instrument.kind in ("gauge", "mean", "grouped_mean"):
            self.gauge_names.add(name)
            if isinstance(instrument, StagedMean):
                self.gauge_names.add(instrument.max_name)
        return instrument

    def instrument_for(self, name: str) -> StagedInstrument:
        """The instrument `record({name: value})` writes to: declared kind, else a gauge."""
        instrument = self.instruments.get(name)
        if instrument is not None:
            return instrument
        spec = self.declared.get(name)
        if spec is not None:
            return self.create(spec.kind, name, spec.unit, spec.description)
        return self.create("gauge", name)

    def _reject_prometheus_collision(self, name: str) -> None:
        flat = _PROMETHEUS_UNSAFE.sub("_", name).lower()
        other = self._prometheus_names.get(flat)
        if other is not None and other != name:
            raise OtelTrainError(
                f"instrument {name!r} and {other!r} both become {flat!r} in Prometheus, which "
                "would fail every scrape; rename one of them"
            )
        self._prometheus_names[flat] = name

    # -- the sampled step --------------------------------------------------------------
    def pending_in(self, groups: frozenset[str] | set[str]) -> bool:
        return any(
            slot.pending()
            for group in groups
            for instrument in self.by_group.get(group, ())
            for slot in instrument.slots.values()
        )

    def take(self, groups: frozenset[str] | set[str]) -> list[tuple[StagedInstrument, Any, Any]]:
        """Resolve every pending slot of `groups` now: one device->host transfer per device."""
        return self.begin_take(groups).finish()

    def begin_take(
        self,
        groups: frozenset[str] | set[str],
        also: Sequence[StagedInstrument] = (),
        *,
        interval_values_of: frozenset[str] = frozenset(),
    ) -> TakenValues:
        """Start resolving every pending slot of `groups` (and of `also`): the slots start a
        new interval at once; host numbers are resolved now, tensors travel to the host in
        one copy per device. `interval_values_of`: instruments whose interval value (a
        number or a 0-dim tensor, still on its device) the cross-rank reduction needs."""
        instruments = [i for group in groups for i in self.by_group.get(group, ())]
        instruments.extend(i for i in also if i not in instruments)
        done: list[tuple[StagedInstrument, Any, Any]] = []
        owners: list[tuple[StagedInstrument, AttributeKey, Any]] = []
        requests: list[list[Any]] = []
        interval_values: dict[str, Any] = {}
        for instrument in instruments:
            for key, slot in instrument.slots.items():
                if not slot.pending():
                    continue
                if key is None and instrument.staged_name in interval_values_of:
                    interval_values[instrument.staged_name] = slot.interval_value()
                tensors = slot.tensors()
                if tensors:
                    owners.append((instrument, key, slot.detach()))
                    requests.append(tensors)
                else:
                    done.append((instrument, key, slot.take(())))
        return TakenValues(done, owners, self.transfer.start(requests), interval_values)


class TakenValues:
    """The detached interval of some slots, and their values on their way to the host."""

    def __init__(
        self,
        done: list[tuple[StagedInstrument, Any, Any]],
        owners: list[tuple[StagedInstrument, AttributeKey, Any]],
        pending: PendingValues,
        interval_values: dict[str, Any],
    ) -> None:
        self.done = done  # slots that held host numbers only: resolved already
        self.owners = owners
        self.pending = pending
        self.interval_values = interval_values

    def ready(self) -> bool:
        return self.pending.ready()

    def finish(self) -> list[tuple[StagedInstrument, Any, Any]]:
        """(instrument, attribute key, interval value) per slot; waits for the copy if needed."""
        values = self.pending.values()
        return self.done + [
            (instrument, key, slot.take(resolved))
            for (instrument, key, slot), resolved in zip(self.owners, values, strict=True)
        ]


def _valid_buckets(buckets: Sequence[float] | None) -> bool:
    """What the SDK accepts as a bucket advisory (it ignores others, with a warning)."""
    if not buckets:
        return False
    try:
        values = [float(b) for b in buckets]
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in values) and all(a < b for a, b in pairwise(values))


def _empty_resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    return Resource.get_empty()


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise OtelTrainError(
            f"instrument name {name!r} is not valid in OpenTelemetry: start with a letter, then "
            "letters, digits, '_', '.', '-' or '/', at most 255 characters (e.g. 'train.reward')"
        )


def registry_for(
    provider: Any,
    groups: Any,
    max_attribute_sets: int,
    resource: Any,
    needs_sdk: Callable[[str], bool],
) -> StagingRegistry:
    """The registry of one Telemetry: its sampling groups, the catalog and the stage sets."""
    from otel_train.catalog import BY_NAME
    from otel_train.series import StreamSet
    from otel_train.stage_metrics import STAGE_INSTRUMENTS

    if resource is None:
        from otel_train._sdk_compat import resource_of

        resource = resource_of(provider)
    declared: dict[str, Any] = dict(BY_NAME)
    declared.update({spec.name: spec for spec in STAGE_INSTRUMENTS})
    return StagingRegistry(
        provider.get_meter("otel_train"),
        group_of=groups.group_of,
        declared=declared,
        max_attribute_sets=max_attribute_sets,
        streams=StreamSet(resource),
        needs_sdk=needs_sdk,
    )
