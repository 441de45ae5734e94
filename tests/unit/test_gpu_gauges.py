"""GPU gauges: names, units and device attributes from a fake NVML faithful to pynvml's API;
read only on GPU-sampled steps; absent (and harmless) without NVML."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import Gauge, Sum

from otel_train.gpu import register_gpu_metrics
from otel_train.testing import CapturingExporter
from tests.fakes.fake_pynvml import FakeCuda, FakeDevice, FakeNvml

GIB = 1024**3


def _metrics_by_name(capture: CapturingExporter) -> dict:
    found = {}
    for batch in capture.batches:
        for resource in batch.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = metric
    return found


def _run(tel, steps: int) -> None:
    for step in range(1, steps + 1):
        tel.training.record(loss=1.0)
        tel.step(step)
    tel.flush()


def test_fake_nvml_gauges_have_semconv_names_units_and_device_attributes(telemetry_factory):
    capture = CapturingExporter()
    nvml = FakeNvml([FakeDevice(), FakeDevice(gpu_util_percent=12, power_milliwatts=None)])
    tel = telemetry_factory(
        exporters=[capture], intervals={"train": 5, "gpu": 10}, gpu_metrics=False
    )
    created = register_gpu_metrics(
        tel, nvml=nvml, cuda=FakeCuda(allocated=3 * GIB, reserved=4 * GIB, peak=5 * GIB)
    )
    assert "hw.gpu.utilization" in created and "gpu.memory.allocated" in created
    _run(tel, 10)

    metrics = _metrics_by_name(capture)
    expected_units = {
        "hw.gpu.utilization": "1",
        "hw.gpu.memory.usage": "By",
        "hw.gpu.memory.limit": "By",
        "hw.gpu.memory.utilization": "1",
        "hw.power": "W",
        "gpu.temperature": "Cel",
        "gpu.clock.sm": "Hz",
        "gpu.memory.allocated": "By",
        "gpu.memory.reserved": "By",
        "gpu.memory.peak_allocated": "By",
    }
    for name, unit in expected_units.items():
        assert metrics[name].unit == unit, name
    # Semconv instrument types: memory usage / limit are UpDownCounters (non-monotonic sums).
    assert isinstance(metrics["hw.gpu.memory.usage"].data, Sum)
    assert not metrics["hw.gpu.memory.usage"].data.is_monotonic
    assert isinstance(metrics["hw.gpu.utilization"].data, Gauge)

    utilization = {
        dict(p.attributes)["hw.id"]: p.value for p in metrics["hw.gpu.utilization"].data.data_points
    }
    assert utilization == {"0": 0.87, "1": 0.12}
    power = [dict(p.attributes) for p in metrics["hw.power"].data.data_points]
    assert power == [{"hw.id": "0", "hw.type": "gpu"}]  # device 1 does not support it

    row = capture.rows[-1]
    assert row.step == 10
    assert row.values["gpu/memory_usage/hw_id_0"] == 30 * GIB
    assert row.values["gpu/memory_utilization/hw_id_1"] == 30 / 80
    assert row.values["gpu/power/hw_id_0_hw_type_gpu"] == 350.0
    assert row.values["gpu/temperature/hw_id_0"] == 61.0
    assert row.values["gpu/clock_sm/hw_id_0"] == 1980e6
    assert row.values["gpu/memory_peak_allocated/hw_id_0"] == 5 * GIB


def test_nvml_is_queried_only_on_gpu_sampled_steps(telemetry_factory):
    capture = CapturingExporter()
    nvml = FakeNvml()
    tel = telemetry_factory(
        exporters=[capture], intervals={"train": 1, "gpu": 10}, gpu_metrics=False
    )
    register_gpu_metrics(tel, nvml=nvml, use_nvml=True)
    at_setup = nvml.calls  # the energy counter's starting value, read once
    _run(tel, 9)
    assert nvml.calls == at_setup  # nine train exports, no GPU step yet
    tel.step(10)
    tel.flush()
    assert nvml.calls > at_setup
    assert [r.step for r in capture.rows if "gpu/utilization/hw_id_0" in r.values] == [10]


def test_without_nvml_the_gpu_gauges_are_absent_and_training_goes_on(telemetry_factory, caplog):
    # Real pynvml on a host without a driver: nvmlInit raises NVMLError_LibraryNotFound.
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pytest.skip("this host has a working NVML; the test is about hosts without one")
    capture = CapturingExporter()
    tel = telemetry_factory(exporters=[capture], intervals={"train": 5, "gpu": 5})
    assert register_gpu_metrics(tel) == []  # no NVML library, no CUDA on this host
    _run(tel, 10)
    keys = {key for row in capture.rows for key in row.values}
    assert "train/loss" in keys
    assert not any(key.startswith(("gpu/", "hw/")) for key in keys)


def test_a_prometheus_scrape_reads_the_gpu_gauges_and_promtool_accepts_them(telemetry_factory):
    pytest.importorskip("opentelemetry.exporter.prometheus")
    import shutil
    import subprocess
    import urllib.request

    from exporters.prometheus import PrometheusExporter

    reader = PrometheusExporter(port=0, final_scrape_grace_millis=0)
    nvml = FakeNvml([FakeDevice(), FakeDevice(temperature_c=70)])
    tel = telemetry_factory(exporters=[reader], gpu_metrics=False, intervals={"gpu": 5})
    register_gpu_metrics(tel, nvml=nvml, cuda=FakeCuda(allocated=GIB, reserved=2 * GIB, peak=GIB))
    assert reader.url is not None
    for step in range(1, 7):
        tel.step(step)
    assert tel.flush()
    calls = nvml.calls
    # The scrape serves the GPU-sampled step's values: it never queries NVML itself.
    with urllib.request.urlopen(reader.url, timeout=10) as response:
        exposition = response.read().decode()
    assert nvml.calls == calls
    series = {line.split("{")[0] for line in exposition.splitlines() if not line.startswith("#")}
    assert {
        "hw_gpu_utilization",
        "hw_gpu_memory_usage_bytes",
        "hw_gpu_memory_limit_bytes",
        "gpu_memory_allocated_bytes",
    } <= series
    assert 'hw_id="1"' in exposition and nvml.calls > 0
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr
