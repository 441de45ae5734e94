"""1,000,000 steps in a process that imports only otel_train: prints resident memory samples.

Usage: python soak_worker.py OUTPUT_DIR STEPS TRAIN_INTERVAL
"""

from __future__ import annotations

import json
import os
import sys

import otel_train


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    output_dir, steps, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tel = otel_train.setup(
        run="soak",
        output_dir=output_dir,
        exporters=("jsonl",),
        intervals={"train": interval, "perf": 2 * interval},
        total_steps=steps,
    )
    record, step_fn = tel.training.record, tel.step
    warm_up = steps // 10
    samples = {}
    for step in range(1, steps + 1):
        record(loss=1.0 / step, learning_rate=1e-4, tokens=2048, samples=4)
        step_fn(step)
        if step == warm_up or step == steps:
            tel.flush(30_000)
            samples[step] = resident_bytes()
    tel.shutdown(timeout_millis=10_000)
    print(json.dumps({"rss": samples, "stats": tel.export_stats()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
