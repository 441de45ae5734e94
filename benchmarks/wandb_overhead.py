"""Per-step cost of a real tiny torch loop: no metrics, otel-train without W&B, otel-train with
the W&B exporter, and `wandb.log` called directly every step. Reported as ratios to the bare loop.

    python benchmarks/wandb_overhead.py [--steps 1000] [--rounds 5] [--plot out.png]

Variants run interleaved round after round (so machine drift hits all alike); the median round
and the best round are reported. wandb runs offline into a temp dir; init and finish are outside
the timed loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import otel_train

BATCH, WIDTH = 32, 256


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    inputs = torch.randn(BATCH, WIDTH)
    loss = torch.nn.functional.mse_loss(model(inputs), inputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach(), grad_norm


def bare(steps: int, workdir: Path) -> float:
    model, optimizer = make_model()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer)
    return (time.perf_counter() - start) / steps


def with_otel(exporters: tuple[str, ...]) -> Callable[[int, Path], float]:
    def variant(steps: int, workdir: Path) -> float:
        model, optimizer = make_model()
        tel = otel_train.setup(
            run=f"bench-{'-'.join(exporters)}-{time.monotonic_ns()}",
            stage="pretrain",
            output_dir=workdir / "runs",
            exporters=exporters,
            total_steps=steps,
        )
        with tel:
            # Warm-up to the first sampled step and wait for its export: W&B's one-time start
            # (~1 s of CPU: import, wandb-core process) must not be counted as per-step cost.
            for step in range(1, 11):
                tel.training.record(loss=0.0)
                tel.step(step)
            tel.flush(60_000)
            first = 11
            start = time.perf_counter()
            for step in range(first, first + steps):
                loss, grad_norm = train_step(model, optimizer)
                tel.training.record(
                    loss=loss, learning_rate=1e-3, grad_norm=grad_norm, tokens=BATCH * 128,
                    samples=BATCH, epoch=step / steps,
                )  # fmt: skip
                tel.step(step)
            elapsed = time.perf_counter() - start
        return elapsed / steps

    return variant


def direct_wandb(steps: int, workdir: Path) -> float:
    import wandb

    model, optimizer = make_model()
    run = wandb.init(project="otel-train-bench", dir=workdir, mode="offline")
    tokens = 0
    start = time.perf_counter()
    last = time.perf_counter()
    for step in range(1, steps + 1):
        loss, grad_norm = train_step(model, optimizer)
        tokens += BATCH * 128
        now = time.perf_counter()
        step_time, last = now - last, now
        run.log(  # what a hand-written loop logs every step (12 keys, .item() included)
            {
                "train/loss": loss.item(), "train/learning_rate": 1e-3,
                "train/grad_norm": grad_norm.item(), "train/epoch": step / steps,
                "train/global_step": step, "train/num_input_tokens_seen": tokens,
                "train/samples": step * BATCH, "perf/step_time": step_time,
                "perf/tokens_per_second": BATCH * 128 / step_time,
                "perf/samples_per_second": BATCH / step_time,
                "perf/steps_per_second": 1 / step_time, "train/perplexity": 2.0,
            },
            step=step,
        )  # fmt: skip
    elapsed = time.perf_counter() - start
    run.finish()
    return elapsed / steps


VARIANTS: dict[str, Callable[[int, Path], float]] = {
    "bare loop": bare,
    "otel-train, jsonl": with_otel(("jsonl",)),
    "otel-train, jsonl + wandb": with_otel(("jsonl", "wandb")),
    "wandb.log every step": direct_wandb,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart (matplotlib)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS.values():  # warm-up: imports, allocator, wandb-core
            variant(50, Path(tmp))
        for _ in range(args.rounds):
            for name, variant in VARIANTS.items():
                samples[name].append(variant(args.steps, Path(tmp)))
    # Median of rounds, and best round (timeit's estimator: other load only ever adds time).
    for label, pick in (("median round", statistics.median), ("best round", min)):
        per_step = {name: pick(values) for name, values in samples.items()}
        base, otel = per_step["bare loop"], per_step["otel-train, jsonl"]
        on, direct = per_step["otel-train, jsonl + wandb"], per_step["wandb.log every step"]
        print(f"-- {label} of {args.rounds} x {args.steps} steps")
        print(f"{'variant':28} {'us/step':>9} {'x bare':>7} {'x otel-train':>13}")
        for name, value in per_step.items():
            print(f"{name:28} {value * 1e6:9.1f} {value / base:7.3f} {value / otel:13.3f}")
        print(f"W&B exporter on / off: {on / otel:.3f}")
        print(f"wandb.log every step / W&B exporter: {direct / on:.3f}")
    ratios = {name: statistics.median(v) / statistics.median(samples["bare loop"])
              for name, v in samples.items()}  # fmt: skip
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 3))
        axis.barh(list(ratios), list(ratios.values()))
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel("per-step time / bare loop (median of rounds)")
        axis.invert_yaxis()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
