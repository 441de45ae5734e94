"""OTLP to a collector: a real OTLP/HTTP receiver on 127.0.0.1 decoding the protobuf it gets.

Down, slow, and 500-then-200 endpoints: step() stays fast (export is off-thread), data is
retried per the SDK's OTLP rules or dropped and counted, shutdown returns within its budget.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import otel_train
from tests.integration.otlp_receiver import OtlpReceiver, free_dead_endpoint

pytest.importorskip("opentelemetry.exporter.otlp.proto.http.metric_exporter")

pytestmark = pytest.mark.integration

# A generous bound on the slowest step() call: a blocked export would take seconds.
MAX_STEP_SECONDS = 0.5


def _train(tel: otel_train.Telemetry, steps: int, *, start: int = 1) -> float:
    """Run `steps` steps; return the slowest step() call."""
    slowest = 0.0
    for step in range(start, start + steps):
        tel.training.record(loss=1.0 / step, tokens=100, samples=2, learning_rate=1e-3)
        began = time.perf_counter()
        tel.step(step)
        slowest = max(slowest, time.perf_counter() - began)
    return slowest


def _otlp_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str, **options):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2")  # seconds, SDK rule
    options.setdefault("intervals", {"train": 1, "perf": 5})
    return otel_train.setup(
        run="otlp", output_dir=tmp_path, exporters=("otlp", "jsonl"), handle_signals=False,
        **options,
    )  # fmt: skip


def test_otlp_receiver_gets_step_sampled_metrics_with_rank_resource(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=ml")
    with OtlpReceiver() as rx:
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.base_url)  # SDK appends /v1/metrics
        tel = otel_train.setup(
            run="otlp", output_dir=tmp_path, exporters=("otlp",), handle_signals=False,
            intervals={"train": 5, "perf": 10}, ranks=otel_train.RankInfo(rank=3, local_rank=1,
            world_size=4),
        )  # fmt: skip
        _train(tel, 20)
        assert tel.flush(5_000)
        tel.shutdown(timeout_millis=5_000)
        got = rx.snapshot()
    assert got, "the receiver decoded no request"
    assert {r.path for r in got} == {"/v1/metrics"}
    assert all(r.headers.get("x-team") == "ml" for r in got)
    resource = got[0].resource
    assert (resource["rank"], resource["local_rank"], resource["world_size"]) == (3, 1, 4)
    assert resource["service.name"] == "otel-train" and resource["run"] == "otlp"
    steps = sorted({int(v) for r in got for _, v in r.points.get("train.global_step", [])})
    assert steps[:4] == [5, 10, 15, 20]
    tokens = [v for r in got for _, v in r.points.get("train.tokens", [])]
    assert max(tokens) == 20 * 100


def test_endpoint_down_keeps_steps_fast_counts_failures_and_shutdown_is_bounded(
    tmp_path, monkeypatch
):
    tel = _otlp_setup(tmp_path, monkeypatch, free_dead_endpoint())
    slowest = _train(tel, 60)
    began = time.monotonic()
    tel.shutdown(timeout_millis=1_000)
    shutdown_seconds = time.monotonic() - began
    stats = tel.export_stats()  # after shutdown: what was still queued counts as dropped
    assert slowest < MAX_STEP_SECONDS
    assert stats["otlp"]["failed"] + stats["otlp"]["dropped"] > 0
    assert stats["otlp"]["exported"] == 0
    # The other exporter is unaffected: every step plus the final/* row.
    assert stats["jsonl"] == {"exported": 61, "dropped": 0, "failed": 0}
    assert shutdown_seconds < 1.0 + 1.5  # its budget plus generous slack


def test_slow_collector_drops_and_counts_instead_of_blocking(tmp_path, monkeypatch):
    # Every request is held 30 s (past the 2 s client timeout): the otlp queue overflows.
    with OtlpReceiver(script=lambda n: (200, 30.0)) as rx:
        tel = _otlp_setup(tmp_path, monkeypatch, rx.endpoint, max_queue_batches=8)
        slowest = _train(tel, 60)
        workers = {worker.name: worker for worker in tel.reader.exporters}
        jsonl_drained = workers["jsonl"].wait_idle(5_000)
        otlp_still_busy = not workers["otlp"].wait_idle(0)
        stats = tel.export_stats()
        began = time.monotonic()
        tel.shutdown(timeout_millis=1_000)
        shutdown_seconds = time.monotonic() - began
    assert slowest < MAX_STEP_SECONDS
    assert stats["otlp"]["dropped"] > 0
    # The JSON lines exporter is not held up by the slow one: its queue drains meanwhile.
    assert jsonl_drained and otlp_still_busy
    assert stats["jsonl"]["failed"] == 0
    assert shutdown_seconds < 1.0 + 1.5


@pytest.mark.parametrize(
    ("status", "retried"),
    [(500, False), (503, True)],  # the SDK's OTLP/HTTP retries 429/502/503/504, not 500
)
def test_errors_then_200_are_retried_or_dropped_and_counted(tmp_path, monkeypatch, status, retried):
    # The first two requests fail, then the collector heals.
    with OtlpReceiver(script=lambda n: (status if n < 2 else 200, 0.0)) as rx:
        tel = _otlp_setup(tmp_path, monkeypatch, rx.endpoint, intervals={"train": 10})
        slowest = _train(tel, 30)
        assert tel.flush(10_000)
        stats = tel.export_stats()
        tel.shutdown(timeout_millis=5_000)
        got = rx.snapshot()
    assert slowest < MAX_STEP_SECONDS
    steps = {int(v) for r in got for _, v in r.points.get("train.global_step", [])}
    if retried:  # Retry-After: 0 makes the SDK's retry immediate; every batch arrives
        assert stats["otlp"] == {"exported": 3, "dropped": 0, "failed": 0}
        assert {10, 20, 30} <= steps
    else:  # 500 is final for the SDK: the two batches are dropped and counted
        assert stats["otlp"] == {"exported": 1, "dropped": 0, "failed": 2}
        assert 30 in steps and 10 not in steps
    # Counters are cumulative: the collector's total is right once a batch gets through.
    tokens = [v for r in got for _, v in r.points.get("train.tokens", [])]
    assert max(tokens) == 30 * 100


def test_time_based_otlp_reader_exports_without_steps_and_shuts_down_bounded(tmp_path):
    from exporters.otlp import OtlpExporter, periodic_otlp_reader

    with OtlpReceiver() as rx:
        reader = periodic_otlp_reader(
            export_interval_millis=100, exporter=OtlpExporter(endpoint=rx.endpoint, timeout=2)
        )
        tel = otel_train.setup(
            run="periodic", output_dir=tmp_path, exporters=(reader,), handle_signals=False
        )
        tel.training.record(tokens=7)
        tel.step(10)  # a train-sampled step records train.tokens into the instruments
        assert rx.wait_for(lambda got: any("train.tokens" in r.points for r in got), 10)
        tel.shutdown(timeout_millis=2_000)


def test_time_based_reader_on_a_hung_collector_shuts_down_within_budget(tmp_path):
    from exporters.otlp import OtlpExporter, periodic_otlp_reader

    with OtlpReceiver(script=lambda n: (200, 30.0)) as rx:
        reader = periodic_otlp_reader(
            export_interval_millis=60_000, exporter=OtlpExporter(endpoint=rx.endpoint, timeout=20)
        )
        tel = otel_train.setup(
            run="hung", output_dir=tmp_path, exporters=(reader,), handle_signals=False
        )
        tel.training.record(tokens=7)
        tel.step(10)
        began = time.monotonic()
        tel.shutdown(timeout_millis=1_000)
        assert time.monotonic() - began < 1.0 + 1.5


def test_otlp_interval_env_selects_the_time_based_reader(monkeypatch):
    from exporters import otlp

    monkeypatch.setenv(otlp.INTERVAL_ENV, "250")
    built = otlp.create_for_run(_context())
    assert isinstance(built, otlp.ForkSafePeriodicReader)
    built.shutdown(timeout_millis=500)
    monkeypatch.setenv(otlp.INTERVAL_ENV, "soon")
    with pytest.raises(otel_train.OtelTrainError, match="milliseconds"):
        otlp.create_for_run(_context())
    monkeypatch.delenv(otlp.INTERVAL_ENV)
    assert isinstance(otlp.create_for_run(_context()), otlp.OtlpExporter)


def _context() -> otel_train.RunContext:
    return otel_train.RunContext(
        run="r", stage="train", rank=0, local_rank=0, world_size=1, host="h", output_dir=Path(".")
    )


# A training script with default logging (Python's last-resort handler prints WARNING and up to
# stderr): what a user sees when the collector fails every batch.
_FAILING_COLLECTOR_RUN = """
import json, sys
import otel_train
tel = otel_train.setup(run="loud", output_dir=sys.argv[1], exporters=("otlp",),
                       intervals={"train": 1, "perf": 5}, handle_signals=False)
