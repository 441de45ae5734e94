"""Cost of one GPU-group collection with and without the process/host metrics
(`setup(system_metrics=...)`), measured side by side in one process.

Every step is a gpu-sampled step here (intervals gpu=1, the others never), so the step time
is the collection time; the difference between the two is what psutil adds to each collection.
It runs once every 50 steps by default, never on other sampled steps. Rounds interleave
(off, on, off, on, ...) and the median per-collection time is reported.

    python benchmarks/system_metrics_cost.py [--steps 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import otel_train
from otel_train.testing import CapturingExporter

NEVER = 10**12


def per_collection_seconds(steps: int, *, system_metrics: bool) -> float:
    with tempfile.TemporaryDirectory() as directory:
        tel = otel_train.setup(
            run="bench",
            output_dir=directory,
            exporters=[CapturingExporter()],
            intervals={"train": NEVER, "perf": NEVER, "gpu": 1},
            system_metrics=system_metrics,
            handle_signals=False,
        )
        tel.step(1)  # first collection (instrument storage created) left out
        started = time.perf_counter()
        for n in range(2, steps + 2):
            tel.step(n)
        elapsed = time.perf_counter() - started
        tel.shutdown()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.rounds):
        off.append(per_collection_seconds(args.steps, system_metrics=False))
        on.append(per_collection_seconds(args.steps, system_metrics=True))
    base, with_system = statistics.median(off), statistics.median(on)
    print(f"gpu-group collection without system metrics: {base * 1e6:8.1f} us")
    print(f"gpu-group collection with system metrics:    {with_system * 1e6:8.1f} us")
    print(f"added by psutil per collection:              {(with_system - base) * 1e6:8.1f} us")
    print(f"ratio: {with_system / base:.2f}x; amortised over the default 50 steps: "
          f"{(with_system - base) / 50 * 1e6:.1f} us per step")  # fmt: skip


if __name__ == "__main__":
    main()
