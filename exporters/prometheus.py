"""Prometheus pull endpoint for one rank, fed by the step-sampled export (a push exporter).

Each export (a sampled step, an event, the tail at shutdown) updates the latest values (a
dict update per metric: export threads hold the GIL the training thread needs); the
exposition is shaped and rendered at most once per export, on the first scrape after it, and
every scrape is served those bytes. A scrape never collects, never resolves staged tensors, never
forces a device sync. Port = base (default 9464) + local rank; 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from exporters._prometheus_data import LatestMetrics, classic
from exporters._scrape_server import ScrapeServer
from otel_train.errors import OtelTrainError
from otel_train.reduction import values_global_of, with_scope
from otel_train.run_context import RunContext

try:
    # The OTel Prometheus exporter's translation (names, units, labels, target_info), used
    # as a pure function: MetricsData in, prometheus_client families out. Its reader is not
    # used: it collects on every scrape.
    from prometheus_client.exposition import generate_latest

    from otel_train._sdk_compat import prometheus_translator_class

    _PrometheusTranslator = prometheus_translator_class()
except ImportError as error:  # pragma: no cover - exercised by the loader's warning path
    raise ImportError(
        f'{error}; the Prometheus exporter needs: pip install "otel-train[prometheus]"'
    ) from error

_logger = logging.getLogger("otel_train.prometheus")

DEFAULT_PORT = 9464
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_FINAL_SCRAPE_GRACE_MILLIS = 5_000
PORT_ENV = "OTEL_TRAIN_PROMETHEUS_PORT"
ADDRESS_ENV = "OTEL_TRAIN_PROMETHEUS_ADDRESS"
GRACE_ENV = "OTEL_TRAIN_PROMETHEUS_GRACE_MILLIS"
# Resource attributes copied onto every series (the SDK otherwise puts them on target_info
# only, which PromQL can reach only through a join).
RESOURCE_LABELS: tuple[str, ...] = ("run", "stage", "rank")
_CUMULATIVE = {
    kind: AggregationTemporality.CUMULATIVE
    for kind in (
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    )
}


@dataclass(frozen=True, kw_only=True, slots=True)
class PrometheusSettings:
    """Where the endpoint listens (`port` is the base, the rank's port adds its local rank),
    and how long shutdown keeps serving so a scraper can read the final values."""

    port: int = DEFAULT_PORT
    address: str = DEFAULT_ADDRESS
    final_scrape_grace_millis: float = DEFAULT_FINAL_SCRAPE_GRACE_MILLIS

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise OtelTrainError(f"Prometheus port must be an int, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise OtelTrainError(f"Prometheus port must be in 0..65535, got {self.port}")
        if not isinstance(self.address, str) or not self.address:
            raise OtelTrainError("Prometheus address must be a host, e.g. '127.0.0.1' or '0.0.0.0'")
        grace = self.final_scrape_grace_millis
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
            raise OtelTrainError(
                f"final_scrape_grace_millis must be a number of milliseconds >= 0, got {grace!r}"
            )

    @classmethod
    def resolve(
        cls,
        *,
        port: int | None = None,
        address: str | None = None,
        final_scrape_grace_millis: float | None = None,
        env: Mapping[str, str],
    ) -> PrometheusSettings:
        """Arguments > OTEL_TRAIN_PROMETHEUS_PORT / _ADDRESS / _GRACE_MILLIS > defaults."""
        if port is None:
            raw = env.get(PORT_ENV)
            try:
                port = int(raw) if raw else DEFAULT_PORT
            except ValueError:
                raise OtelTrainError(f"{PORT_ENV}={raw!r} is not a port number") from None
        if final_scrape_grace_millis is None:
            raw = env.get(GRACE_ENV)
            try:
                final_scrape_grace_millis = float(raw) if raw else DEFAULT_FINAL_SCRAPE_GRACE_MILLIS
            except ValueError:
                raise OtelTrainError(
                    f"{GRACE_ENV}={raw!r} is not a number of milliseconds; e.g. 5000, or 0 to "
                    "stop serving at once at shutdown"
                ) from None
        return cls(
            port=port,
            address=address or env.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
            final_scrape_grace_millis=final_scrape_grace_millis,
        )

    def port_for(self, local_rank: int) -> int:
        """Port 0 asks the OS for a free port (tests); otherwise base + local rank."""
        return 0 if self.port == 0 else self.port + local_rank


class PrometheusExporter(MetricExporter):
    """Serves `/metrics` for one rank with the values of its last export.

    `setup(exporters=("prometheus",))` builds one; pass `PrometheusExporter(port=..., address=...,
    final_scrape_grace_millis=...)` to choose. Series carry `run`, `stage` and `rank` labels;
    reduced instruments also `scope` ("global" on the rank exporting all-rank values, else
    "rank"). A push `MetricExporter`: in a plain OTel pipeline put it behind any reader
    (e.g. `PeriodicExportingMetricReader`) and call `start()`.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        address: str | None = None,
        final_scrape_grace_millis: float | None = None,
        resource_labels: Sequence[str] = RESOURCE_LABELS,
    ) -> None:
        self.settings = PrometheusSettings.resolve(
            port=port,
            address=address,
            final_scrape_grace_millis=final_scrape_grace_millis,
            env=os.environ,
        )
        super().__init__(preferred_temporality=_CUMULATIVE)  # type: ignore[arg-type]
        # export() only keeps the newest values in memory (scrapes render them): the reader
        # calls it on the finisher thread rather than through a queue (InMemoryExport).
        self.export_is_in_memory = True
        self._resource_labels = frozenset(resource_labels)
        self._context: RunContext | None = None  # what the reduction did, if no batch says
        self._latest_global = False  # the scope of the newest export's reduced values
        self._lock = threading.Lock()  # latest values: export thread vs. scrape thread
        self._latest = LatestMetrics()
        self._version = 0
        self._render_lock = threading.Lock()
        self._rendered: tuple[int, bytes] = (0, b"")
        self.renders = 0  # how often the exposition was rendered (at most once per export)
        self._server_lock = threading.Lock()
        self._server: ScrapeServer | None = None

    @property
    def port(self) -> int | None:
        """The port actually serving, or None when the server is not running."""
        server = self._server
        return None if server is None else server.port

    @property
    def url(self) -> str | None:
        port = self.port
        return None if port is None else f"http://{self.settings.address}:{port}/metrics"

    @property
    def scrapes(self) -> int:
        """Scrapes served since start."""
        server = self._server
        return 0 if server is None else server.scrapes

    def bind_run_context(self, context: RunContext) -> None:
        """Called by `setup()`: label reduced values, serve on base port + local rank."""
        self._context = context
        self.start(local_rank=context.local_rank)

    def start(self, *, local_rank: int = 0) -> bool:
        """Start the HTTP server. A taken port logs one error line and returns False."""
        with self._server_lock:
            if self._server is not None:
                return True
            port = self.settings.port_for(local_rank)
            try:
                self._server = ScrapeServer(self.settings.address, port, self._body)
            except OSError as error:
                _logger.error(
                    "otel-train: Prometheus cannot listen on %s:%d (%s); set %s (base port, "
                    "plus local rank %d) or PrometheusExporter(port=...) to a free port. "
                    "Training continues without Prometheus.",
                    self.settings.address,
                    port,
                    error.strerror or error,
                    PORT_ENV,
                    local_rank,
                )
                return False
            _logger.info("otel-train: Prometheus metrics at %s", self.url)
            return True

    # -- the export thread: keep the latest values --------------------------------------
    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Remember each metric's newest (cumulative) state; a batch holds only the groups
        due at its step, the others keep their values from earlier exports. Shaping for
        Prometheus waits for the next scrape (exports come every few ms, scrapes every ~15 s)."""
        global_values = values_global_of(metrics_data, self._context)
        with self._lock:
            self._latest.update(metrics_data)
            self._latest_global = global_values
            self._version += 1
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    # -- the scrape thread: bytes rendered at most once per export -----------------------
    def _body(self) -> tuple[int, bytes]:
        with self._render_lock:
            with self._lock:
                version = self._version
                if self._rendered[0] == version:
                    return self._rendered
                resource = self._latest.resource
                latest = self._latest.snapshot()
                global_values = self._latest_global
            body = _render(resource, latest, self._resource_labels, global_values)
            self._rendered = (version, body)
            self.renders += 1
            return self._rendered

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Keep serving until a scrape has read the final export (at most the grace, within
        `timeout_millis`; at once if nobody ever scraped), then stop the server."""
        with self._server_lock:
            server = self._server
        if server is None:
            return
        budget = max(timeout_millis, 0.0)
        grace = min(self.settings.final_scrape_grace_millis, budget)
        with self._lock:
            final = self._version
        if final and grace > 0:
            server.wait_until_served(final, grace / 1000)
        with self._server_lock:
            self._server = None
        server.close(timeout_seconds=max(budget - grace, 100.0) / 1000)


class _Families:
    """What `generate_latest` needs: something with `collect()`."""

    def __init__(self, families: Iterable[Any]) -> None:
        self._families = list(families)

    def collect(self) -> list[Any]:
        return self._families


def _render(
    resource: Resource | None,
    latest: Sequence[tuple[InstrumentationScope, Metric]],
    resource_labels: frozenset[str],
    global_values: bool,
) -> bytes:
    if resource is None:
        return b""
    by_scope: dict[str, tuple[InstrumentationScope, list[Metric]]] = {}
    for scope, metric in latest:
        by_scope.setdefault(scope.name, (scope, []))[1].append(classic(metric))
    scopes = [ScopeMetrics(scope, metrics, "") for scope, metrics in by_scope.values()]
    data = with_scope(
        MetricsData([ResourceMetrics(resource, scopes, "")]), global_values=global_values
    )
    # Scope labels (otel_scope_*) are off: our instruments share one scope, and empty labels
    # only clutter legends; target_info still carries the full resource.
    collector = _PrometheusTranslator(
        scope_info_enabled=False, resource_attribute_filter=resource_labels.__contains__
    )
    collector.add_metrics_data(data)
    return generate_latest(_Families(collector.collect()))  # type: ignore[arg-type]


def create_for_run(context: RunContext) -> PrometheusExporter | None:
    """`exporters=("prometheus",)`: every rank serves its own port; None if it is taken."""
    exporter = PrometheusExporter()
    exporter.bind_run_context(context)
    return exporter if exporter.port is not None else None
