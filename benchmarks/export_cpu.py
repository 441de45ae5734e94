"""Export-thread CPU per batch, before (tests/reference_export.py) vs now, side by side.

Batches come from a real `otel_train.setup(..., exporters=[CapturingExporter()])` run (train
every step, perf every 2nd: with the step-time histogram) and are replayed in isolation;
CPU is this thread's (`time.thread_time`), best of interleaved rounds, reported as ratios.

    python benchmarks/export_cpu.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import otel_train
from exporters.jsonl import row_to_json
from otel_train.naming import KeyNamer
from otel_train.rows import RowBuilder
from otel_train.testing import CapturingExporter
from tests.reference_export import ReferenceRowBuilder, reference_row_to_json


def capture(steps: int = 200) -> list:
    with tempfile.TemporaryDirectory() as directory:
        cap = CapturingExporter()
        tel = otel_train.setup(
            run="cpu", output_dir=directory, exporters=[cap], intervals={"train": 1, "perf": 2},
            handle_signals=False, gpu_metrics=False, system_metrics=False,
        )  # fmt: skip
        for n in range(1, steps + 1):
            tel.training.record(loss=2.5, learning_rate=3e-4, grad_norm=1.25, tokens=2048,
                                samples=8, epoch=0)  # fmt: skip
            tel.step(n)
        tel.shutdown()
    return cap.batches[20:]


def per_batch(work, items) -> float:
    started = time.thread_time()
    for item in items:
        work(item)
    return (time.thread_time() - started) / len(items)


def _reference_line(row) -> str:
    return reference_row_to_json(row, run="a", stage="b", rank=0)


def _line(row) -> str:
    return row_to_json(row, run="a", stage="b", rank=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    batches = capture()
    namer = KeyNamer()
    sizes = {id(b): len(RowBuilder(namer).build(b).values) for b in batches}
    groups = {
        "train-only batch": [b for b in batches if sizes[id(b)] < 15],
        "train+perf batch": [b for b in batches if sizes[id(b)] >= 15],
    }
    print(f"{'path':34s} {'before us':>10s} {'now us':>8s} {'now/before':>10s}")
    for label, group in groups.items():
        rows = [RowBuilder(namer).build(b) for b in group]
        cases = {
            f"row build, {label}": (
                lambda group=group: per_batch(ReferenceRowBuilder(namer).build, group),
                lambda group=group: per_batch(RowBuilder(namer).build, group),
            ),
            f"JSON line, {label}": (
                lambda rows=rows: per_batch(_reference_line, rows),
                lambda rows=rows: per_batch(_line, rows),
            ),
        }
        for name, (before, now) in cases.items():
            b_best = n_best = float("inf")
            for _ in range(args.rounds):  # interleaved
                b_best, n_best = min(b_best, before()), min(n_best, now())
            print(f"{name:34s} {b_best * 1e6:10.2f} {n_best * 1e6:8.2f} {n_best / b_best:10.2f}")


if __name__ == "__main__":
    main()
