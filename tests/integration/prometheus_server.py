"""A real Prometheus (Debian's 2.42) for the live tests: our prometheus.yml at a 1 s scrape,
file_sd targets naming the test's trainers, temp storage, killed at exit whatever happens.
Plus the dashboard's PromQL with Grafana's variables filled in."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "grafana" / "dashboards" / "otel-train.json"
PROMETHEUS_YML = REPO / "dashboards" / "prometheus" / "prometheus.yml"
RATE_WINDOW = "5s"  # stands in for Grafana's $__rate_interval at a 1 s scrape

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian 'prometheus' package missing (./scripts/test installs it)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A base port whose successor is free too (two ranks: base + local rank)."""
    for _ in range(50):
        base = free_port()
        if base >= 65535:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return base
    raise RuntimeError("no two consecutive free ports")


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


class PrometheusServer:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as response:
                body = json.load(response)
        except OSError:
            return None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        return [] if data is None else data["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query with exactly one series, else None."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None


@contextlib.contextmanager
def running_prometheus(workdir: Path, targets: Sequence[str]) -> Iterator[PrometheusServer]:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = "1s"
    trainers = next(job for job in config["scrape_configs"] if job["job_name"] == "otel-train")
    targets_file = workdir / "targets.yml"
    targets_file.write_text(yaml.safe_dump([{"targets": list(targets)}]))
    trainers["file_sd_configs"] = [{"files": [str(targets_file)]}]
    config["scrape_configs"] = [trainers]  # no collector here
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        server = PrometheusServer(f"http://127.0.0.1:{port}")
        wait_for(lambda: server.get("/api/v1/status/buildinfo"), 20, "Prometheus to answer")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def dashboard_queries(selector_values: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, Grafana variables filled in as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW)
            for name, value in selector_values.items():
                expr = expr.replace(f"${name}", value)
            assert "$" not in expr, f"unfilled variable in {panel['title']!r}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def panel_queries(title: str, selector_values: dict[str, str]) -> list[str]:
    found = [expr for panel, expr in dashboard_queries(selector_values) if panel == title]
    assert found, f"no dashboard panel titled {title!r}"
    return found
