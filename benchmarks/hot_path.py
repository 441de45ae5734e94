"""Per-step cost of the hot path, measured side by side in one process.

(a) otel-train `record()` + `step()` on non-sampled steps (numbers, and CPU tensors);
(a') the same with default intervals, sampled steps included (amortised);
(b) the same values recorded straight into OTel SDK instruments every step;
(c) `wandb.log` of the same keys every step, offline (if wandb is installed).
Rounds are interleaved (a, b, c, a, b, c, ...) and the median per-step time is reported.

    python benchmarks/hot_path.py [--steps 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_train
from otel_train.testing import CapturingExporter

NEVER = 10**12


def bench_otel_train(steps: int, *, tensors: bool, sampled: bool) -> float:
    intervals = None if sampled else {"train": NEVER, "perf": NEVER, "gpu": NEVER}
    with tempfile.TemporaryDirectory() as directory:
        tel = otel_train.setup(
            run="bench", output_dir=directory, exporters=[CapturingExporter()], intervals=intervals
        )
        if tensors:
            import torch

            loss, grad_norm = torch.tensor(2.5), torch.tensor(1.25)
        else:
            loss, grad_norm = 2.5, 1.25
        record, step = tel.training.record, tel.step
        started = time.perf_counter()
        for n in range(1, steps + 1):
            record(
                loss=loss, learning_rate=3e-4, grad_norm=grad_norm, tokens=2048, samples=8, epoch=0
            )
            step(n)
        elapsed = time.perf_counter() - started
        tel.shutdown()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    wandb_bench = make_wandb_bench()
    cases: dict[str, Callable[[], float]] = {
        "(a) otel-train record+step, non-sampled, numbers": lambda: bench_otel_train(args.steps, tensors=False, sampled=False),
        "(a) otel-train record+step, non-sampled, tensors": lambda: bench_otel_train(args.steps, tensors=True, sampled=False),
        "(a') otel-train, default intervals (amortised)": lambda: bench_otel_train(args.steps, tensors=True, sampled=True),
        "(b) OTel SDK instruments directly, every step": lambda: bench_sdk_direct(args.steps),
    }  # fmt: skip
    if wandb_bench is not None:
        wandb_steps = max(500, args.steps // 20)
        cases["(c) wandb.log every step, offline"] = lambda: wandb_bench(wandb_steps)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            samples[name].append(run())
    if wandb_bench is not None:
        wandb_bench.finish()  # type: ignore[attr-defined]
    baseline = statistics.median(samples["(a) otel-train record+step, non-sampled, numbers"])
    print(f"{'case':52s} {'median us/step':>15s} {'x (a, numbers)':>15s}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:52s} {median * 1e6:15.2f} {median / baseline:15.1f}")
    print(f"machine: {os.cpu_count()} CPUs; steps per round {args.steps}, rounds {args.rounds}")


if __name__ == "__main__":
    main()
