"""GPU energy (`hw.energy`, J since setup) and `perf.joules_per_token` through setup(), with the
faithful fake NVML standing in for the driver and JSON lines read back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import Sum

import otel_train
import otel_train.gpu
from otel_train.testing import CapturingExporter
from tests.fakes.fake_pynvml import FakeCuda, FakeDevice, FakeNvml

pytest.importorskip("pynvml")
GIB = 1024**3
TOKENS_PER_STEP = 100


@pytest.fixture
def gpu_host(monkeypatch):
    """Two GPUs on the node; this process runs on the second (CUDA_VISIBLE_DEVICES=1: it is
    cuda:0 here, NVML index 1)."""
    devices = [FakeDevice(energy_millijoules=1_000_000), FakeDevice(energy_millijoules=9_000_000)]
    nvml = FakeNvml(devices)
    cuda = FakeCuda(allocated=GIB, reserved=2 * GIB, peak=GIB, nvml_devices=[devices[1]])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # what `import pynvml` finds
    monkeypatch.setattr(otel_train.gpu, "_load_cuda", lambda: cuda)
    return devices


def _rows(directory: Path) -> list[dict]:
    (path,) = directory.glob("*/rank0.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if not any(k.startswith("final/") for k in r["metrics"])]


def _steps(tel, clock, steps: range, devices, *, joules_per_step=(0.0, 0.0), tokens=True):
    for step in steps:
        clock.advance(0.5)
        for device, joules in zip(devices, joules_per_step, strict=True):
            if device.energy_millijoules is not None:
                device.energy_millijoules += int(joules * 1000)
        tel.training.record(loss=1.0, **({"tokens": TOKENS_PER_STEP} if tokens else {}))
        tel.step(step)
        if step % 10 == 0:
            # The finisher thread reads the counters a few ms after the sampled step; this
            # loop would move the fake counters on meanwhile. Real NVML has no such jump.
            tel.flush()


def test_energy_is_joules_since_setup_per_gpu_with_semconv_attributes(gpu_host, clock, tmp_path):
    capture = CapturingExporter()
    tel = otel_train.setup(
        run="energy",
        output_dir=tmp_path,
        exporters=("jsonl", capture),
        intervals={"train": 10, "perf": 10, "gpu": 10},
        clock=clock,
    )
    _steps(tel, clock, range(1, 11), gpu_host, joules_per_step=(3.0, 50.0))
    tel.shutdown()

    (row,) = [r["metrics"] for r in _rows(tmp_path) if r["step"] == 10]
    assert row["gpu/energy/hw_id_0_hw_type_gpu"] == pytest.approx(30.0)  # not 1000 J: since setup
    assert row["gpu/energy/hw_id_1_hw_type_gpu"] == pytest.approx(500.0)
    (energy,) = [
        m
        for b in capture.batches
        for rm in b.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "hw.energy"
    ][:1]
    assert energy.unit == "J" and isinstance(energy.data, Sum) and energy.data.is_monotonic
    assert {tuple(sorted(p.attributes.items())) for p in energy.data.data_points} == {
        (("hw.id", "0"), ("hw.type", "gpu")),
        (("hw.id", "1"), ("hw.type", "gpu")),
    }


def test_joules_per_token_is_this_gpus_energy_delta_over_the_token_delta(gpu_host, clock, tmp_path):
    tel = otel_train.setup(
        run="jpt",
        output_dir=tmp_path,
        exporters=("jsonl",),
        intervals={"train": 10, "perf": 10, "gpu": 50},
        clock=clock,
    )
    # NVML index 0 is another job's GPU: its energy must not count.
    _steps(tel, clock, range(1, 11), gpu_host, joules_per_step=(999.0, 40.0))
    _steps(tel, clock, range(11, 21), gpu_host, joules_per_step=(999.0, 10.0))
    tel.shutdown()

    values = {r["step"]: r["metrics"].get("perf/joules_per_token") for r in _rows(tmp_path)}
    assert values[10] == pytest.approx(40.0 * 10 / (TOKENS_PER_STEP * 10))  # 0.4 J/token
    assert values[20] == pytest.approx(10.0 * 10 / (TOKENS_PER_STEP * 10))


def test_one_process_on_two_gpus_counts_both_and_not_the_idle_third(monkeypatch, clock, tmp_path):
    # e.g. device_map="auto" over cuda:0 and cuda:1; cuda:2 is visible but holds nothing.
    devices = [FakeDevice(), FakeDevice(), FakeDevice()]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices))
    cuda = FakeCuda(GIB, GIB, GIB, nvml_devices=devices, devices_in_use=[0, 1])
    monkeypatch.setattr(otel_train.gpu, "_load_cuda", lambda: cuda)
    tel = otel_train.setup(
        run="two", output_dir=tmp_path, exporters=("jsonl",), intervals={"perf": 10}, clock=clock
    )
    _steps(tel, clock, range(1, 11), devices, joules_per_step=(30.0, 20.0, 70.0))
    tel.shutdown()
    (row,) = [r["metrics"] for r in _rows(tmp_path) if r["step"] == 10]
    assert row["perf/joules_per_token"] == pytest.approx((30.0 + 20.0) / TOKENS_PER_STEP)


def test_joules_per_token_is_absent_never_zero_or_stale(gpu_host, clock, tmp_path):
    tel = otel_train.setup(
        run="absent",
        output_dir=tmp_path,
        exporters=("jsonl",),
        intervals={"train": 10, "perf": 10, "gpu": 50},
        clock=clock,
    )
    _steps(tel, clock, range(1, 11), gpu_host, joules_per_step=(0.0, 20.0))
    _steps(tel, clock, range(11, 21), gpu_host, joules_per_step=(0.0, 20.0), tokens=False)
    _steps(tel, clock, range(21, 31), gpu_host, joules_per_step=(0.0, 0.0))  # counter idle
    tel.shutdown()

    rows = {r["step"]: r["metrics"] for r in _rows(tmp_path)}
    assert rows[10]["perf/joules_per_token"] == pytest.approx(0.2)
    assert "perf/joules_per_token" not in rows[20]  # no tokens: not the last value, not inf
    assert "perf/tokens_per_second" in rows[30]
    assert "perf/joules_per_token" not in rows[30]  # no energy counted: not 0


def test_a_gpu_without_an_energy_counter_has_no_energy_metrics(monkeypatch, clock, tmp_path):
    # Pascal and older: nvmlDeviceGetTotalEnergyConsumption raises NVMLError_NotSupported.
    devices = [FakeDevice(energy_millijoules=None)]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices))
    cuda = FakeCuda(allocated=GIB, reserved=GIB, peak=GIB, nvml_devices=devices)
    monkeypatch.setattr(otel_train.gpu, "_load_cuda", lambda: cuda)
    tel = otel_train.setup(
        run="old-gpu", output_dir=tmp_path, exporters=("jsonl",), intervals={"gpu": 10}, clock=clock
    )
    _steps(tel, clock, range(1, 21), devices, joules_per_step=(0.0,))
    tel.shutdown()

    keys = {key for row in _rows(tmp_path) for key in row["metrics"]}
    assert "gpu/utilization/hw_id_0" in keys and "perf/tokens_per_second" in keys
    assert not any("energy" in key or "joules" in key for key in keys)


def test_joules_per_token_leaves_out_the_energy_of_a_resume_pause(gpu_host, clock, tmp_path):
    tel = otel_train.setup(
        run="resume",
        output_dir=tmp_path,
        exporters=("jsonl",),
        intervals={"train": 10, "perf": 10, "gpu": 50},
        clock=clock,
    )
    gpu_host[1].energy_millijoules += 5_000_000  # loading the checkpoint: 5 kJ, no tokens
    tel.resume_from(100)
    _steps(tel, clock, range(101, 111), gpu_host, joules_per_step=(0.0, 30.0))
    tel.shutdown()

    (row,) = [r["metrics"] for r in _rows(tmp_path) if r["step"] == 110]
    assert row["perf/joules_per_token"] == pytest.approx(0.3)


def test_with_reduced_tokens_joules_per_token_is_left_out(gpu_host, clock, tmp_path):
    # reduce_across_ranks=True makes rank 0's tokens global while the energy is its own GPU's.
    tel = otel_train.setup(
        run="reduced",
        output_dir=tmp_path,
        exporters=("jsonl",),
        intervals={"perf": 10},
        clock=clock,
        reduce_across_ranks=True,
    )
    _steps(tel, clock, range(1, 11), gpu_host, joules_per_step=(0.0, 30.0))
    tel.shutdown()
    keys = {key for row in _rows(tmp_path) for key in row["metrics"]}
    assert "perf/tokens_per_second" in keys and "perf/joules_per_token" not in keys


def test_prometheus_names_of_the_energy_metrics_pass_promtool(gpu_host, clock):
    pytest.importorskip("opentelemetry.exporter.prometheus")
    import shutil
    import subprocess
    import urllib.request

    from exporters.prometheus import PrometheusExporter

    reader = PrometheusExporter(port=0)
    tel = otel_train.setup(
        run="prom-energy", exporters=[reader], intervals={"perf": 10, "gpu": 10}, clock=clock
    )
    try:
        _steps(tel, clock, range(1, 11), gpu_host, joules_per_step=(1.0, 20.0))
        tel.flush()  # Prometheus serves what the step-sampled export delivered
        assert reader.url is not None
        with urllib.request.urlopen(reader.url, timeout=10) as response:
            exposition = response.read().decode()
    finally:
        tel.shutdown()
    series = {line.split("{")[0] for line in exposition.splitlines() if not line.startswith("#")}
    assert {"hw_energy_joules_total", "perf_joules_per_token"} <= series
    (value,) = [
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith("perf_joules_per_token{")
    ]
    assert value == pytest.approx(0.2)
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr
