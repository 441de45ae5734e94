"""Prometheus pull endpoint: the SDK's `PrometheusMetricReader` behind its own HTTP server.

Port = base (default 9464) + local rank, so ranks on one node never collide; 127.0.0.1 unless
told otherwise. A scrape only reads the SDK's aggregated values (set on sampled steps): it
never resolves staged tensors, so it never forces a device sync.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import MetricsData

from otel_train.errors import OtelTrainError
from otel_train.nonfinite import NonFiniteBoard, with_nonfinite
from otel_train.run_context import RunContext

try:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server
except ImportError as error:  # pragma: no cover - exercised by the loader's warning path
    raise ImportError(
        f'{error}; the Prometheus exporter needs: pip install "otel-train[prometheus]"'
    ) from error

_logger = logging.getLogger("otel_train.prometheus")

DEFAULT_PORT = 9464
DEFAULT_ADDRESS = "127.0.0.1"
PORT_ENV = "OTEL_TRAIN_PROMETHEUS_PORT"
ADDRESS_ENV = "OTEL_TRAIN_PROMETHEUS_ADDRESS"
# Resource attributes copied onto every series (the SDK otherwise puts them on target_info
# only, which PromQL can reach only through a join).
RESOURCE_LABELS: tuple[str, ...] = ("run", "stage", "rank")


@dataclass(frozen=True, kw_only=True, slots=True)
class PrometheusSettings:
    """Where the endpoint listens: `port` is the base, the rank's port adds its local rank."""

    port: int = DEFAULT_PORT
    address: str = DEFAULT_ADDRESS

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise OtelTrainError(f"Prometheus port must be an int, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise OtelTrainError(f"Prometheus port must be in 0..65535, got {self.port}")
        if not isinstance(self.address, str) or not self.address:
            raise OtelTrainError("Prometheus address must be a host, e.g. '127.0.0.1' or '0.0.0.0'")

    @classmethod
    def resolve(
        cls, *, port: int | None = None, address: str | None = None, env: Mapping[str, str]
    ) -> PrometheusSettings:
        """Arguments > OTEL_TRAIN_PROMETHEUS_PORT / _ADDRESS > defaults."""
        if port is None:
            raw = env.get(PORT_ENV)
            try:
                port = int(raw) if raw else DEFAULT_PORT
            except ValueError:
                raise OtelTrainError(f"{PORT_ENV}={raw!r} is not a port number") from None
        return cls(port=port, address=address or env.get(ADDRESS_ENV) or DEFAULT_ADDRESS)

    def port_for(self, local_rank: int) -> int:
        """Port 0 asks the OS for a free port (tests); otherwise base + local rank."""
        return 0 if self.port == 0 else self.port + local_rank


class PrometheusExporter(PrometheusMetricReader):
    """A pull `MetricReader` serving `/metrics` for one rank.

    `setup(exporters=("prometheus",))` builds one; pass `PrometheusExporter(port=..., address=...)`
    to choose the base port or address. Series carry `run`, `stage` and `rank` labels.
    Each instance has its own prometheus_client registry, so several `setup()` calls in one
    process never clash on the global one.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        address: str | None = None,
        resource_labels: Sequence[str] = RESOURCE_LABELS,
    ) -> None:
        self.settings = PrometheusSettings.resolve(port=port, address=address, env=os.environ)
        self.registry = CollectorRegistry(auto_describe=False)
        labels = frozenset(resource_labels)
        # Scope labels (otel_scope_*) are off: all our instruments share one scope, and empty
        # labels only clutter legends; target_info still carries the full resource.
        super().__init__(
            scope_info_enabled=False,
            resource_attribute_filter=labels.__contains__,
            registry=self.registry,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._bound_port: int | None = None
        self._nonfinite: NonFiniteBoard | None = None

    @property
    def port(self) -> int | None:
        """The port actually serving, or None when the server is not running."""
        return self._bound_port

    @property
    def url(self) -> str | None:
        if self._bound_port is None:
            return None
        return f"http://{self.settings.address}:{self._bound_port}/metrics"

    def bind_run_context(self, context: RunContext) -> None:
        """Called by `setup()`: start serving on base port + this rank's local rank."""
        self.start(local_rank=context.local_rank)

    def start(self, *, local_rank: int = 0) -> bool:
        """Start the HTTP server. A taken port logs one error line and returns False."""
        with self._lock:
            if self._server is not None:
                return True
            port = self.settings.port_for(local_rank)
            try:
                server, thread = start_http_server(
                    port, addr=self.settings.address, registry=self.registry
                )
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
            self._server, self._thread = server, thread
            self._bound_port = int(server.server_address[1])
            _logger.info("otel-train: Prometheus metrics at %s", self.url)
            return True

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        # The SDK's collector queues every collect and only drains on a scrape; a collect
        # without a scrape (force_flush) would then be exposed twice, duplicating families.
        if metrics_data is None:
            return
        if self._nonfinite is not None:
            metrics_data = with_nonfinite(metrics_data, self._nonfinite.snapshot())
        self._collector._metrics_datas.clear()
        self._collector.add_metrics_data(metrics_data)

    def attach_nonfinite_board(self, board: NonFiniteBoard) -> None:
        """setup() hands over the non-finite values the SDK dropped: a NaN loss scrapes as NaN."""
        self._nonfinite = board

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
            self._bound_port = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=max(timeout_millis, 0) / 1000)
        try:
            super().shutdown(timeout_millis=timeout_millis)
        except KeyError:
            pass  # already unregistered


def create_for_run(context: RunContext) -> PrometheusExporter | None:
    """`exporters=("prometheus",)`: every rank serves its own port; None if it is taken."""
    exporter = PrometheusExporter()
    if not exporter.start(local_rank=context.local_rank):
        exporter.shutdown()
        return None
    return exporter
