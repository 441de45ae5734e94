"""Process and host metrics from the real opentelemetry-instrumentation-system-metrics (psutil
on this machine): semconv names, the naming rule, observed only on GPU-sampled steps, one
instrumentor per setup, a no-op without the package."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

import otel_train
from otel_train import OtelTrainError, RankInfo
from otel_train.testing import CapturingExporter

pytest.importorskip("opentelemetry.instrumentation.system_metrics")

PROCESS_KEYS = {
    "process/cpu_utilization",
    "process/memory_usage",
    "process/disk_io/direction_read",
    "process/disk_io/direction_write",
}
HOST_KEYS = {"system/memory_usage/state_used", "system/memory_utilization/state_used"}


def _rows(directory: Path) -> list[dict]:
    (path,) = directory.glob("*/rank0.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tel: otel_train.Telemetry, steps: range) -> None:
    for step in steps:
        tel.training.record(loss=1.0, tokens=100)
        if step == steps[-1]:
            # psutil's CPU times tick in 10 ms: over a few ms a utilisation reads > 1 and is
            # left out (by design). Give the last interval time enough to be measurable.
            time.sleep(0.2)
        tel.step(step)


def test_process_and_host_metrics_reach_json_lines_on_gpu_steps_only(tmp_path):
    tel = otel_train.setup(
        run="sys",
        output_dir=tmp_path,
        exporters=("jsonl",),
        intervals={"train": 4, "gpu": 10},  # step 10: the gpu group alone is due
        gpu_metrics=False,
    )
    _run(tel, range(1, 21))
    tel.shutdown()

    rows = {
        row["step"]: row["metrics"]
        for row in _rows(tmp_path)
        if not any(key.startswith("final/") for key in row["metrics"])
    }
    assert sorted(rows) == [4, 8, 10, 12, 16, 20]
    for step in (4, 8, 12, 16):
        assert not any(key.startswith(("process/", "system/")) for key in rows[step])
    always = (PROCESS_KEYS - {"process/cpu_utilization"}) | HOST_KEYS
    assert always <= set(rows[20])
    gpu_row = rows[10]
    assert always <= set(gpu_row)
    # Network I/O per NIC, OTel's device/direction attributes in the key.
    nics = {key for key in gpu_row if key.startswith("system/network_io/")}
    assert "system/network_io/device_lo_direction_receive" in nics
    assert len(nics) == 2 * len(psutil.net_io_counters(pernic=True))
    rss = psutil.Process().memory_info().rss
    assert rss / 2 < gpu_row["process/memory_usage"] < rss * 2
    assert 0 < gpu_row["system/memory_utilization/state_used"] < 1
    # a fraction, or absent when psutil's 10 ms ticks made a short interval read impossible
    for row in (rows[10], rows[20]):
        assert 0 <= row.get("process/cpu_utilization", 0.0) <= 1
    # The subset is small on any host: no per-CPU or per-disk series.
    assert not any(key.startswith(("system/cpu", "system/disk")) for key in gpu_row)


def test_first_cpu_utilization_covers_setup_to_the_first_gpu_step_not_a_silent_zero(
    telemetry_factory,
):
    # psutil's cpu_percent() returns 0.0 on its first call (no interval yet).
    capture = CapturingExporter()
    tel = telemetry_factory(exporters=[capture], intervals={"gpu": 10}, gpu_metrics=False)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn CPU between setup and the first GPU step
        pass
    _run(tel, range(1, 11))
    tel.flush()
    (first,) = capture.values_of("process/cpu_utilization")[:1]
    assert first > 0


def test_psutil_is_not_called_on_train_only_sampled_steps(telemetry_factory, monkeypatch):
    calls = []
    real_memory_info = psutil.Process.memory_info

    def counting_memory_info(self):
        calls.append(1)
        return real_memory_info(self)

    monkeypatch.setattr(psutil.Process, "memory_info", counting_memory_info)
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture], intervals={"train": 1, "gpu": 10}, gpu_metrics=False
    )
    _run(tel, range(1, 10))
    tel.flush()
    assert len(capture.rows) == 9 and calls == []  # nine sampled steps, no psutil
    _run(tel, range(10, 11))
    tel.flush()
    assert calls
    assert capture.steps_with("process/memory_usage") == [10]


def test_two_setups_in_one_process_each_get_system_metrics(tmp_path):
    # The instrumentation's class is a process-wide singleton: the second instrument() of the
    # same instance would only warn "already instrumented" and report nothing.
    first_capture, second_capture, third_capture = (CapturingExporter() for _ in range(3))
    first = otel_train.setup(run="a", output_dir=tmp_path, exporters=[first_capture])
    _run(first, range(1, 51))
    first.shutdown()
    second = otel_train.setup(run="b", output_dir=tmp_path, exporters=[second_capture])
    third = otel_train.setup(run="c", output_dir=tmp_path, exporters=[third_capture])
    _run(second, range(1, 51))
    _run(third, range(1, 51))
    second.shutdown()
    third.shutdown()
    for capture in (first_capture, second_capture, third_capture):
        assert capture.steps_with("process/memory_usage") == [50]


def test_a_users_own_system_metrics_instrumentation_keeps_working(telemetry_factory):
    # e.g. `opentelemetry-instrument python train.py` instruments the global singleton with the
    # full default config; constructing the singleton again would reset that config under its
    # registered callbacks (KeyError at the next collect).
    from opentelemetry.instrumentation.system_metrics import SystemMetricsInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    theirs = SystemMetricsInstrumentor()
    theirs.instrument(meter_provider=provider)
    try:
        capture = CapturingExporter()
        tel = telemetry_factory(exporters=[capture], intervals={"gpu": 10})
        _run(tel, range(1, 11))
        tel.flush()
        assert capture.steps_with("process/memory_usage") == [10]
        names = {
            metric.name
            for resource in reader.get_metrics_data().resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }
        assert {"system.cpu.time", "system.disk.io", "process.cpu.time"} <= names
    finally:
        theirs.uninstrument()
        provider.shutdown()


def test_system_metrics_false_turns_them_off(telemetry_factory):
    capture = CapturingExporter()
    tel = telemetry_factory(exporters=[capture], intervals={"gpu": 10}, system_metrics=False)
    _run(tel, range(1, 11))
    tel.flush()
    assert not any(k.startswith(("process/", "system/")) for r in capture.rows for k in r.values)


def test_without_the_package_setup_says_how_to_install_it_and_training_goes_on(
    telemetry_factory, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.system_metrics", None)
    capture = CapturingExporter()
    with caplog.at_level(logging.INFO, logger="otel_train.system_metrics"):
        tel = telemetry_factory(exporters=[capture], intervals={"train": 10, "gpu": 10})
    _run(tel, range(1, 11))
    tel.flush()
    assert [r.message for r in caplog.records if "otel-train[system]" in r.message]
    assert capture.values_of("train/loss") == [1.0]
    assert not any(k.startswith(("process/", "system/")) for r in capture.rows for k in r.values)


def test_a_mapping_picks_the_metrics_and_a_typo_is_rejected_at_setup(telemetry_factory, tmp_path):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture], intervals={"gpu": 10}, system_metrics={"process.thread.count": None}
    )
    _run(tel, range(1, 11))
    tel.flush()
    keys = {k for r in capture.rows for k in r.values if k.startswith(("process/", "system/"))}
    assert keys == {"process/thread_count"}
    assert capture.values_of("process/thread_count")[0] >= 1
    with pytest.raises(OtelTrainError, match=r"unknown metric.*process\.cpu\.utilisation"):
        otel_train.setup(
            output_dir=tmp_path / "typo",
            exporters=("jsonl",),
            system_metrics={"process.cpu.utilisation": None},
        )
    assert not (tmp_path / "typo").exists()  # rejected before any exporter opened a file
    with pytest.raises(OtelTrainError, match="list of attribute values"):
        otel_train.setup(exporters=[], system_metrics={"system.network.io": "transmit"})


def test_host_wide_metrics_come_from_local_rank_0_only(telemetry_factory):
    capture = CapturingExporter()
    tel = telemetry_factory(
        exporters=[capture],
        intervals={"gpu": 10},
        ranks=RankInfo(rank=3, local_rank=1, world_size=4),
    )
    _run(tel, range(1, 11))
    tel.flush()
    keys = {k for r in capture.rows for k in r.values}
    assert PROCESS_KEYS <= keys  # every rank is its own process
    assert not any(key.startswith("system/") for key in keys)  # one node, reported once


def test_prometheus_names_of_the_system_metrics_pass_promtool(telemetry_factory):
    pytest.importorskip("opentelemetry.exporter.prometheus")
    from exporters.prometheus import PrometheusExporter

    reader = PrometheusExporter(port=0)
    # Prometheus serves what the step-sampled export delivered: run to a gpu-sampled step.
    tel = telemetry_factory(exporters=[reader], gpu_metrics=False, intervals={"gpu": 2})
    _run(tel, range(1, 3))
    tel.flush()
    assert reader.url is not None
    with urllib.request.urlopen(reader.url, timeout=10) as response:
        exposition = response.read().decode()
    series = {line.split("{")[0] for line in exposition.splitlines() if not line.startswith("#")}
    assert {
        "process_cpu_utilization",
        "process_memory_usage_bytes",
        "process_disk_io_bytes_total",
        "system_memory_usage_bytes",
        "system_memory_utilization",
        "system_network_io_bytes_total",
    } <= series
    assert 'direction="transmit"' in exposition and 'rank="0"' in exposition
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr
