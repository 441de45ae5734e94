"""DataLoader workers (fork) inherit the Telemetry: they must export nothing and never hang."""

from __future__ import annotations

import json
import os

import pytest

import otel_train
from tests.integration.otlp_receiver import OtlpReceiver

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STEPS = 200


class TelemetryTouchingDataset(torch.utils.data.Dataset):
    """Each item is made in a forked worker that calls every Telemetry entry point."""

    def __init__(self, tel: otel_train.Telemetry, size: int) -> None:
        self.tel = tel
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        tel = self.tel
        tel.training.record(loss=123.0, tokens=10**6)
        tel.step(10**6 + index)  # would be a sampled step in the parent
        tel.evaluate(loss=9.0)
        tel.flush(100)
        tel.shutdown(timeout_millis=100)
        return torch.full((4,), float(index)), os.getpid()


def test_fork_workers_export_nothing_and_the_parent_writes_each_step_once(tmp_path):
    from exporters.otlp import OtlpExporter, periodic_otlp_reader

    parent = os.getpid()
    with OtlpReceiver() as rx:
        # A time-based reader too: the SDK would restart its thread in every forked worker.
        reader = periodic_otlp_reader(
            export_interval_millis=50, exporter=OtlpExporter(endpoint=rx.endpoint, timeout=5)
        )
        tel = otel_train.setup(
            run="fork", output_dir=tmp_path, exporters=("jsonl", reader), intervals={"train": 1}
        )
        # Whoever collects reports its own pid: a worker's export would show a foreign pid.
        tel.meter.create_observable_gauge(
            "train.exporting_pid", callbacks=[lambda options: [_observation(os.getpid())]]
        )
        loader = torch.utils.data.DataLoader(
            TelemetryTouchingDataset(tel, size=20),
            batch_size=2,
            num_workers=2,
            multiprocessing_context="fork",
        )
        step, worker_pids = 0, set()
        while step < STEPS:  # 10 batches per epoch: a fresh pair of workers every epoch
            for batch, pids in loader:
                step += 1
                worker_pids.update(int(p) for p in pids)
                tel.training.record(loss=batch.mean(), tokens=8)
                tel.step(step)
                if step == STEPS:
                    break
        tel.shutdown(timeout_millis=5_000)
        received = rx.snapshot()
    assert worker_pids and parent not in worker_pids
    rows = [json.loads(line) for line in (tmp_path / "fork" / "rank0.jsonl").open()]
    steps = [row["step"] for row in rows if "train/loss" in row["metrics"]]
    assert steps == list(range(1, STEPS + 1))  # each step once, none from a worker
    assert not any("eval/loss" in row["metrics"] for row in rows)
    assert rows[-1]["metrics"]["final/total_tokens"] == 8 * STEPS
    exporting = {v for r in received for _, v in r.points.get("train.exporting_pid", [])}
    assert exporting == {float(parent)}


def _observation(value: float):
    from opentelemetry.metrics import Observation

    return Observation(value)
