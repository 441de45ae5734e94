"""Step-staged OTel instruments: the OTel meter API, with a training loop's costs.

`tel.meter` / `tel.meter_provider` hand out real OTel API instruments (`Counter`,
`UpDownCounter`, `Histogram`, `_Gauge`) whose `add/record/set(amount, attributes)` accept
numbers and 0-dim tensors on any device. They only stage the value (a reference, or an append
to a short list); on a sampled step of the instrument's group the registry resolves every
pending tensor in one transfer per device and records the numbers into the streams behind
them (`otel_train.series`: our own cumulative aggregation, exported as ordinary OTel data),
or into SDK instruments where the SDK's machinery is needed (a view that changes aggregation or
attributes, exponential histograms).

This module holds the OTel API faces (`StagedMeter`, `StagedMeterProvider`); the instruments
are in `staged_instruments`, the registry in `staging_registry`, the sink in `record_sink`
(re-exported here, where other modules have imported them from).
"""

from __future__ import annotations

from collections.abc import Sequence
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

from otel_train.catalog import describe
from otel_train.record_sink import RecordSink
from otel_train.staged_instruments import (
    OVERFLOW_ATTRIBUTES,
    StagedCounter,
    StagedGauge,
    StagedHistogram,
    StagedInstrument,
    StagedMean,
    StagedUpDownCounter,
)
from otel_train.staging_registry import (
    DEFAULT_MAX_ATTRIBUTE_SETS,
    GLOBAL_STEP,
    StagingRegistry,
    TakenValues,
)

__all__ = [
    "DEFAULT_MAX_ATTRIBUTE_SETS",
    "GLOBAL_STEP",
    "OVERFLOW_ATTRIBUTES",
    "RecordSink",
    "StagedCounter",
    "StagedGauge",
    "StagedHistogram",
    "StagedInstrument",
    "StagedMean",
    "StagedMeter",
    "StagedMeterProvider",
    "StagedUpDownCounter",
    "StagingRegistry",
    "TakenValues",
]


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
