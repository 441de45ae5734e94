"""A real training loop (tiny torch model, CPU) that runs until it is signalled or killed.

Usage: python loop_worker.py OUTPUT_DIR MAX_STEPS [OTLP_ENDPOINT | tight]

`tight`: no model, every step sampled, so a signal almost always lands inside a sampled step
(the case where a flush waiting on the telemetry's lock deadlocked).
"""

from __future__ import annotations

import sys

import torch

import otel_train


def main() -> int:
    output_dir, max_steps = sys.argv[1], int(sys.argv[2])
    exporters: list[str] = ["jsonl"]
    if sys.argv[3:] == ["tight"]:
        with otel_train.setup(
            run="killed", output_dir=output_dir, exporters=exporters, intervals={"train": 1},
            shutdown_timeout_millis=4_000,
        ) as tel:  # fmt: skip
            for step in range(1, max_steps + 1):
                tel.training.record(loss=1.0 / step, tokens=16)
                tel.step(step)
        return 0
    if len(sys.argv) > 3:
        import os

        os.environ["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = sys.argv[3]
        exporters.append("otlp")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.randn(64, 16)
    target = torch.randn(64, 1)
    with otel_train.setup(
        run="killed",
        output_dir=output_dir,
        exporters=exporters,
        intervals={"train": 5, "perf": 10},
        shutdown_timeout_millis=4_000,  # drains a tight loop's backlog even on a loaded 2-core box
    ) as tel:
        for step in range(1, max_steps + 1):
            loss = torch.nn.functional.mse_loss(model(data), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tel.training.record(loss=loss.detach(), tokens=64 * 16, samples=64, learning_rate=0.01)
            tel.step(step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
