"""Per-dataset losses: the field's per-sample `.item()` loop vs `tel.record_by_group`.

Both compute the same per-dataset mean loss of a batch every step. The by-hand loop is what
training scripts do today (a Python loop over samples, `.item()` each: one host sync per
sample on a GPU); `record_by_group` adds the batch into per-group sums with one `index_add_`
on the device and resolves them at sampled steps. Rounds are interleaved, the ratio is of
medians measured side by side in one process.

    python benchmarks/per_group.py [--batch 64] [--groups 8] [--steps 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import torch

import otel_train


def by_hand(losses: torch.Tensor, groups: torch.Tensor, names: list[str]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for loss, group in zip(losses, groups, strict=True):
        name = names[int(group.item())]
        sums[name] += loss.item()
        counts[name] += 1
    return {name: sums[name] / counts[name] for name in sums}


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    names = [f"ds{i}" for i in range(args.groups)]
    batches = [
        (torch.rand(args.batch), torch.randint(0, args.groups, (args.batch,)))
        for _ in range(args.steps)
    ]
    hand: list[float] = []
    staged: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        tel = otel_train.setup(
            run="per-group-bench", output_dir=directory, exporters=("jsonl",), gpu_metrics=False
        )
        step = 0
        for _ in range(args.rounds):
            start = time.perf_counter()
            for losses, groups in batches:
                by_hand(losses, groups, names)
            hand.append((time.perf_counter() - start) / args.steps)
            start = time.perf_counter()
            for losses, groups in batches:
                step += 1
                tel.record_by_group("train.dataset_loss", losses, groups, names)
                tel.step(step)
            staged.append((time.perf_counter() - start) / args.steps)
        tel.shutdown()
    hand_us, staged_us = statistics.median(hand) * 1e6, statistics.median(staged) * 1e6
    print(f"batch {args.batch}, {args.groups} groups, {args.steps} steps x {args.rounds} rounds")
    print("| loop | median us/step | ratio to record_by_group | host syncs / step |")
    print("| --- | --- | --- | --- |")
    print(
        f"| per-sample .item() loop | {hand_us:.1f} | {hand_us / staged_us:.1f} | {2 * args.batch} |"
    )
    print(f"| tel.record_by_group | {staged_us:.1f} | 1.0 | 0 (1 per sampled step) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