for step in range(1, 101):
    tel.training.record(loss=1.0, tokens=10)
    tel.step(step)
tel.flush(30_000)
stats = tel.export_stats()
tel.shutdown(timeout_millis=5_000)
print(json.dumps(stats["otlp"]))
"""


@pytest.mark.parametrize("status", [500, 503])  # 500: final at once; 503: retried, then final
def test_a_failing_collector_is_logged_once_then_counted(tmp_path, status):
    import json
    import os
    import subprocess
    import sys

    with OtlpReceiver(script=lambda n: (status, 0.0)) as rx:
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": rx.endpoint,
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "2",
        }
        result = subprocess.run(
            [sys.executable, "-c", _FAILING_COLLECTOR_RUN, str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        requests = rx.requests
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["failed"] >= 100 and stats["exported"] == 0  # every batch, and the final one
    assert requests >= stats["failed"]  # they really reached the collector
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, "\n".join(lines[:10])
    assert "OTLP export to" in lines[0] and rx.endpoint in lines[0]
    assert str(status) in lines[0] or "retries" in lines[0]  # the SDK's reason, kept
    assert "counted" in lines[0]


def test_otlp_reduced_instruments_carry_a_rank_scope_attribute(tmp_path, monkeypatch):
    """Without reduction every rank's tokens are its own: scope="rank", so a collector's
    Prometheus sums them (the dashboard prefers scope="global" where a rank has it)."""
    with OtlpReceiver() as rx:
        tel = _otlp_setup(tmp_path, monkeypatch, rx.endpoint, intervals={"train": 5})
        _train(tel, 10)
        assert tel.flush(5_000)
        tel.shutdown(timeout_millis=5_000)
        got = rx.snapshot()
    tokens = [attrs for r in got for attrs, _ in r.points.get("train.tokens", [])]
    assert tokens and all(attrs == {"scope": "rank"} for attrs in tokens)
    steps = [attrs for r in got for attrs, _ in r.points.get("train.global_step", [])]
    assert steps and all(attrs == {} for attrs in steps)  # not a reduced instrument
