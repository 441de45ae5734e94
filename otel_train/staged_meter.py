"""Step-staged OTel instruments: the OTel meter API, with a training loop's costs.

`tel.meter` / `tel.meter_provider` hand out real OTel API instruments (`Counter`,
`UpDownCounter`, `Histogram`, `_Gauge`) whose `add/record/set(amount, attributes)` accept
numbers and 0-dim tensors on any device. They only stage the value (a reference, or an append
to a short list); on a sampled step of the instrument's group the registry resolves every
pending tensor in one transfer per device and records the numbers into the streams behind
them (`otel_train.series`: our own cumulative aggregation, exported as ordinary OTel data),
or into SDK instruments where the SDK's machinery is needed (a view that changes aggregation or
attributes, exponential histograms).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from opentelemetry.metrics import (
    Counter,
    Histogram,
    Meter,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
    _Gauge,
)

from otel_train._sdk_compat import scope_of, sdk_instrument_count, sdk_instrument_names
from otel_train.catalog import InstrumentSpec, describe, max_companion
from otel_train.errors import OtelTrainError
from otel_train.nonfinite import series_key
from otel_train.series import (
    AttributeKey,
    GaugeStream,
    HistogramStream,
    Stream,
    StreamSet,
    SumStream,
    attribute_key,
)
from otel_train.staging import (
    HistogramSlot,
    LastSlot,
    MeanSlot,
    SumSlot,
    stage_value,
)
from otel_train.transfer import DeviceTransfer, PendingValues

_logger = logging.getLogger(__name__)

# What one instrument may write per row: past this many attribute sets, new ones fold into
# one overflow series (as the SDK's cardinality cap does), so a bug that puts a sample id in
# an attribute cannot fill a disk with 10,000-key JSON rows.
DEFAULT_MAX_ATTRIBUTE_SETS = 200
OVERFLOW_ATTRIBUTES: Mapping[str, Any] = {"otel.metric.overflow": True}
_OVERFLOW_KEY = (("otel.metric.overflow", True),)

# The OTel API's instrument-name syntax (the SDK logs and drops others silently).
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_./-]{0,254}$")
_PROMETHEUS_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
GLOBAL_STEP = "train.global_step"  # in every exported batch: the x-axis of every backend


class StagedInstrument:
    """Pending state per attribute set, and where resolved numbers go (SDK instruments)."""

    kind = ""
    slot_type: Callable[[], Any] = LastSlot
    slots: dict[Any, Any]

    def __init__(
        self, registry: StagingRegistry, name: str, unit: str, description: str, sdk: Any
    ) -> None:
        self.registry = registry
        self.sdk = sdk
        self.slots = {}
        self.attributes: dict[AttributeKey, Mapping[str, Any] | None] = {}
        self._plain: Any = None  # the attribute-less slot, looked up without hashing
        self._warned_overflow = False
        self.staged_name = name
        self.name = name
        self.unit = unit
        self.description = description

    def plain_slot(self) -> Any:
        slot = self._plain
        if slot is None:
            slot = self._plain = self.slot_type()
            self.slots[None] = slot
            self.attributes[None] = None
        return slot

    def _stage(self, amount: Any, attributes: Mapping[str, Any] | None) -> None:
        if not self.registry.enabled:
            return
        value = stage_value(self.staged_name, amount)
        if not attributes:
            self.plain_slot().add(value)
            return
        key = attribute_key(attributes)
        slot = self.slots.get(key)
        if slot is None:
            slot = self._new_slot(key, attributes)
        slot.add(value)

    def _new_slot(self, key: AttributeKey, attributes: Mapping[str, Any]) -> Any:
        if len(self.slots) >= self.registry.max_attribute_sets:
            if not self._warned_overflow:
                self._warned_overflow = True
                _logger.warning(
                    "otel-train: %s has more than %d attribute sets; further ones are folded "
                    "into one series with otel.metric.overflow=true. An id-like attribute "
                    "(sample, request) is the usual cause; raise setup(max_attribute_sets=) "
                    "if the sets are genuinely needed.",
                    self.staged_name,
                    self.registry.max_attribute_sets,
                )
            key, attributes = _OVERFLOW_KEY, OVERFLOW_ATTRIBUTES
            slot = self.slots.get(key)
            if slot is not None:
                return slot
        slot = self.slot_type()
        self.slots[key] = slot
        self.attributes[key] = dict(attributes)
        return slot

    def put(self, amount: Any, attributes: Mapping[str, Any] | None = None) -> None:
        """The instrument's own verb (add / record / set): what `record({name: v})` calls."""
        self._stage(amount, attributes)

    # -- the sampled step --------------------------------------------------------------
    def apply(self, key: AttributeKey, taken: Any, sink: RecordSink) -> None:
        raise NotImplementedError


