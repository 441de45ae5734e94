"""Deliver SIGINT at every bytecode of a sampled step (and of other calls a training loop
makes), one position per call, and report where the signal's flush could not run.

Usage: python signal_sweep_worker.py OUTPUT_DIR

The handler runs on the main thread wherever it interrupted it and waits for the flush, which
runs on a helper thread. Had it interrupted code holding a lock the flush needs, the flush
waits on that lock until the handler gives up on it (budget + 0.5 s): the helper thread is
then still alive when the KeyboardInterrupt arrives ("abandoned"). Every position must also
end in the KeyboardInterrupt SIGINT's default handler raises, at once or at the end of the
section that deferred it ("delivered"). Prints one JSON object per phase.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import otel_train

FLUSH_THREAD = "otel-train-signal-flush"


def _flush_thread_alive() -> bool:
    return any(t.name == FLUSH_THREAD and t.is_alive() for t in threading.enumerate())


def _call_with_signal_at(opcode: int, call: Callable[[], Any]) -> tuple[bool, bool, str]:
    """Run `call`, raising SIGINT at its `opcode`-th traced bytecode (every frame it runs).
    Returns (reached: the call ran that many bytecodes, interrupted, where)."""
    count = 0
    where = ""

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count, where
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
            if count == opcode + 1:
                code = frame.f_code
                where = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_qualname}:{frame.f_lineno}"
                signal.raise_signal(signal.SIGINT)
        return tracer

    interrupted = False
    sys.settrace(tracer)
    try:
        call()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    return count > opcode, interrupted, where


def sweep(phase: str, make_call: Callable[[int], Callable[[], Any]], limit: int = 20_000) -> None:
    abandoned: list[str] = []
    undelivered: list[str] = []
    position = 0
    while position < limit:
        reached, interrupted, where = _call_with_signal_at(position, make_call(position))
        if not reached:
            break
        if not interrupted:
            undelivered.append(where)
        if _flush_thread_alive():
            abandoned.append(where)
            print("abandoned", position, where, file=sys.stderr, flush=True)
            while _flush_thread_alive():
                time.sleep(0.01)
        position += 1
    report = {"phase": phase, "positions": position, "complete": position < limit}
    print(json.dumps({**report, "abandoned": abandoned, "undelivered": undelivered}), flush=True)


def main() -> int:
    tel = otel_train.setup(
        run="sweep",
        output_dir=sys.argv[1],
        exporters=["jsonl"],
        intervals={"train": 1},
        # The flush of a healthy position takes a few ms; only a stuck one reaches the
        # handler's join timeout (budget + 0.5 s), so a loaded machine cannot fake one.
        shutdown_timeout_millis=1_000,
    )
    gauge = tel.meter.create_gauge("sweep.value")
    step = 0

    def sampled_step(position: int) -> Callable[[], None]:
        nonlocal step
        step += 1
        this_step = step

        def call() -> None:
            tel.training.record(loss=1.0 / this_step, tokens=16)
            gauge.set(float(this_step), {"dataset": "a"})
            tel.step(this_step)

        return call

    for _ in range(20):  # warm: streams exist, threads started
        sampled_step(0)()
    sweep("sampled step", sampled_step)
    sweep("new instrument", lambda n: lambda: tel.meter.create_counter(f"sweep.new_{n}").add(1))
    sweep("flush", lambda n: tel.flush)
    tel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
