"""Cost of `reduce_across_ranks=True`: sampled-step time with and without the one packed
all_reduce, 2 ranks, gloo on 127.0.0.1 (CPU). Prints per-sampled-step microseconds and the
ratio; on GPUs with NCCL the collective is cheaper still relative to a training step.

Usage: python benchmarks/reduction_overhead.py [steps]
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time

import torch.distributed as dist
import torch.multiprocessing as mp

import otel_train
from otel_train.testing import CapturingExporter

WORLD = 2


def _rank(rank: int, port: int, steps: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo")
    for reduce in (False, True):
        tel = otel_train.setup(
            run="bench", output_dir=tempfile.mkdtemp(), exporters=(CapturingExporter(),),
            intervals={"train": 1, "perf": 1}, reduce_across_ranks=reduce, handle_signals=False,
        )  # fmt: skip
        dist.barrier()
        began = time.perf_counter()
        for step in range(1, steps + 1):
            tel.training.record(loss=1.0, grad_norm=2.0, tokens=512, samples=4)
            tel.step(step)  # every step is sampled here: the worst case
        elapsed = time.perf_counter() - began
        tel.shutdown(timeout_millis=2_000)
        if rank == 0:
            results[reduce] = elapsed / steps * 1e6
    dist.destroy_process_group()


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, steps, results), nprocs=WORLD, join=True)
        plain, reduced = results[False], results[True]
    print(f"sampled step without reduction: {plain:.1f} us")
    print(f"sampled step with one all_reduce: {reduced:.1f} us")
    print(f"ratio: {reduced / plain:.2f}x per sampled step ({WORLD} ranks, gloo, CPU)")


if __name__ == "__main__":
    main()
