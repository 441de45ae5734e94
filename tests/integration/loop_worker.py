"""A real training loop (tiny torch model, CPU) that runs until it is signalled or killed.

Usage: python loop_worker.py OUTPUT_DIR MAX_STEPS [OTLP_ENDPOINT | tight | slow-close]

`tight`: no model, every step sampled, so a signal almost always lands inside a sampled step
(the case where a flush waiting on the telemetry's lock deadlocked).
`slow-close`: MAX_STEPS steps, then `shutdown()`, whose exporter takes 3 s to flush (prints
"closing" when it starts, "survived shutdown" after it returns, then sleeps 60 s).
"""

from __future__ import annotations

import sys
import time

import torch
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

import otel_train


class SlowClosingExporter(MetricExporter):
    """Exports at once; its flush at shutdown takes 3 s (a backend draining its buffer)."""

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        print("closing", flush=True)
        time.sleep(3.0)
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


def _slow_close(output_dir: str, steps: int) -> int:
    tel = otel_train.setup(
        run="killed",
        output_dir=output_dir,
        exporters=["jsonl", SlowClosingExporter()],
        intervals={"train": 5},
        shutdown_timeout_millis=5_000,
    )
    for step in range(1, steps + 1):
        tel.training.record(loss=1.0 / step, tokens=16)
        tel.step(step)
    tel.shutdown()
    print("survived shutdown", flush=True)  # a SIGTERM during shutdown() was lost
    time.sleep(60)
    return 0


def main() -> int:
    output_dir, max_steps = sys.argv[1], int(sys.argv[2])
    exporters: list[str] = ["jsonl"]
    if sys.argv[3:] == ["slow-close"]:
        return _slow_close(output_dir, max_steps)
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
