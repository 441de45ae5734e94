"""How `otel-train report`'s reader scales with backward step jumps (resumed runs).

Files of n steps up, then n restarts each one step earlier (every row a backward jump), for
n and 4n: a linear reader takes ~4x as long on the 4x file, a quadratic one ~16x. Ratios
measured side by side in one process; absolute times depend on the machine.

    python benchmarks/run_reading.py [--steps 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from otel_train.runs import read_run


def write_jumps(folder: Path, n: int) -> Path:
    file = folder / f"jumps-{n}.jsonl"
    with file.open("w") as handle:
        for step in [*range(1, n + 1), *range(n - 1, 1, -1)]:
            handle.write(
                f'{{"step":{step},"time":1.0,"run":"j","stage":"s","rank":0,'
                f'"metrics":{{"train/loss":{1 + 1 / step}}}}}\n'
            )
    return file


def seconds_to_read(file: Path) -> float:
    start = time.perf_counter()
    read_run(file)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        small = write_jumps(Path(folder), args.steps)
        large = write_jumps(Path(folder), 4 * args.steps)
        times: dict[Path, list[float]] = {small: [], large: []}
        for _ in range(args.rounds):  # interleaved, so load changes hit both alike
            for file in (small, large):
                times[file].append(seconds_to_read(file))
        a, b = statistics.median(times[small]), statistics.median(times[large])
    print(f"{2 * args.steps:,} rows: {a:.3f} s; {8 * args.steps:,} rows: {b:.3f} s")
    print(f"ratio {b / a:.1f} (linear ~4, quadratic ~16)")


if __name__ == "__main__":
    main()
