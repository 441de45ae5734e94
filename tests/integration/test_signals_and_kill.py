"""SIGTERM / SIGINT / SIGKILL mid-run, on a real training loop in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("loop_worker.py")


def _worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return _start_with(tmp_path, "100000000", *extra)


def _start_with(tmp_path: Path, max_steps: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), max_steps, *extra],
        env=_worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().split("\n")[:-1] if line]


def _wait_until_step(proc: subprocess.Popen, path: Path, step: int, timeout: float = 60) -> int:
    """Poll the JSON lines until a row at `step` or later exists; return the last step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        lines = _complete_lines(path)
        if lines:
            seen = json.loads(lines[-1])["step"]
            if seen >= step:
                return int(seen)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the loop never reached step {step}")


def _assert_every_sampled_step_then_final(path: Path, seen_before_signal: int) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    train_steps = [row["step"] for row in rows if "train/loss" in row["metrics"]]
    sampled = [step for step in train_steps if step % 5 == 0]
    last_sampled = sampled[-1]
    assert last_sampled >= seen_before_signal
    assert sampled == list(range(5, last_sampled + 1, 5))  # none missing, none twice
    final = rows[-1]["metrics"]
    assert final["final/total_steps"] == rows[-1]["step"] >= last_sampled
    assert final["final/total_tokens"] == rows[-1]["step"] * 64 * 16


@pytest.mark.parametrize(("signum", "otlp"), [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_signal_mid_run_flushes_every_sampled_step_then_ends_as_the_signal_says(
    tmp_path, signum, otlp
):
    # With a collector that holds every request for 30 s, the flush must still be bounded
    # by the 4 s shutdown budget the worker sets.
    with OtlpReceiver(script=lambda n: (200, 30.0)) as rx:
        proc = _start(tmp_path, *([rx.endpoint] if otlp else []))
        path = tmp_path / "killed" / "rank0.jsonl"
        seen = _wait_until_step(proc, path, 100)
        sent = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        exit_seconds = time.monotonic() - sent
    assert proc.returncode == -signum, err[-2000:]  # the default behaviour went on
    assert exit_seconds < 4.0 + 6.0  # the flush budget plus generous slack for 2 cores
    _assert_every_sampled_step_then_final(path, seen)


def test_sigterm_inside_sampled_steps_never_deadlocks_the_flush(tmp_path):
    """Every step sampled: the signal lands inside a sampled step (holding the telemetry's
    lock) nearly every time; the flush is deferred to the step's end, never waits on it."""
    for trial in range(6):
        directory = tmp_path / f"trial{trial}"
        proc = _start(directory, "tight")
        path = directory / "killed" / "rank0.jsonl"
        _wait_until_step(proc, path, 50 + 37 * trial)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        exit_seconds = time.monotonic() - sent
        assert proc.returncode == -signal.SIGTERM, err[-2000:]
        assert exit_seconds < 4.0, (trial, exit_seconds)  # within the flush budget, no wait
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        final = rows[-1]["metrics"]
        assert final["final/total_steps"] == rows[-1]["step"], trial
        # tokens recorded for the next step before its step() call are not lost either
        assert final["final/total_tokens"] in (16 * rows[-1]["step"], 16 * (rows[-1]["step"] + 1))


def test_a_signal_at_any_bytecode_is_flushed_at_once_or_at_the_end_of_its_section(tmp_path):
    """SIGINT raised at every bytecode of a sampled step, of creating an instrument and of
    `flush()`, one position per call: the signal's flush never waits on a lock the
    interrupted code holds (it did, between acquiring the telemetry's lock and marking it
    held), and every signal ends in its KeyboardInterrupt, at once or deferred."""
    worker = Path(__file__).with_name("signal_sweep_worker.py")
    result = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)],
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    phases = {row["phase"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(phases) == {"sampled step", "new instrument", "flush"}, result.stdout
    for phase in phases.values():
        assert phase["complete"] and phase["positions"] > 100, phase
        assert phase["abandoned"] == [], phase  # where the flush waited on the caller's lock
        assert phase["undelivered"] == [], phase  # where a deferred signal was never run
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "rank0.jsonl").open()]
    # 20 warm-up steps, one per position, and the last one, shorter than its position
    assert rows[-1]["metrics"]["final/total_steps"] == phases["sampled step"]["positions"] + 21


def test_sigterm_during_shutdown_still_terminates_after_it(tmp_path):
    """A SIGTERM while `shutdown()` holds the telemetry's lock is deferred, then delivered
    when shutdown returns: the process ends as the sender asked (it used to run on)."""
    proc = _start_with(tmp_path, "50", "slow-close")
    assert proc.stdout.readline().strip() == "closing"
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "survived shutdown" not in out, err[-2000:]
    assert proc.returncode == -signal.SIGTERM, err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "killed" / "rank0.jsonl").open()]
    assert rows[-1]["metrics"]["final/total_steps"] == 50


def test_sigkill_leaves_at_most_a_partial_last_line(tmp_path):
    proc = _start(tmp_path)
    path = tmp_path / "killed" / "rank0.jsonl"
    _wait_until_step(proc, path, 200)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    text = path.read_text()
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail: "" or the one partial line
    rows = [json.loads(line) for line in complete]  # every complete line parses
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and len(steps) >= 40
    if tail:
        with pytest.raises(json.JSONDecodeError):
            json.loads(tail)


def test_run_reader_skips_a_partial_last_line_with_a_warning(tmp_path):
    """What `otel-train report` / `sync` read after a SIGKILL: every whole line, one warning."""
    from otel_train.runs import read_run

    proc = _start(tmp_path)
    path = tmp_path / "killed" / "rank0.jsonl"
    _wait_until_step(proc, path, 100)
    proc.kill()
    proc.communicate(timeout=30)
    whole = _complete_lines(path)
    with path.open("ab") as file:  # the kill may or may not have cut a line: make sure one is
        file.write(b'{"step": 99999, "time": 1.0, "metr')
    record = read_run(tmp_path / "killed")
    assert [row.step for row in record.rows] == [json.loads(line)["step"] for line in whole]
    assert len(record.warnings) == 1 and "partial last line" in record.warnings[0]
