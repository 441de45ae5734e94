"""What measuring FLOPs costs a training loop: none, once (measure_flops=True), every 50 steps
(the profiler-every-N habit, here with torch's FLOP counter). Tiny GPT-2 on CPU, interleaved
rounds, median wall time of the whole loop; reported as ratios to the loop without measuring.

    python benchmarks/flops_measurement.py [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

import otel_train
from otel_train.testing import CapturingExporter

SEQ_LEN, BATCH = 128, 4


def run_loop(steps: int, measure: bool | int) -> float:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=SEQ_LEN
    )
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, 512, (BATCH, SEQ_LEN))
    with tempfile.TemporaryDirectory() as tmp:
        tel = otel_train.setup(
            run="bench", output_dir=tmp, exporters=[CapturingExporter()], model=model,
            seq_len=SEQ_LEN, measure_flops=measure, handle_signals=False,
        )  # fmt: skip
        start = time.perf_counter()
        for step in range(1, steps + 1):
            loss = model(input_ids=data, labels=data).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tel.training.record(loss=loss.detach(), tokens=BATCH * SEQ_LEN)
            tel.step(step)
        elapsed = time.perf_counter() - start
        tel.shutdown()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = {"no measurement": False, "measure_flops=True (once)": True, "every 50 steps": 50}
    times: dict[str, list[float]] = {name: [] for name in variants}
    run_loop(5, False)  # warm up
    for _ in range(args.rounds):
        for name, measure in variants.items():
            times[name].append(run_loop(args.steps, measure))
    base = statistics.median(times["no measurement"])
    for name, values in times.items():
        print(f"{name:28s} loop time / baseline = {statistics.median(values) / base:.3f}")


if __name__ == "__main__":
    main()
