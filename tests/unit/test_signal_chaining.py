"""The signal handler flushes, then hands the signal to whatever handler was there before."""

from __future__ import annotations

import json
import os
import signal
import threading

import otel_train
from otel_train.signals import install_signal_flush, uninstall_signal_flush


def test_sigterm_shuts_down_then_calls_the_previous_python_handler(tmp_path):
    calls: list[tuple[int, bool]] = []
    tel_holder: list[otel_train.Telemetry] = []

    def previous(signum, frame):
        calls.append((signum, tel_holder[0]._closed))

    original = signal.signal(signal.SIGTERM, previous)
    try:
        tel = otel_train.setup(run="sig", output_dir=tmp_path, intervals={"train": 5})
        tel_holder.append(tel)
        for step in range(1, 8):
            tel.training.record(loss=0.5, tokens=10)
            tel.step(step)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered on the main thread, right here
        assert calls == [(signal.SIGTERM, True)]  # flushed and closed before the chain
        rows = [json.loads(line) for line in (tmp_path / "sig" / "rank0.jsonl").open()]
        assert [row["step"] for row in rows] == [5, 7, 7]  # sampled, pending tail, final
        assert rows[-1]["metrics"]["final/total_tokens"] == 70
    finally:
        uninstall_signal_flush()
        signal.signal(signal.SIGTERM, original)
    assert signal.getsignal(signal.SIGTERM) is original


def test_ignored_signals_stay_ignored_and_other_threads_install_nothing(tmp_path):
    original = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        install_signal_flush(lambda signum, budget: None, timeout_millis=100)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        results: list[bool] = []
        worker = threading.Thread(
            target=lambda: results.append(
                install_signal_flush(lambda signum, budget: None, timeout_millis=100)
            )
        )
        worker.start()
        worker.join(10)
        assert results == [False]
    finally:
        uninstall_signal_flush()
        signal.signal(signal.SIGTERM, original)