class StagedCounter(StagedInstrument, Counter):
    kind = "counter"
    slot_type = SumSlot
    monotonic = True

    def __init__(
        self, registry: StagingRegistry, meter: Meter, name: str, unit: str, description: str
    ) -> None:
        sdk = registry.output(meter, "counter", name, unit, description)
        StagedInstrument.__init__(self, registry, name, unit, description, sdk)
        Counter.__init__(self, name, unit=unit, description=description)

    def add(
        self, amount: Any, attributes: Mapping[str, Any] | None = None, context: Any = None
    ) -> None:
        if self.monotonic and type(amount) in (int, float) and amount < 0:
            raise OtelTrainError(
                f"{self.staged_name} is a counter and cannot decrease; got increment {amount}. "
                "Record the per-step amount (e.g. tokens in this batch), not a difference; "
                "for values that go down use create_up_down_counter."
            )
        self._stage(amount, attributes)

    def put(self, amount: Any, attributes: Mapping[str, Any] | None = None) -> None:
        self.add(amount, attributes)

    def apply(self, key: AttributeKey, taken: list[float], sink: RecordSink) -> None:
        total = 0.0
        for amount in taken:
            if amount != amount or amount in (float("inf"), float("-inf")):
                sink.rejected(self.staged_name, amount, "not finite")
            elif self.monotonic and amount < 0:
                sink.rejected(self.staged_name, amount, "negative increment of a counter")
            else:
                total += amount
        if taken:
            self.sdk.add(total, self.attributes.get(key))
            sink.counted(self.staged_name, key, total)


class StagedUpDownCounter(StagedCounter, UpDownCounter):  # type: ignore[misc]
    kind = "up_down_counter"
    monotonic = False

    def __init__(
        self, registry: StagingRegistry, meter: Meter, name: str, unit: str, description: str
    ) -> None:
        sdk = registry.output(meter, "up_down_counter", name, unit, description)
        StagedInstrument.__init__(self, registry, name, unit, description, sdk)
        UpDownCounter.__init__(self, name, unit=unit, description=description)


class StagedGauge(StagedInstrument, _Gauge):
    """Last-value meaning, as OTel gauges have: the value recorded last before export."""

    kind = "gauge"
    slot_type: Callable[[], Any] = LastSlot

    def __init__(
        self, registry: StagingRegistry, meter: Meter, name: str, unit: str, description: str
    ) -> None:
        sdk = registry.output(meter, "gauge", name, unit, description)
        StagedInstrument.__init__(self, registry, name, unit, description, sdk)
        _Gauge.__init__(self, name, unit=unit, description=description)

    def set(
        self, amount: Any, attributes: Mapping[str, Any] | None = None, context: Any = None
    ) -> None:
        self._stage(amount, attributes)

    def apply(self, key: AttributeKey, taken: float | None, sink: RecordSink) -> None:
        if taken is not None:
            sink.set_gauge(self.sdk, self.staged_name, self.attributes.get(key), taken)


class StagedMean(StagedGauge):
    """Exported as the mean of every value since the previous export, plus `<name>_max`."""

    kind = "mean"
    slot_type = MeanSlot

    def __init__(
        self, registry: StagingRegistry, meter: Meter, name: str, unit: str, description: str
    ) -> None:
        super().__init__(registry, meter, name, unit, description)
        self.max_name = max_companion(name)
        self.sdk_max = registry.output(
            meter, "gauge", self.max_name, unit, f"{description}: maximum over the interval"
        )

    def apply(self, key: AttributeKey, taken: Any, sink: RecordSink) -> None:
        if taken is None:
            return
        mean, maximum, _last, _count = taken
        attributes = self.attributes.get(key)
        sink.set_gauge(self.sdk, self.staged_name, attributes, mean)
        sink.set_gauge(self.sdk_max, self.max_name, attributes, maximum)


