"""A real OTLP/HTTP metrics receiver for tests: decodes `ExportMetricsServiceRequest` protobuf.

Behaviour per request is scripted: answer 200, answer 500 (with Retry-After: 0 so the SDK's
retry is immediate), or hold the request for a while (a slow collector).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]
    resource: dict[str, Any]
    points: dict[str, list[tuple[dict[str, Any], float]]]  # metric name -> [(attrs, value)]


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def decode(body: bytes) -> tuple[dict[str, Any], dict[str, list[tuple[dict[str, Any], float]]]]:
    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    resource: dict[str, Any] = {}
    points: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for resource_metrics in request.resource_metrics:
        for attr in resource_metrics.resource.attributes:
            resource[attr.key] = _any_value(attr.value)
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                data = getattr(metric, kind)
                for point in data.data_points:
                    attrs = {a.key: _any_value(a.value) for a in point.attributes}
                    if kind == "histogram":
                        value = float(point.sum)
                    else:
                        value = point.as_double if point.HasField("as_double") else point.as_int
                    points.setdefault(metric.name, []).append((attrs, float(value)))
    return resource, points


@dataclass
class OtlpReceiver:
    """`with OtlpReceiver() as rx:`; `rx.endpoint` is the full /v1/metrics URL."""

    script: Callable[[int], tuple[int, float]] = lambda n: (200, 0.0)  # n -> (status, delay)
    received: list[Received] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    number = receiver.requests
                    receiver.requests += 1
                status, delay = receiver.script(number)
                if delay:
                    receiver._stop.wait(delay)  # a slow collector; released at close()
                if status == 200:
                    resource, points = decode(body)
                    with receiver._lock:
                        receiver.received.append(
                            Received(self.path, body, dict(self.headers.items()), resource, points)
                        )
                    payload = ExportMetricsServiceResponse().SerializeToString()
                else:
                    payload = b""
                try:
                    self.send_response(status)
                    if status != 200:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (its timeout): that is the point of some tests

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/metrics"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.02)
        return predicate(self.snapshot())


def free_dead_endpoint() -> str:
    """A 127.0.0.1 URL with nothing listening (connection refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/metrics"
