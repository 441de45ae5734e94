"""Sampled steps' OTel objects die where they are made: an exporter that only updates memory
(Prometheus) is called on the finisher thread, and exporters that read only the shared row
(JSON lines, W&B) are queued the row alone. A batch queued for a few ms was promoted by the
garbage collector, and the full collections that followed walked the whole heap (~12 us per
step of a tight loop, `benchmarks/hot_path.py`). What is exported must not change."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

import otel_train
from exporters.jsonl import JsonLinesMetricExporter
from exporters.prometheus import PrometheusExporter
from otel_train.testing import CapturingExporter


class SpyJsonLines(JsonLinesMetricExporter):
    """The real JSON-lines exporter, noting how much OTel data each batch it got held."""

    def __init__(self) -> None:
        super().__init__()
        self.resource_metrics_seen: list[int] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.resource_metrics_seen.append(len(metrics_data.resource_metrics))
        return super().export(metrics_data, timeout_millis, **kwargs)


class SpyPrometheus(PrometheusExporter):
    """The real Prometheus exporter, noting the thread each export ran on."""

    def __init__(self) -> None:
        super().__init__(port=0)
        self.threads: list[str] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.threads.append(threading.current_thread().name)
        return super().export(metrics_data, timeout_millis, **kwargs)


def _train(tel: otel_train.Telemetry, steps: int = 60) -> None:
    for step in range(1, steps + 1):
        tel.record(loss=2.0 + step / 100, learning_rate=1e-3, grad_norm=0.5, tokens=512,
                   samples=4, epoch=0)  # fmt: skip
        tel.step(step)
    tel.evaluate(1.5)


def _lines_without_time(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("time")
        line.pop("run")  # each run has its own name
        line["metrics"].pop("final/wall_time", None)  # wall-clock time, not the step clock
    return lines


def _run(tmp_path: Path, name: str, extra: list[Any]) -> tuple[SpyJsonLines, list[dict[str, Any]]]:
    spy = SpyJsonLines()
    ticks = iter(range(10_000))  # a step takes 0.25 s on this clock: the same rates each run
    intervals = {"train": 5, "perf": 10}
    with otel_train.setup(run=name, output_dir=tmp_path, exporters=[spy, *extra],
                          intervals=intervals, handle_signals=False, gpu_metrics=False,
                          system_metrics=False, clock=lambda: next(ticks) / 4) as tel:  # fmt: skip
        _train(tel)
    assert spy.path is not None
    return spy, _lines_without_time(spy.path)


def test_row_only_exporters_are_queued_the_row_alone_and_write_the_same_lines(
    tmp_path: Path,
) -> None:
    alone, lines_alone = _run(tmp_path, "alone", [])
    # A capturing exporter keeps the OTel batches: everyone is then queued the full batch.
    capture = CapturingExporter()
    beside, lines_beside = _run(tmp_path, "beside", [capture])

    assert alone.resource_metrics_seen and set(alone.resource_metrics_seen) == {0}
    assert beside.resource_metrics_seen and 0 not in beside.resource_metrics_seen
    for line in lines_beside:  # the health counters name every exporter: one more here
        line["metrics"] = {
            key: value for key, value in line["metrics"].items() if "CapturingExporter" not in key
        }
    assert lines_alone == lines_beside
    assert len(lines_alone) == len(capture.rows) >= 12
    keys = set().union(*(line["metrics"] for line in lines_alone))
    # gauges, cumulative counters, the step-time histogram's interval quantiles, events
    assert {"train/loss", "train/num_input_tokens_seen", "perf/step_time_p50",
            "eval/loss"} <= keys  # fmt: skip
    assert [line["step"] for line in lines_alone][:2] == [5, 10]


def test_an_in_memory_exporter_runs_on_the_finisher_thread_and_is_counted(
    tmp_path: Path,
) -> None:
    prometheus = SpyPrometheus()
    capture = CapturingExporter()
    with otel_train.setup(run="prom", output_dir=tmp_path, exporters=[prometheus, capture],
                          intervals={"train": 5, "perf": 10}, handle_signals=False,
                          gpu_metrics=False, system_metrics=False) as tel:  # fmt: skip
        _train(tel)
        tel.flush()
        stats = tel.export_stats()
        exports_so_far = len(prometheus.threads)
        body = prometheus._body()[1].decode()
    sampled = [name for name in prometheus.threads if name == "otel-train-finish"]
    assert len(sampled) == 12  # every sampled step, off the training thread
    # the event (evaluate) exports on the thread that called it, the training thread here
    assert threading.current_thread().name in prometheus.threads
    assert not any(name.startswith("otel-train-export") for name in prometheus.threads)
    assert stats["SpyPrometheus"]["exported"] == exports_so_far == 13
    assert stats["SpyPrometheus"]["exported"] == stats["CapturingExporter"]["exported"]
    assert "train_loss" in body and "eval_loss" in body


class FailingInMemory(CapturingExporter):
    """An in-memory exporter that raises: counted and logged once, training goes on."""

    export_is_in_memory = True

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        raise RuntimeError("broken in-memory exporter")


def test_a_failing_in_memory_exporter_never_reaches_the_loop(tmp_path: Path, caplog: Any) -> None:
    capture = CapturingExporter()
    with otel_train.setup(run="fail", output_dir=tmp_path, exporters=[FailingInMemory(), capture],
                          intervals={"train": 5, "perf": 10}, handle_signals=False,
                          gpu_metrics=False, system_metrics=False) as tel:  # fmt: skip
        _train(tel)
        tel.flush()
        stats = tel.export_stats()
    assert stats["FailingInMemory"] == {"exported": 0, "dropped": 0, "failed": 13}
    assert stats["CapturingExporter"]["exported"] == 13
    assert sum("broken in-memory exporter" in r.getMessage() for r in caplog.records) == 1
