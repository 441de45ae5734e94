"""The step-staged OTel instruments (counter, up-down counter, gauge, mean, histogram).

Each one stages values per attribute set and, at a sampled step, turns what it resolved into
numbers for its stream or SDK instrument (`apply`); the registry decides when.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Counter, Histogram, Meter, UpDownCounter, _Gauge

from otel_train.catalog import max_companion
from otel_train.errors import OtelTrainError
from otel_train.series import AttributeKey, attribute_key
from otel_train.staging import HistogramSlot, LastSlot, MeanSlot, SumSlot, stage_value

if TYPE_CHECKING:
    from otel_train.record_sink import RecordSink
    from otel_train.staging_registry import StagingRegistry

_logger = logging.getLogger(__name__)

# What one instrument may write per row: past this many attribute sets, new ones fold into
# one overflow series (as the SDK's cardinality cap does), so a bug that puts a sample id in
# an attribute cannot fill a disk with 10,000-key JSON rows.
OVERFLOW_ATTRIBUTES: Mapping[str, Any] = {"otel.metric.overflow": True}
_OVERFLOW_KEY = (("otel.metric.overflow", True),)


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


def negative_increment(name: str, amount: Any) -> OtelTrainError:
    """The error for a negative amount added to a monotonic counter (host numbers)."""
    return OtelTrainError(
        f"{name} is a counter and cannot decrease; got increment {amount}. Record the "
        "per-step amount (e.g. tokens in this batch), not a difference; for values that go "
        "down use create_up_down_counter."
    )


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
            raise negative_increment(self.staged_name, amount)
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
