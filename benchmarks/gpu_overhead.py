"""What does otel-train cost a GPU training step? A GPT-2-small-sized step on one GPU, bare vs
instrumented (JSON lines + Prometheus + W&B offline, default intervals), rounds interleaved.

The instrumented loop records the loss and grad norm as CUDA tensors every step; on sampled
steps their values travel to pinned host memory behind an event, so the training thread never
waits for the device. One round runs under `torch.cuda.set_sync_debug_mode("error")`: any
blocking sync otel-train made would raise there. Needs CUDA.

    python benchmarks/gpu_overhead.py [--rounds 6] [--steps 50] [--layers 12] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import otel_train
from otel_train.cli import tiny_gpt


def gpt2_small(layers: int, batch: int, seq_len: int) -> tiny_gpt.TinyGptConfig:
    """GPT-2 small's shape (12 x 768, 12 heads, 1024 positions); byte-level vocabulary."""
    return tiny_gpt.TinyGptConfig(
        num_layers=layers, hidden_size=768, num_heads=12, seq_len=seq_len, batch_size=batch
    )


def device_batches(sampler: Any, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches made before timing (on the GPU already): the loops time training, not input."""
    batches = [sampler.batch() for _ in range(count)]
    torch.cuda.synchronize()
    return batches


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = gpt2_small(args.layers, args.batch, args.seq_len)
    model, optimizer, sampler = tiny_gpt.build(config, device)
    batches = device_batches(sampler, 16)
    tokens = sampler.tokens_per_batch
    workdir = tempfile.mkdtemp(prefix="otel-train-gpu-")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", workdir)
    os.environ.setdefault("OTEL_TRAIN_PROMETHEUS_PORT", "0")
    tel = otel_train.setup(
        run="gpu-overhead", output_dir=workdir, exporters=("jsonl", "prometheus", "wandb"),
        model=model, seq_len=config.seq_len, dtype="tf32",
    )  # fmt: skip
    step_counter = {"otel-train": 0}

    def bare(index: int) -> None:
        tiny_gpt.train_step(model, optimizer, batches[index % len(batches)])

    def instrumented(index: int) -> None:
        loss, grad_norm = tiny_gpt.train_step(model, optimizer, batches[index % len(batches)])
        step_counter["otel-train"] += 1
        tel.training.record(
            loss=loss, grad_norm=grad_norm, learning_rate=3e-3, tokens=tokens,
            samples=config.batch_size,
        )  # fmt: skip
        tel.step(step_counter["otel-train"])

    variants = {"bare": bare, "otel-train": instrumented}
    for fn in variants.values():  # warm up: kernels, allocator, W&B start, first exports
        for index in range(args.warmup):
            fn(index)
    torch.cuda.synchronize()
    per_round: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            fn = variants[name]
            torch.cuda.synchronize()
            started = time.perf_counter()
            for index in range(args.steps):
                fn(index)
            torch.cuda.synchronize()  # the GPU's work belongs to the round: once, at its end
            per_round[name].append((time.perf_counter() - started) / args.steps)
    # The check: a whole instrumented round with every blocking sync turned into an error.
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index in range(args.steps):
            instrumented(index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    tel.shutdown()
    ratios = [o / b for o, b in zip(per_round["otel-train"], per_round["bare"], strict=True)]
    return {
        "device": torch.cuda.get_device_name(device),
        "config": f"{args.layers} x 768, 12 heads, seq {args.seq_len}, batch {args.batch}, tf32",
        "bare_ms": 1e3 * statistics.median(per_round["bare"]),
        "instrumented_ms": 1e3 * statistics.median(per_round["otel-train"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "stats": tel.export_stats(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_overhead.py needs a CUDA device")
    report = run(args)
    print(f"device: {report['device']}; model: {report['config']}")
    print(f"{args.rounds} rounds x {args.steps} steps per variant, interleaved")
    print(f"bare        {report['bare_ms']:8.2f} ms/step")
    print(f"otel-train  {report['instrumented_ms']:8.2f} ms/step  ratio {report['ratio']:.4f} "
          f"(per round: {', '.join(f'{r:.3f}' for r in report['ratios'])})")  # fmt: skip
    print("sync debug mode 'error': an instrumented round ran without a blocking sync")
    print(f"exporters: {report['stats']}")


if __name__ == "__main__":
    main()
