"""Tensors recorded through `tel.meter` (every kind, with attributes) reach JSON lines, a W&B
offline run file and a real Prometheus server as exact numbers, with no exporter failure."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import otel_train
from exporters.prometheus import PrometheusExporter

torch = pytest.importorskip("torch")
wandb = pytest.importorskip("wandb")

from tests.wandb_records import find_run_file, read_finished_run  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian 'prometheus' missing"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return list(json.load(response)["data"]["result"])
    except OSError:
        return []


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_meter_instruments_with_tensors_reach_jsonl_wandb_and_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    metrics_port, server_port = _free_port(), _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: t\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{server_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{server_port}"
    try:
        tel = otel_train.setup(
            run="meter-backends",
            output_dir=tmp_path / "runs",
            exporters=("jsonl", "wandb", PrometheusExporter(port=metrics_port)),
            intervals={"train": 5, "perf": 5},
        )
        reward = tel.meter.create_gauge("train.reward")
        chosen = tel.meter.create_counter("train.chosen_tokens", unit="{token}")
        depth = tel.meter.create_up_down_counter("train.queue_depth")
        margin = tel.meter.create_histogram("train.margin")
        for step in range(1, 11):
            reward.set(torch.tensor(0.5 * step))
            reward.set(torch.tensor(2.0 * step), {"dataset": "code"})
            chosen.add(torch.tensor(10))
            chosen.add(torch.tensor(3), {"dataset": "code"})
            depth.add(torch.tensor(2.0))
            depth.add(torch.tensor(-1.0))
            margin.record(torch.tensor(0.25), {"dataset": "code"})
            tel.record(loss=torch.tensor(1.0))
            tel.step(step)
        tel.flush()
        # A real scrape of the exported state at step 10: every kind, labels from attributes.
        expected = {
            'train_reward{dataset=""}': 5.0,
            'train_reward{dataset="code"}': 20.0,
            'train_chosen_tokens_total{dataset=""}': 100.0,
            'train_chosen_tokens_total{dataset="code"}': 30.0,
            "train_queue_depth": 10.0,
        }
        for selector, value in expected.items():
            name, _, labels = selector.partition("{")
            expr = f'{name}{{job="t",{labels}' if labels else f'{name}{{job="t"}}'
            result = _wait(lambda e=expr: _query(base, e), 30, f"Prometheus to scrape {expr}")
            assert float(result[0]["value"][1]) == value, selector
        count = _wait(
            lambda: _query(base, 'train_margin_count{job="t",dataset="code"}'), 30, "histogram"
        )
        assert float(count[0]["value"][1]) == 10.0
        tel.shutdown()
        assert all(stats["failed"] == 0 for stats in tel.export_stats().values())
    finally:
        server.terminate()
        server.wait(timeout=10)

    rows = [json.loads(x) for x in (tel.context.run_dir / "rank0.jsonl").read_text().splitlines()]
    at_10 = next(r["metrics"] for r in rows if r["step"] == 10 and "train/reward" in r["metrics"])
    assert at_10["train/reward"] == 5.0 and at_10["train/reward/dataset_code"] == 20.0
    assert at_10["train/chosen_tokens"] == 100.0
    assert at_10["train/chosen_tokens/dataset_code"] == 30.0
    assert at_10["train/queue_depth"] == 10.0
    assert at_10["train/margin/dataset_code"] == pytest.approx(0.25)
    assert at_10["train/margin/dataset_code_p50"] == pytest.approx(0.25, rel=0.05)

    run = read_finished_run(find_run_file(tmp_path))
    history = dict(zip(run.history_steps, run.history, strict=True))
    for key in ("train/reward", "train/reward/dataset_code", "train/chosen_tokens",
                "train/queue_depth", "train/margin/dataset_code"):  # fmt: skip
        assert history[10][key] == pytest.approx(at_10[key]), key
    wandb.teardown()
