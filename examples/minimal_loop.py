"""A plain PyTorch loop instrumented with otel-train: the smallest complete example."""

from __future__ import annotations

import time

import torch

import otel_train


def main(steps: int = 200) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with otel_train.setup(
        run=time.strftime("minimal-%Y%m%d-%H%M%S"),  # a new run each time
        stage="pretrain",
        exporters=("jsonl",),
        total_steps=steps,
    ) as tel:
        for step in range(1, steps + 1):
            x = torch.randn(16, 32)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            # Tensors are fine: nothing is synchronised until a sampled step.
            tel.training.record(
                loss=loss.detach(),
                grad_norm=grad_norm,
                learning_rate=1e-3,
                tokens=16 * 32,
                samples=16,
                epoch=0,
            )
            tel.step(step)
        print(f"JSON lines: {tel.context.run_dir}")


if __name__ == "__main__":
    main()
