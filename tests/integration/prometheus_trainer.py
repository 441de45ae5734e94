"""A real instrumented training run (tiny torch model) for the live Prometheus tests.

Run as a subprocess, one per rank (RANK / LOCAL_RANK / WORLD_SIZE in the environment).
Control files in `--workdir`: it trains until `stop` appears, finishes on a sampled step,
writes `result-rank<N>.json` (tokens recorded, last step), keeps serving /metrics until
`exit` appears, then shuts down.
`--tail K`: after `stop`, K more steps past the sampled one (the tail no sampled step
exported), then the result and a normal exit at once: shutdown exports the tail.
`--reduce --steps N`: a gloo process group (MASTER_ADDR / MASTER_PORT), rank r records
(r + 1) x the tokens per step, `reduce_across_ranks=True`, exactly N steps (a stop file seen
at different steps would leave one rank alone in the collective), then as above.
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
    parser.add_argument("--tail", type=int, default=0)
    parser.add_argument("--reduce", action="store_true")
    parser.add_argument("--steps", type=int, default=MAX_STEPS)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    if args.reduce:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://")
    tokens_per_step = TOKENS_PER_STEP * (rank + 1 if args.reduce else 1)
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
        reduce_across_ranks=args.reduce,
    ) as tel:
        register_gpu_metrics(tel, nvml=FakeNvml(), use_nvml=True)
        step = 0
        stopping = False
        tail = -1  # steps still to train after the stop (set when the stop is seen)
        while step < args.steps:
            step += 1
            x = torch.randn(16, 8)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if step == INTERVAL and not args.reduce:  # a sampled step: not overwritten
                grad_norm = torch.tensor(float("inf"))  # an fp16-style overflow step
            optimizer.step()
            tel.training.record(
                loss=loss.detach(),
                learning_rate=0.01,
                grad_norm=grad_norm,
                tokens=torch.tensor(tokens_per_step),
                samples=16,
                epoch=0,
            )
            tokens_recorded += tokens_per_step
            tel.step(step)
            if step % 20 == 0:
                tel.evaluate(loss=loss.detach() * 1.1)
            if tail > 0:
                tail -= 1
                if tail == 0:
                    break  # `--tail` steps past the last sampled one: not exported yet
                continue
            stopping = stopping or (not args.reduce and (args.workdir / "stop").exists())
            if stopping and step % INTERVAL == 0:
                if args.tail:
                    tail = args.tail
                    continue
                break  # a sampled step: the counter holds every token recorded
            # Pace the loop like a data loader would, so two ranks leave CPU for Prometheus.
            time.sleep(0.01)
        result = {"tokens": tokens_recorded, "step": step}
        tmp = args.workdir / f"result-rank{rank}.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.rename(args.workdir / f"result-rank{rank}.json")
        deadline = time.monotonic() + 60
        while not args.tail and not (args.workdir / "exit").exists():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)  # serving scrapes until the test has read the final values
    if args.reduce:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
