"""An observable callback that never returns (NVML after a GPU fell off the bus) must not
stall training: the steps go on being exported without the SDK's metrics until it returns."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from opentelemetry.metrics import Observation

import otel_train
from otel_train import bounded_collect

HANG_AT_CALL = 5
STEPS_WHILE_HUNG = 300
STEPS_AFTER = 40


def test_a_hung_observable_callback_never_stalls_training_and_recovers(
    tmp_path: Path, monkeypatch, caplog
):
    monkeypatch.setattr(bounded_collect, "COLLECT_WAIT_SECONDS", 0.5)
    release = threading.Event()
    calls = 0

    def probe(options):
        nonlocal calls
        calls += 1
        if calls == HANG_AT_CALL:
            release.wait(60)  # hangs until the test releases it
        return [Observation(float(calls))]

    caplog.set_level(logging.WARNING, logger="otel_train")
    tel = otel_train.setup(
        run="hung",
        output_dir=str(tmp_path),
        exporters=["jsonl"],
        intervals={"train": 1, "perf": 1},
        system_metrics=False,
    )
    tel.meter.create_observable_gauge(
        "probe.value", callbacks=[tel.sampled_callback("perf", probe)]
    )
    started = time.monotonic()
    step = 0
    for step in range(1, STEPS_WHILE_HUNG + 1):
        tel.training.record(loss=1.0 / step, tokens=16)
        tel.step(step)
        time.sleep(0.003)  # a step: the 0.5 s wait covers fewer than the 256 steps of room
        # before: once 256 steps were behind, every step() waited 10 s, forever
        assert time.monotonic() - started < 60, f"training stalled at step {step}"
    hung_until = step
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the hung call returns
        if any("callback returned" in record.getMessage() for record in caplog.records):
            break
        time.sleep(0.01)
    for step in range(hung_until + 1, hung_until + STEPS_AFTER + 1):
        tel.training.record(loss=1.0 / step, tokens=16)
        tel.step(step)
        time.sleep(0.003)
    tel.shutdown()

    rows = [json.loads(line) for line in (tmp_path / "hung" / "rank0.jsonl").open()]
    train = [row for row in rows if "train/loss" in row["metrics"]]
    assert [row["step"] for row in train] == list(range(1, hung_until + STEPS_AFTER + 1))
    probed = {
        row["step"]: row["metrics"]["probe/value"]
        for row in train
        if "probe/value" in row["metrics"]
    }
    assert [probed.get(s) for s in range(1, HANG_AT_CALL)] == [1.0, 2.0, 3.0, 4.0]
    without = [s for s in range(HANG_AT_CALL, hung_until + 1) if s not in probed]
    assert len(without) >= hung_until - HANG_AT_CALL  # absent while hung, never stale
    after = [value for s, value in probed.items() if s > hung_until]
    assert after and all(value > HANG_AT_CALL for value in after)  # fresh values again
    assert len(after) >= STEPS_AFTER - 2

    messages = [record.getMessage() for record in caplog.records]
    assert sum("has not returned after 0.5 s" in m for m in messages) == 1, messages
    assert sum("callback returned" in m for m in messages) == 1, messages
    assert not any("fell 256 steps behind" in m for m in messages), messages  # never waited
