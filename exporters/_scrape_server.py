"""The `/metrics` HTTP endpoint: serves bytes already rendered, never collects.

One server thread answers one scrape at a time, at most `MAX_SCRAPES_PER_SECOND`: a scrape
flood queues in the listen backlog instead of taking the GIL from the training thread.
It remembers what each scrape served, so shutdown can wait for the final values to be read.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

_logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Prometheus scrapes every few seconds; even several servers stay far below this. A client
# looping on /metrics is slowed to this rate (each scrape costs ~0.1 ms of the GIL).
MAX_SCRAPES_PER_SECOND = 20.0
# A client that connects and sends nothing holds the single server thread at most this long.
REQUEST_TIMEOUT_SECONDS = 5.0


class ScrapeServer:
    """Serves `body()` (version, bytes) on address:port from one daemon thread."""

    def __init__(
        self,
        address: str,
        port: int,
        body: Callable[[], tuple[int, bytes]],
        *,
        max_scrapes_per_second: float = MAX_SCRAPES_PER_SECOND,
    ) -> None:
        self._body = body
        self._spacing = 1.0 / max_scrapes_per_second if max_scrapes_per_second > 0 else 0.0
        self._next_start = 0.0
        self._served = threading.Condition()
        self._served_version = -1
        self.scrapes = 0
        self._scrape_times: deque[float] = deque(maxlen=8)
        self._httpd = _Server((address, port), _Handler, self)  # raises OSError if taken
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="otel-train-prometheus",
            daemon=True,
        )
        self._thread.start()

    # -- called by the server thread -------------------------------------------------------
    def _pace(self) -> None:
        """Sleep (GIL released) until this scrape's turn; one scrape per `spacing` seconds."""
        now = time.monotonic()
        if now < self._next_start:
            time.sleep(self._next_start - now)
            now = self._next_start
        self._next_start = now + self._spacing

    def _respond(self) -> tuple[int, bytes]:
        return self._body()

    def _record_served(self, version: int) -> None:
        with self._served:
            self.scrapes += 1
            self._served_version = max(self._served_version, version)
            self._scrape_times.append(time.monotonic())
            self._served.notify_all()

    # -- called by the exporter ------------------------------------------------------------
    def wait_until_served(self, version: int, timeout_seconds: float) -> bool:
        """Wait until a scrape has served `version` (or newer), at most `timeout_seconds`.

        Only a scraper with a rhythm is waited for: with fewer than two scrapes so far (nobody
        scraping, or a one-off look such as the demo's own) it returns at once, and it gives
        up when the rhythm says the next scrape is overdue (the scraper went away)."""
        deadline = time.monotonic() + max(timeout_seconds, 0.0)
        with self._served:
            if self.scrapes < 2:
                return False
            while self._served_version < version:
                times = list(self._scrape_times)
                gap = max(b - a for a, b in itertools.pairwise(times))
                limit = min(deadline, times[-1] + 1.5 * gap + 0.2)
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    return False
                self._served.wait(remaining)
            return True

    def close(self, timeout_seconds: float) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(max(timeout_seconds, 0.0))


class _Server(HTTPServer):
    def __init__(self, address: tuple[str, int], handler: Any, owner: ScrapeServer) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._pace()
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is its business; never a traceback on stderr.
        _logger.debug("otel-train: Prometheus scrape from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_SECONDS

    def do_GET(self) -> None:
        version, body = self.server.owner._respond()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.server.owner._record_served(version)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr is noise
