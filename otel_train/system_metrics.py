"""Process and host metrics (CPU, RSS, disk and network I/O) from OpenTelemetry's own
`opentelemetry-instrumentation-system-metrics`, observed on GPU-sampled steps and scrapes only.

The instrumentation registers observable instruments on the meter provider it is given; we give
it a thin provider whose meters wrap each callback in `reader.sampled_callback("gpu", ...)`, so
psutil runs when the gpu group is due (every 50 steps by default), never on other sampled steps.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import (
    CallbackOptions,
    CallbackT,
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
from opentelemetry.util.types import Attributes

from otel_train._sdk_compat import system_metrics_known_names
from otel_train.errors import OtelTrainError

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry

_logger = logging.getLogger(__name__)

# The import name of the `opentelemetry-instrumentation-system-metrics` distribution.
_PACKAGE = "opentelemetry.instrumentation.system_metrics"

# The group these instruments ride with (sampling.GROUP_PATTERNS puts process.* and system.* in it).
SYSTEM_METRICS_GROUP = "gpu"

# The instrumentation's config: metric -> the attribute values to report (None: one point).
# Chosen so a row stays small on any host: one point per value except network I/O (per NIC).
# Left out on purpose: per-CPU series (system.cpu.*: 2 x cores points), system.disk.* (every loop
# device and partition, and summing them double-counts), the deprecated process.runtime.*.
# Pass your own mapping to `setup(system_metrics=...)` to add them.
DEFAULT_SYSTEM_METRICS: Mapping[str, tuple[str, ...] | None] = {
    "process.cpu.utilization": None,  # this process, fraction of all CPUs of the host
    "process.memory.usage": None,  # RSS
    "process.disk.io": ("read", "write"),  # this process's bytes from / to storage
    "system.memory.usage": ("used",),
    "system.memory.utilization": ("used",),
    "system.network.io": ("transmit", "receive"),  # per NIC
}
# psutil reports these "since the previous call": the first call has no interval and returns 0.0
# (a silent zero). One call at setup makes the first exported value cover setup -> that step.
_SINCE_PREVIOUS_CALL_SUFFIX = "cpu.utilization"

Callback = Callable[[CallbackOptions], Iterable[Any]]
SystemMetricsOption = bool | Mapping[str, Sequence[str] | None]


class _GatedMeter(Meter):
    """Delegates to the SDK meter; observable callbacks only run when `group` is due."""

    def __init__(self, meter: Meter, gate: Callable[[Callback], Callback], created: list[str]):
        super().__init__(meter.name, meter.version, meter.schema_url)
        self._meter = meter
        self._gate = gate
        self._created = created

    def _callbacks(self, name: str, callbacks: Sequence[CallbackT] | None) -> list[CallbackT]:
        self._created.append(name)
        gated: list[CallbackT] = []
        for callback in callbacks or ():
            if not callable(callback):  # the API's generator form: the instrumentation uses none
                gated.append(callback)
                continue
            if name.endswith(_SINCE_PREVIOUS_CALL_SUFFIX):
                _prime(name, callback)
                callback = _fractions_only(callback)
            gated.append(self._gate(callback))
        return gated

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Counter:
        return self._meter.create_counter(name, unit, description)

    def create_up_down_counter(
        self, name: str, unit: str = "", description: str = ""
    ) -> UpDownCounter:
        return self._meter.create_up_down_counter(name, unit, description)

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> Histogram:
        return self._meter.create_histogram(
            name,
            unit,
            description,
            explicit_bucket_boundaries_advisory=explicit_bucket_boundaries_advisory,
        )

    def create_gauge(self, name: str, unit: str = "", description: str = "") -> _Gauge:
        return self._meter.create_gauge(name, unit, description)  # type: ignore[return-value]

    def create_observable_counter(
        self,
        name: str,
        callbacks: Sequence[CallbackT] | None = None,
        unit: str = "",
        description: str = "",
    ) -> ObservableCounter:
        return self._meter.create_observable_counter(
            name, self._callbacks(name, callbacks), unit, description
        )

    def create_observable_gauge(
        self,
        name: str,
        callbacks: Sequence[CallbackT] | None = None,
        unit: str = "",
        description: str = "",
    ) -> ObservableGauge:
        return self._meter.create_observable_gauge(
            name, self._callbacks(name, callbacks), unit, description
        )

    def create_observable_up_down_counter(
        self,
        name: str,
        callbacks: Sequence[CallbackT] | None = None,
        unit: str = "",
        description: str = "",
    ) -> ObservableUpDownCounter:
        return self._meter.create_observable_up_down_counter(
            name, self._callbacks(name, callbacks), unit, description
        )


class _GatedMeterProvider(MeterProvider):
    """What the instrumentation sees as its meter provider: ours, with gated callbacks."""

    def __init__(self, telemetry: Telemetry, created: list[str]) -> None:
        self._provider = telemetry.provider
        self._reader = telemetry.reader
        self._created = created

    def get_meter(
        self,
        name: str,
        version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> Meter:
        meter = self._provider.get_meter(name, version, schema_url, attributes)

        def gate(callback: Callback) -> Callback:
            return self._reader.sampled_callback(SYSTEM_METRICS_GROUP, callback)

        return _GatedMeter(meter, gate, self._created)


def _fractions_only(callback: Callback) -> Callback:
    """A utilisation is a fraction in [0, 1]. psutil's CPU times tick in 10 ms steps, so over
    a short interval on a loaded host it can report 4.65: such a value is left out (absent),
    never exported as an impossible number."""

    def observe(options: CallbackOptions) -> Iterable[Any]:
        return [o for o in callback(options) if 0.0 <= getattr(o, "value", 0.0) <= 1.0]

    return observe


def _prime(name: str, callback: Callback) -> None:
    try:
        for _ in callback(CallbackOptions()):
            pass
    except Exception as error:  # psutil may refuse in a sandbox; the SDK will log it later
        _logger.debug("otel-train: priming %s failed: %r", name, error)


def resolve_system_metrics_config(
    option: SystemMetricsOption, *, local_rank: int
) -> dict[str, list[str] | None] | None:
    """`True` -> our subset, a mapping -> that one (checked), `False` -> None. Host-wide
    `system.*` metrics come from local rank 0 only (every rank would report the same node)."""
    if option is False:
        return None
    if option is True:
        chosen: Mapping[str, Sequence[str] | None] = DEFAULT_SYSTEM_METRICS
    elif isinstance(option, Mapping):
        chosen = option
        for name, values in option.items():
            if not isinstance(name, str) or not (
                values is None
                or (isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values))
            ):
                raise OtelTrainError(
                    f"system_metrics[{name!r}] must map a metric name to None or a list of "
                    "attribute values, e.g. {'system.network.io': ['transmit', 'receive']}"
                )
    else:
        raise OtelTrainError(
            f"system_metrics must be True, False or a mapping of metric names, got {option!r}"
        )
    _reject_unknown(chosen)
    return {
        name: None if values is None else list(values)
        for name, values in chosen.items()
        if local_rank == 0 or not name.startswith("system.")
    }


def _reject_unknown(config: Mapping[str, object]) -> None:
    """The instrumentation silently skips names it does not know: a typo would report nothing."""
    try:
        system_metrics = importlib.import_module(_PACKAGE)
    except ImportError:
        return  # register_system_metrics says how to install it
    known = system_metrics_known_names(system_metrics)  # the metrics it can report
    if known is None:
        return
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise OtelTrainError(
            f"system_metrics: unknown metric(s) {unknown}; opentelemetry-instrumentation-"
            f"system-metrics knows {sorted(known)}"
        )


def register_system_metrics(
    telemetry: Telemetry, config: Mapping[str, list[str] | None]
) -> list[str]:
    """Instrument `telemetry`'s provider; returns the instrument names ([] and one info line
    without the package).

    Nothing needs undoing at shutdown: the instruments live on this Telemetry's provider and
    the instrumentor instance is this Telemetry's own (see below), so setups one after the
    other, or side by side, each get their own.
    """
    try:
        system_metrics = importlib.import_module(_PACKAGE)
    except ImportError as error:
        _logger.info(
            'otel-train: no process/host metrics (%s): pip install "otel-train[system]"', error
        )
        return []

    base: Any = system_metrics.SystemMetricsInstrumentor

    class PerTelemetrySystemMetrics(base):
        """One instance per Telemetry. The base class is a process-wide singleton whose
        `__init__` re-runs on every construction: it would reset the config under the
        callbacks someone else (`opentelemetry-instrument`, another setup()) registered."""

        def __new__(cls, *args: Any, **kwargs: Any) -> PerTelemetrySystemMetrics:
            return object.__new__(cls)

    created: list[str] = []
    instrumentor = PerTelemetrySystemMetrics(config=dict(config))
    instrumentor.instrument(meter_provider=_GatedMeterProvider(telemetry, created))
    _logger.debug("otel-train: process/host metrics: %s", created)
    return created