class StagedHistogram(StagedInstrument, Histogram):
    """Every value of the interval is recorded into the SDK histogram at the sampled step."""

    kind = "histogram"
    slot_type = HistogramSlot

    def __init__(
        self,
        registry: StagingRegistry,
        meter: Meter,
        name: str,
        unit: str,
        description: str,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> None:
        sdk = registry.output(
            meter, "histogram", name, unit, description, buckets=explicit_bucket_boundaries_advisory
        )
        StagedInstrument.__init__(self, registry, name, unit, description, sdk)
        Histogram.__init__(self, name, unit=unit, description=description)

    def record(
        self, amount: Any, attributes: Mapping[str, Any] | None = None, context: Any = None
    ) -> None:
        if type(amount) in (int, float) and amount < 0:
            raise OtelTrainError(
                f"{self.staged_name} is a histogram and OpenTelemetry histograms take values "
                f">= 0; got {amount}. Record signed values (e.g. a reward margin) on a gauge, "
                "or their magnitude here."
            )
        self._stage(amount, attributes)

    def apply(self, key: AttributeKey, taken: list[float], sink: RecordSink) -> None:
        attributes = self.attributes.get(key)
        record = self.sdk.record
        for value in taken:
            if value - value != 0.0:  # NaN or inf
                sink.rejected(self.staged_name, value, "not finite", count_only=True)
            elif value < 0:  # the SDK drops these with a warning per value
                sink.rejected(self.staged_name, value, "negative: OTel histograms take >= 0")
            else:
                record(value, attributes)


_CLASSES: Mapping[str, type[StagedInstrument]] = {
    "counter": StagedCounter,
    "up_down_counter": StagedUpDownCounter,
    "gauge": StagedGauge,
    "mean": StagedMean,
    "histogram": StagedHistogram,
}


class RecordSink:
    """Where resolved numbers land: streams or SDK instruments, the non-finite board (for the
    SDK, which drops NaN), the tallies.

    Built per sampled step by the telemetry; collects what the step's bookkeeping needs
    (counter increments of the standard instruments, how many values were non-finite).
    """

    def __init__(self, board: Any) -> None:
        self.board = board
        self.nonfinite = 0
        self.increments: dict[str, float] = {}
        self.fresh: set[Any] = set()  # gauge series set for this export (see reader.Freshness)
        self._warned: set[str] = set()

    def set_gauge(
        self, sdk: Any, name: str, attributes: Mapping[str, Any] | None, value: float
    ) -> None:
        if type(sdk) is GaugeStream:  # keeps NaN itself, and knows what was set: no board
            sdk.set(value, attributes)
            if value - value != 0.0:
                self.nonfinite += 1
            return
        self.fresh.add(series_key(name, attributes))
        if value - value == 0.0:  # finite (NaN and inf give NaN)
            sdk.set(value, attributes)
            self.board.clear(name, attributes)
        else:
            self.board.mark(name, attributes, value, unit=sdk.unit, description=sdk.description)
            self.nonfinite += 1

    def counted(self, name: str, key: AttributeKey, total: float) -> None:
        if key is None:
            self.increments[name] = self.increments.get(name, 0.0) + total

    def rejected(self, name: str, value: float, why: str, *, count_only: bool = False) -> None:
        self.nonfinite += 1
        if count_only or name in self._warned:
            return
        self._warned.add(name)
        _logger.error(
            "otel-train: %s got %s (%s) from a tensor; the value was dropped and counted in "
            "train.nonfinite, every other value of the step was exported.",
            name,
            value,
            why,
        )


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
        """Register a new instrument (name checked once, here) under its sampling group."""
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


class StagedMeter(Meter):
    """An OTel API `Meter` whose synchronous instruments are step-staged.

    Observable instruments are the SDK's own: their callbacks run when a reader collects.
    """

    def __init__(
        self,
        registry: StagingRegistry,
        sdk_meter: Meter,
        name: str,
        version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> None:
        super().__init__(name, version=version, schema_url=schema_url)
        self._registry = registry
        self._sdk = sdk_meter

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Counter:
        made = self._registry.create("counter", name, unit, description, sdk_meter=self._sdk)
        return made  # type: ignore[return-value]

    def create_up_down_counter(
        self, name: str, unit: str = "", description: str = ""
    ) -> UpDownCounter:
        made = self._registry.create(
            "up_down_counter", name, unit, description, sdk_meter=self._sdk
        )
        return made  # type: ignore[return-value]

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> Histogram:
        made = self._registry.create(
            "histogram",
            name,
            unit,
            description,
            sdk_meter=self._sdk,
            buckets=explicit_bucket_boundaries_advisory,
        )
        return made  # type: ignore[return-value]

    def create_gauge(self, name: str, unit: str = "", description: str = "") -> _Gauge:
        made = self._registry.create("gauge", name, unit, description, sdk_meter=self._sdk)
        return made  # type: ignore[return-value]

    def create_observable_counter(
        self, name: str, callbacks: Any = None, unit: str = "", description: str = ""
    ) -> ObservableCounter:
        self._registry.observable_created(name)
        return self._sdk.create_observable_counter(
            name, callbacks, unit=unit, description=description or describe(name)
        )

    def create_observable_gauge(
        self, name: str, callbacks: Any = None, unit: str = "", description: str = ""
    ) -> ObservableGauge:
        self._registry.observable_created(name)
        return self._sdk.create_observable_gauge(
            name, callbacks, unit=unit, description=description or describe(name)
        )

    def create_observable_up_down_counter(
        self, name: str, callbacks: Any = None, unit: str = "", description: str = ""
    ) -> ObservableUpDownCounter:
        self._registry.observable_created(name)
        return self._sdk.create_observable_up_down_counter(
            name, callbacks, unit=unit, description=description or describe(name)
        )


class StagedMeterProvider(MeterProvider):
    """An OTel API `MeterProvider`: `get_meter()` from any library records into the same
    staged, step-sampled pipeline (`opentelemetry.metrics.set_meter_provider(...)`)."""

    def __init__(self, registry: StagingRegistry, sdk_provider: MeterProvider) -> None:
        self._registry = registry
        self._sdk_provider = sdk_provider
        self._meters: dict[tuple[str, str | None, str | None], StagedMeter] = {}

    def get_meter(
        self,
        name: str,
        version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> Meter:
        identity = (name, version, schema_url)
        meter = self._meters.get(identity)
        if meter is None:
            sdk = self._sdk_provider.get_meter(name, version, schema_url, attributes)
            meter = StagedMeter(self._registry, sdk, name, version, schema_url, attributes)
            self._meters[identity] = meter
        return meter
