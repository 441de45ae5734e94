"""Per-step cost of the hot path, measured side by side in one process.

(a)  otel-train `record()` + `step()` on non-sampled steps (numbers, and CPU tensors);
(s)  the same, a sampled step (train + perf + health due), median of the step() calls,
     with JSON lines + Prometheus + W&B (offline) exporters on;
(a') default intervals (train 10, perf 20), sampled steps included (amortised), with the
     same three exporters on, with JSON lines alone (the issue's baseline) and with an
     in-memory exporter: loop time / steps, the finisher's and export threads' GIL use
     included;
(f)  floors of (a'): the training thread's own work alone (the finisher's jobs dropped), and
     (f') the JSON-lines case done inline on one thread with the garbage collector off;
(b)  the same values recorded straight into OTel SDK instruments every step;
(c)  `wandb.log` of the same keys every step, offline (if wandb is installed).
Rounds are interleaved (a, s, a', b, c, a, ...) and the median of the rounds is reported, with
ratios to (b). Then, per exporter and for the finisher thread (which turns each sampled
step's copied values into a batch): CPU the thread spends per batch (its Python work
competes with the training thread for the GIL).

    python benchmarks/hot_path.py [--steps 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_train
from otel_train.testing import CapturingExporter

NEVER = 10**12
EXPORTERS = ("jsonl", "prometheus", "wandb")


def _setup(directory: str, exporters: Any, intervals: Any) -> otel_train.Telemetry:
    os.environ.setdefault("OTEL_TRAIN_PROMETHEUS_PORT", "0")  # a free port, never a clash
    # The standard set only, as the SDK loop records: no GPU or process/host probes (psutil
    # costs ~0.4 ms per gpu-group export here, every 50 steps by default).
    return otel_train.setup(
        run="bench", output_dir=directory, exporters=exporters, intervals=intervals,
        handle_signals=False, gpu_metrics=False, system_metrics=False,
    )  # fmt: skip


def _values(tensors: bool) -> tuple[Any, Any]:
    if not tensors:
        return 2.5, 1.25
    import torch

    return torch.tensor(2.5), torch.tensor(1.25)


def _timed_loop(
    tel: otel_train.Telemetry, steps: int, *, tensors: bool, then: Callable[[], Any] = lambda: None
) -> float:
    """Seconds for `steps` steps of the standard values (then `then()`, inside the timing)."""
    loss, grad_norm = _values(tensors)
    record, step = tel.training.record, tel.step
    started = time.perf_counter()
    for n in range(1, steps + 1):
        record(loss=loss, learning_rate=3e-4, grad_norm=grad_norm, tokens=2048, samples=8, epoch=0)
        step(n)
    then()
    return time.perf_counter() - started


def bench_non_sampled(steps: int, *, tensors: bool) -> float:
    intervals = {"train": NEVER, "perf": NEVER, "gpu": NEVER}
    with tempfile.TemporaryDirectory() as directory:
        tel = _setup(directory, [CapturingExporter()], intervals)
        elapsed = _timed_loop(tel, steps, tensors=tensors)
        tel.shutdown()
    return elapsed / steps


def bench_sampled_step(steps: int) -> float:
    """Median step() of sampled steps (train, perf and health due at once, every 20th
    step), all exporters on, on the training thread (the finisher and export threads idle:
    their work is measured on its own, in `measure_export_threads`)."""
    with tempfile.TemporaryDirectory() as directory:
        tel = _setup(directory, EXPORTERS, {"train": 20, "perf": 20, "gpu": NEVER})
        loss, grad_norm = _values(True)
        record, step = tel.training.record, tel.step
        sampled: list[float] = []
        clock = time.perf_counter
        for n in range(1, steps + 1):
            record(
                loss=loss, learning_rate=3e-4, grad_norm=grad_norm, tokens=2048, samples=8, epoch=0
            )
            if n % 20 == 0:
                tel.flush()  # export threads idle: their GIL use is measured on its own below
                started = clock()
                step(n)
                sampled.append(clock() - started)
            else:
                step(n)
        tel.shutdown()
    return statistics.median(sampled[5:])


def bench_default_intervals(steps: int, *, exporters: Any = EXPORTERS) -> float:
    with tempfile.TemporaryDirectory() as directory:
        tel = _setup(directory, exporters, None)
        # The export threads' work that lagged behind belongs to this loop: flushed inside.
        elapsed = _timed_loop(tel, steps, tensors=True, then=tel.flush)
        tel.shutdown()
    return elapsed / steps


def bench_floor_training_thread(steps: int) -> float:
    """(f) The floor of (a'): the training thread's own work at default intervals (record,
    step, each sampled step's detach, pack and copy), the finisher's jobs discarded: what
    no export design in this process can go below."""
    with tempfile.TemporaryDirectory() as directory:
        tel = _setup(directory, [CapturingExporter()], None)
        tel._finisher.submit = lambda job: None  # type: ignore[method-assign]
        elapsed = _timed_loop(tel, steps, tensors=True)
        tel.shutdown()
    return elapsed / steps


def bench_inline_without_gc(steps: int) -> float:
    """(f') (a') with JSON lines, every sampled step finished and written on the training
    thread, the garbage collector off: the pipeline's Python work alone, no thread hand-offs
    and no collections. (a') close to this means threads and the collector cost little."""
    from otel_train import background

    queued = background.BackgroundExporter.submit
    background.BackgroundExporter.submit = background.BackgroundExporter.export_now  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as directory:
            tel = _setup(directory, ("jsonl",), None)
            tel._finisher.submit = tel._exports.finish  # type: ignore[method-assign]
            gc.disable()
            try:
                elapsed = _timed_loop(tel, steps, tensors=True)
            finally:
                gc.enable()
            tel.shutdown()
    finally:
        background.BackgroundExporter.submit = queued  # type: ignore[method-assign]
    return elapsed / steps


def bench_sdk_direct(steps: int) -> float:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("bench")
    tokens, samples = meter.create_counter("train.tokens"), meter.create_counter("train.samples")
    loss, lr = meter.create_gauge("train.loss"), meter.create_gauge("train.learning_rate")
    grad_norm, epoch = meter.create_gauge("train.grad_norm"), meter.create_gauge("train.epoch")
    global_step = meter.create_gauge("train.global_step")
    step_time = meter.create_histogram("perf.step_time", unit="s")
    last = time.perf_counter()
    started = last
    for n in range(1, steps + 1):
        tokens.add(2048)
        samples.add(8)
        loss.set(2.5)
        lr.set(3e-4)
        grad_norm.set(1.25)
        epoch.set(0)
        global_step.set(n)
        now = time.perf_counter()
        step_time.record(now - last)
        last = now
    elapsed = time.perf_counter() - started
    provider.shutdown()
    return elapsed / steps


def make_wandb_bench() -> Callable[[int], float] | None:
    try:
        import wandb
    except ImportError:
        return None
    directory = tempfile.mkdtemp()
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        mode="offline", dir=directory, project="bench", settings=wandb.Settings(console="off")
    )

    def bench(steps: int) -> float:
        started = time.perf_counter()
        for n in range(1, steps + 1):
            run.log(
                {"train/loss": 2.5, "train/learning_rate": 3e-4, "train/grad_norm": 1.25,
                 "train/num_input_tokens_seen": 2048 * n, "train/samples": 8 * n, "train/epoch": 0},
                step=n,
            )  # fmt: skip
        return (time.perf_counter() - started) / steps

    bench.finish = run.finish  # type: ignore[attr-defined]
    return bench


@contextlib.contextmanager
def _counting_full_collections() -> Iterator[list[int]]:
    """Counts generation-2 garbage collections while the block runs (`counted[0]`)."""
    counted = [0]

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            counted[0] += 1

    gc.callbacks.append(count)
    try:
        yield counted
    finally:
        gc.callbacks.remove(count)


# -- what the export threads take from the training thread ------------------------------------
def _thread_cpu(thread: threading.Thread) -> float:
    if thread.ident is None:
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def measure_export_threads(batches: int = 300) -> dict[str, float]:
    """Every step sampled (train + perf), 2 ms between steps: CPU each export thread spends
    per batch. Python work on those threads holds the GIL: it is what they can take from the
    training thread (wandb's own threads and its wandb-core process come on top)."""
    with tempfile.TemporaryDirectory() as directory:
        tel = _setup(directory, EXPORTERS, {"train": 1, "perf": 1, "gpu": NEVER})
        loss, grad_norm = _values(True)
        workers = {worker.name: worker for worker in tel.reader.exporters}
        for n in range(1, 51):  # warm up: W&B started, first exports done
            tel.training.record(loss=loss, tokens=2048, samples=8)
            tel.step(n)
        tel.flush()
        finisher = tel._finisher  # finishes each sampled step off the training thread
        threads = {name: w._thread for name, w in workers.items()}
        threads["(finisher)"] = finisher._thread
        done = {name: (lambda w=w: w.exported) for name, w in workers.items()}
        done["(finisher)"] = lambda: finisher.finished
        before = {name: (_thread_cpu(threads[name]), done[name]()) for name in threads}
        for n in range(51, 51 + batches):
            tel.training.record(loss=loss, learning_rate=3e-4, grad_norm=grad_norm, tokens=2048,
                                samples=8, epoch=0)  # fmt: skip
            tel.step(n)
            time.sleep(0.002)
        tel.flush()
        per_batch = {
            name: (_thread_cpu(threads[name]) - before[name][0])
            / max(1, done[name]() - before[name][1])
            for name in threads
        }
        tel.shutdown()
    return per_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-threads", action="store_true", help="skip the GIL measurement")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="otel-train-bench-"))
    wandb_bench = make_wandb_bench()
    steps = args.steps
    cases: dict[str, Callable[[], float]] = {
        "(a) non-sampled step, numbers": lambda: bench_non_sampled(steps, tensors=False),
        "(a) non-sampled step, tensors": lambda: bench_non_sampled(steps, tensors=True),
        "(s) sampled step, 3 exporters": lambda: bench_sampled_step(steps),
        "(a') default intervals, amortised, 3 exporters": lambda: bench_default_intervals(steps),
        "(a') default intervals, amortised, JSON lines": lambda: bench_default_intervals(
            steps, exporters=("jsonl",)
        ),
        "(a') default intervals, amortised, capture only": lambda: bench_default_intervals(
            steps, exporters=[CapturingExporter()]
        ),
        "(f) floor: training thread alone": lambda: bench_floor_training_thread(steps),
        "(f') JSON lines all inline, collector off": lambda: bench_inline_without_gc(steps),
        "(b) OTel SDK instruments, every step": lambda: bench_sdk_direct(steps),
    }
    if wandb_bench is not None:
        wandb_steps = max(500, steps // 20)
        cases["(c) wandb.log every step, offline"] = lambda: wandb_bench(wandb_steps)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    full_collections = {name: 0 for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            with _counting_full_collections() as counted:
                samples[name].append(run())
            full_collections[name] += counted[0]
    if wandb_bench is not None:
        wandb_bench.finish()  # type: ignore[attr-defined]
    sdk = statistics.median(samples["(b) OTel SDK instruments, every step"])
    print(f"{'case':50s} {'median us':>10s} {'x (b)':>7s} {'spread us':>12s} {'full GCs':>8s}")
    for name, values in samples.items():
        median = statistics.median(values)
        spread = f"{min(values) * 1e6:.1f}-{max(values) * 1e6:.1f}"
        print(
            f"{name:50s} {median * 1e6:10.2f} {median / sdk:7.3f} {spread:>12s} "
            f"{full_collections[name]:8d}"
        )
    print("full GCs: generation-2 garbage collections in all rounds of the case (each walks")
    print("the whole heap, ~0.1 s with torch loaded: objects that outlive a few ms cause them)")
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; steps per round "
          f"{steps}, rounds {args.rounds}")  # fmt: skip
    if args.skip_threads:
        return
    threads = measure_export_threads()
    print("export threads (GIL-holding Python work), CPU per exported batch:")
    for name, seconds in sorted(threads.items()):
        print(f"  {name:12s} {seconds * 1e6:8.1f} us")
    print(f"  {'all':12s} {sum(threads.values()) * 1e6:8.1f} us per sampled step")


if __name__ == "__main__":
    main()
