"""A real instrumented training run (tiny torch model) for the live Prometheus test.

Run as a subprocess, one per rank (RANK / LOCAL_RANK / WORLD_SIZE in the environment).
Control files in `--workdir`: it trains until `stop` appears, finishes on a sampled step,
writes `result-rank<N>.json` (tokens recorded, last step), keeps serving /metrics until
`exit` appears, then shuts down.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import otel_train
from otel_train.gpu import register_gpu_metrics
from tests.fakes.fake_pynvml import FakeNvml

TOKENS_PER_STEP = 16 * 8  # batch 16 x sequence 8
INTERVAL = 5
MAX_STEPS = 20_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    params = sum(p.numel() for p in model.parameters())
    tokens_recorded = 0
    with otel_train.setup(
        run=args.run,
        stage="sft",
        output_dir=args.workdir / "runs",
        exporters=("prometheus",),  # port from OTEL_TRAIN_PROMETHEUS_PORT + LOCAL_RANK
        intervals={"train": INTERVAL, "perf": INTERVAL, "gpu": INTERVAL},
        total_steps=MAX_STEPS,
        flops_per_token=6.0 * params,
        peak_flops=1e9,
        gpu_metrics=False,  # no GPU here: the real GPU gauges are fed by a faithful fake NVML
    ) as tel:
        register_gpu_metrics(tel, nvml=FakeNvml(), use_nvml=True)
        step = 0
        stopping = False
        while step < MAX_STEPS:
            step += 1
            x = torch.randn(16, 8)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if step == INTERVAL:  # a sampled step, so the overflow is not overwritten
                grad_norm = torch.tensor(float("inf"))  # an fp16-style overflow step
            optimizer.step()
            tel.training.record(
                loss=loss.detach(),
                learning_rate=0.01,
                grad_norm=grad_norm,
                tokens=torch.tensor(TOKENS_PER_STEP),
                samples=16,
                epoch=0,
            )
            tokens_recorded += TOKENS_PER_STEP
            tel.step(step)
            if step % 20 == 0:
                tel.evaluate(loss=loss.detach() * 1.1)
            stopping = stopping or (args.workdir / "stop").exists()
            if stopping and step % INTERVAL == 0:
                break  # a sampled step: the counter holds every token recorded
            # Pace the loop like a data loader would, so two ranks leave CPU for Prometheus.
            time.sleep(0.01)
        result = {"tokens": tokens_recorded, "step": step}
        tmp = args.workdir / f"result-rank{rank}.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.rename(args.workdir / f"result-rank{rank}.json")
        deadline = time.monotonic() + 60
        while not (args.workdir / "exit").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # serving scrapes until the test has read the final values


if __name__ == "__main__":
    main()
