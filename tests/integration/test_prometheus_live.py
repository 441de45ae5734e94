"""A real Prometheus (Debian's, 1 s scrape) scraping two real training processes (two ranks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.prometheus_server import (
    PrometheusServer,
    dashboard_queries,
    free_port_pair,
    needs_prometheus,
    panel_queries,
    running_prometheus,
    wait_for,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = REPO / "dashboards" / "prometheus" / "prometheus.yml"
TRAINER = Path(__file__).with_name("prometheus_trainer.py")
RUN = "live-test/run 1"  # a run name that needs escaping in PromQL


@pytest.fixture
def trainer_ports() -> int:
    return free_port_pair()


@pytest.fixture
def prometheus(tmp_path: Path, trainer_ports: int) -> Iterator[PrometheusServer]:
    """Our prometheus.yml at a 1 s scrape, its file_sd naming this test's two ranks."""
    targets = [f"127.0.0.1:{trainer_ports}", f"127.0.0.1:{trainer_ports + 1}"]
    with running_prometheus(tmp_path, targets) as server:
        yield server


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

    up = wait_for(both_up, 30, "both trainer ports to be scraped")
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
        wait_for(every_query_answers, 30, "every dashboard query to return data")
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

    assert wait_for(both_ranks_sampled, 30, "both ranks' sampled steps") == ["0", "1"]

    # Loss carries run / stage / rank labels as plain PromQL labels.
    loss = prometheus.query(f"train_loss{{{run_selector}}}")
    assert {(s["metric"]["stage"], s["metric"]["rank"]) for s in loss} == {
        ("sft", "0"),
        ("sft", "1"),
    }

    # Stop on a sampled step: the scraped counter equals the tokens each rank recorded.
    (workdir / "stop").touch()
    results = {
        rank: wait_for(
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

        wait_for(final_scraped, 15, f"rank {rank}'s last step to be scraped")
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


def _start_trainer(
    workdir: Path, rank: int, world: int, base_port: int, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    environment = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OTEL_TRAIN_PROMETHEUS_PORT=str(base_port),
        **env,
    )
    environment.pop("OTEL_TRAIN_PROMETHEUS_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, str(TRAINER), "--workdir", str(workdir), *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(processes: list[subprocess.Popen[bytes]], workdir: Path) -> None:
    (workdir / "exit").touch()
    for process in processes:
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        assert process.returncode == 0, output.decode(errors="replace")[-3000:]


@needs_prometheus
def test_the_steps_after_the_last_sampled_step_reach_prometheus(
    prometheus: PrometheusServer, trainer_ports: int, tmp_path: Path
) -> None:
    """A run that ends 3 steps past its last sampled step: shutdown exports the tail and the
    endpoint stays up (grace) until Prometheus has scraped it, so the scraped token counter
    equals every token recorded, final/* included."""
    workdir = tmp_path / "tail"
    workdir.mkdir()
    run = "tail-run"
    trainer = _start_trainer(workdir, 0, 1, trainer_ports, "--run", run, "--tail", "3")
    try:
        selector = f'run="{run}"'

        def last(name: str) -> float | None:
            # The trainer exits: its series go stale, the last sample stays in range queries.
            return prometheus.value(f"last_over_time({name}{{{selector}}}[5m])")

        def scraped_twice() -> bool:  # a scraper with a rhythm, as a long run would have
            count = prometheus.value(f"count_over_time(train_global_step{{{selector}}}[5m])")
            return count is not None and count >= 2

        wait_for(scraped_twice, 30, "two scrapes of the trainer")
        (workdir / "stop").touch()
        result = wait_for(lambda: _read_json(workdir / "result-rank0.json"), 30, "the stop")
        assert result["step"] % 5 == 3  # the run ended off a sampled step
        wait_for(lambda: last("train_global_step") == result["step"], 20, "the tail scraped")
        assert last("train_tokens_total") == result["tokens"]
        assert last("final_total_tokens") == result["tokens"]
    finally:
        _finish([trainer], workdir)


@needs_prometheus
def test_reduced_ranks_are_counted_once_by_every_all_ranks_panel(
    prometheus: PrometheusServer, trainer_ports: int, tmp_path: Path
) -> None:
    """Two gloo ranks with reduce_across_ranks=True: rank 0 serves the global values
    (scope="global"), rank 1 its own (scope="rank"); the dashboard's all-rank panels count
    each token once, and every panel answers (non-finite at 0: nothing was NaN)."""
    workdir = tmp_path / "reduce"
    workdir.mkdir()
    run = "reduce-run"
    steps = 400
    gloo = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port_pair()),
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}  # fmt: skip
    trainers = [
        _start_trainer(
            workdir, rank, 2, trainer_ports, "--run", run, "--reduce", "--steps", str(steps), **gloo
        )
        for rank in (0, 1)
    ]
    try:
        results = [
            wait_for(lambda r=rank: _read_json(workdir / f"result-rank{r}.json"), 90, "the run")
            for rank in (0, 1)
        ]
        per_step = {rank: 128 * (rank + 1) for rank in (0, 1)}
        assert [r["tokens"] for r in results] == [per_step[0] * steps, per_step[1] * steps]
        variables = {"run": run, "stage": "sft", "rank": ".*"}
        selector = f'run="{run}"'

        def final_scraped() -> bool:
            return all(
                prometheus.value(f'train_global_step{{{selector},rank="{rank}"}}') == steps
                for rank in (0, 1)
            )

        wait_for(final_scraped, 30, "both ranks' last step in Prometheus")
        global_tokens = (per_step[0] + per_step[1]) * steps
        # The series say what they hold.
        assert prometheus.value(f'train_tokens_total{{{selector},scope="global"}}') == global_tokens
        assert prometheus.value(f'train_tokens_total{{{selector},scope="rank"}}') == (
            per_step[1] * steps
        )
        (tokens_total,) = panel_queries("Tokens (all ranks)", variables)
        assert prometheus.value(tokens_total) == global_tokens  # not global + rank 1's own
        (tokens_per_second,) = panel_queries("Tokens/s (all ranks)", variables)
        shown = prometheus.value(tokens_per_second)
        global_rate = prometheus.value(f'perf_tokens_per_second{{{selector},scope="global"}}')
        assert shown is not None and shown == global_rate
        steps_per_second = prometheus.value(f'perf_steps_per_second{{{selector},rank="1"}}')
        assert steps_per_second
        # Both ranks run in lock step: the job's rate is (128 + 256) tokens per step, where
        # summing rank 0's global rate with rank 1's own would read (384 + 256) per step.
        assert shown / steps_per_second == pytest.approx(per_step[0] + per_step[1], rel=0.3)
        for title in ("Tokens/s, sum over ranks", "Samples/s, sum over ranks"):
            for expr in panel_queries(title, variables):
                assert len(prometheus.query(expr)) == 1, (title, expr)  # one all-rank series
        missing = [
            title for title, expr in dashboard_queries(variables) if not prometheus.query(expr)
        ]
        assert not missing, f"dashboard panels without data: {missing}"
        assert prometheus.value(f"sum(train_nonfinite_total{{{selector}}})") == 0.0
    finally:
        _finish(trainers, workdir)
