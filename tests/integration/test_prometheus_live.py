"""A real Prometheus (Debian's, 1 s scrape) scraping two real training processes (two ranks)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "grafana" / "dashboards" / "otel-train.json"
PROMETHEUS_YML = REPO / "dashboards" / "prometheus" / "prometheus.yml"
TRAINER = Path(__file__).with_name("prometheus_trainer.py")
RUN = "live-test/run 1"  # a run name that needs escaping in PromQL
RATE_WINDOW = "5s"  # stands in for Grafana's $__rate_interval at a 1 s scrape

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian 'prometheus' package missing (./scripts/test installs it)",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_pair() -> int:
    """A base port whose successor is free too (two ranks: base + local rank)."""
    for _ in range(50):
        base = _free_port()
        if base >= 65535:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return base
    raise RuntimeError("no two consecutive free ports")


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
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


@pytest.fixture
def trainer_ports() -> int:
    return _free_port_pair()


@pytest.fixture
def prometheus(tmp_path: Path, trainer_ports: int) -> Iterator[PrometheusServer]:
    """Our prometheus.yml, with a 1 s scrape and a file_sd targets file naming this test's
    two ranks; temp storage; killed at teardown whatever happens."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = "1s"
    trainers = next(job for job in config["scrape_configs"] if job["job_name"] == "otel-train")
    targets_file = tmp_path / "targets.yml"
    targets_file.write_text(
        yaml.safe_dump(
            [{"targets": [f"127.0.0.1:{trainer_ports}", f"127.0.0.1:{trainer_ports + 1}"]}]
        )
    )
    trainers["file_sd_configs"] = [{"files": [str(targets_file)]}]
    config["scrape_configs"] = [trainers]  # no collector here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        server = PrometheusServer(f"http://127.0.0.1:{port}")
        _wait_for(lambda: server.get("/api/v1/status/buildinfo"), 20, "Prometheus to answer")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def trainers(tmp_path: Path, trainer_ports: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    workdir = tmp_path / "work"
    workdir.mkdir()
    processes = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            OTEL_TRAIN_PROMETHEUS_PORT=str(trainer_ports),
        )
        env.pop("OTEL_TRAIN_PROMETHEUS_ADDRESS", None)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(TRAINER), "--run", RUN, "--workdir", str(workdir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        yield processes
    finally:
        (workdir / "exit").touch()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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


@needs_prometheus
def test_two_ranks_scraped_and_every_dashboard_query_answers(
    prometheus: PrometheusServer,
    trainers: list[subprocess.Popen[bytes]],
    trainer_ports: int,
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "work"
    run_regex = re.escape(RUN).replace("\\", "\\\\")  # a PromQL string literal
    run_selector = f'run="{RUN}"'

    # Both ranks, on their own ports, are up.
    def both_up() -> list[dict[str, Any]] | None:
        up = prometheus.query('up{job="otel-train"} == 1')
        return up if len(up) == 2 else None

    up = _wait_for(both_up, 30, "both trainer ports to be scraped")
    assert {s["metric"]["instance"] for s in up} == {
        f"127.0.0.1:{trainer_ports}",
        f"127.0.0.1:{trainer_ports + 1}",
    }

    # Every PromQL expression of the dashboard returns data for this run.
    queries = dashboard_queries({"run": run_regex, "stage": "sft", "rank": ".*"})
    assert len(queries) >= 15

    missing: list[str] = []

    def every_query_answers() -> bool:
        missing[:] = [title for title, expr in queries if not prometheus.query(expr)]
        return not missing

    try:
        _wait_for(every_query_answers, 30, "every dashboard query to return data")
    except AssertionError:
        raise AssertionError(f"dashboard panels without data: {missing}") from None

    # The variables' label_values() queries see this run, its stage and both ranks.
    runs = prometheus.get("/api/v1/label/run/values", **{"match[]": "train_global_step"})
    assert RUN in runs

    # A rank under load may reach its first sampled step a scrape later than the other.
    def both_ranks_sampled() -> list[str] | None:
        ranks = prometheus.get(
            "/api/v1/label/rank/values", **{"match[]": f"train_global_step{{{run_selector}}}"}
        )
        return sorted(ranks) if sorted(ranks) == ["0", "1"] else None

    assert _wait_for(both_ranks_sampled, 30, "both ranks' sampled steps") == ["0", "1"]

    # Loss carries run / stage / rank labels as plain PromQL labels.
    loss = prometheus.query(f"train_loss{{{run_selector}}}")
    assert {(s["metric"]["stage"], s["metric"]["rank"]) for s in loss} == {
        ("sft", "0"),
        ("sft", "1"),
    }

    # Stop on a sampled step: the scraped counter equals the tokens each rank recorded.
    (workdir / "stop").touch()
    results = {
        rank: _wait_for(
            lambda rank=rank: _read_json(workdir / f"result-rank{rank}.json"),
            30,
            f"rank {rank} to stop",
        )
        for rank in (0, 1)
    }
    for rank, result in results.items():
        assert result["tokens"] > 0
        selector = f'{run_selector},rank="{rank}"'

        def final_scraped(selector: str = selector, result: dict[str, int] = result) -> bool:
            step = prometheus.query(f"train_global_step{{{selector}}}")
            return bool(step) and float(step[0]["value"][1]) == result["step"]

        _wait_for(final_scraped, 15, f"rank {rank}'s last step to be scraped")
        tokens = prometheus.query(f"train_tokens_total{{{selector}}}")
        assert len(tokens) == 1
        assert float(tokens[0]["value"][1]) == result["tokens"]
        assert tokens[0]["metric"]["stage"] == "sft"

    # promtool accepts our exposition text, as scraped from rank 1's endpoint.
    with urllib.request.urlopen(f"http://127.0.0.1:{trainer_ports + 1}/metrics") as response:
        exposition = response.read()
    assert b"train_tokens_total{" in exposition
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr

    (workdir / "exit").touch()
    for process in trainers:
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output.decode(errors="replace")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@needs_prometheus
def test_promtool_accepts_the_shipped_prometheus_config() -> None:
    check = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
