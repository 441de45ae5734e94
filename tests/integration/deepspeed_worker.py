"""A real single-process DeepSpeed run (gloo, CPU, ZeRO-1, fp32) feeding DeepSpeedRecorder.

Usage: python deepspeed_worker.py OUTPUT_DIR CONFIG_JSON. Writes JSON lines under OUTPUT_DIR.
"""

from __future__ import annotations

import json
import sys

import deepspeed
import deepspeed.comm.torch as ds_comm_torch
import torch

import otel_train
from otel_train.integrations.deepspeed import DeepSpeedRecorder

# DeepSpeed JIT-compiles a shared-memory all-reduce kernel at init on CPU (26-100 s on two
# cores). It only speeds up multi-process CPU all-reduce; a single process never uses it.
ds_comm_torch.build_shm_op = lambda: None


def main() -> int:
    output_dir, config = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    with otel_train.setup(
        run="deepspeed", output_dir=output_dir, exporters=["jsonl"], intervals={"train": 2}
    ) as tel:
        recorder = DeepSpeedRecorder(tel, engine)
        micro_steps = 6 * recorder.gradient_accumulation_steps
        micro_losses: dict[int, list[float]] = {}  # optimizer step -> its micro-batch losses
        for _ in range(micro_steps):
            x = torch.randn(recorder.micro_batch_size, 8)
            loss = torch.nn.functional.mse_loss(engine(x), x.sum(1, keepdim=True))
            engine.backward(loss)
            step = engine.global_steps + 1  # the optimizer step this micro-batch belongs to
            micro_losses.setdefault(step, []).append(loss.item())  # test bookkeeping only
            engine.step()
            recorder.after_step(loss=loss.detach())
        print(
            json.dumps(
                {
                    "global_steps": engine.global_steps,
                    "batch": recorder.effective_batch_size,
                    "micro_losses": micro_losses,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
