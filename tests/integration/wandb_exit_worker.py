"""A training process exporting to W&B (typically unreachable), ending by `with` or atexit alone.

Usage: python -m tests.integration.wandb_exit_worker OUTPUT_DIR {with-block|atexit} BUDGET_MS
Prints `shutdown-returned <unix time>` once the `with` block is left (with-block), or
`script-ended <unix time>` when the script's last line ran (atexit).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import otel_train


def wandb_reached(pattern: str, text: str, deadline_seconds: float = 60) -> bool:
    """Wait until a file of this run under WANDB_DIR/wandb matching `pattern` holds `text`."""
    deadline = time.monotonic() + deadline_seconds
    wandb_dir = Path(os.environ["WANDB_DIR"]) / "wandb"
    while time.monotonic() < deadline:
        for log in wandb_dir.glob(pattern):
            if text in log.read_text(errors="replace"):
                return True
        time.sleep(0.05)
    return False


def main() -> None:
    output_dir, how, budget_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    tel = otel_train.setup(
        run="unreachable",
        output_dir=output_dir,
        exporters=("jsonl", "wandb"),
        shutdown_timeout_millis=budget_ms,
    )
    for step in range(1, 61):
        tel.training.record(loss=1.0 / step, tokens=64)
        tel.step(step)
    if os.environ["WANDB_MODE"] == "online":
        # The service has this run's stream and retries the unreachable server.
        reached = wandb_reached("run-*/logs/debug-internal.log", "retrying error")
    else:  # the offline run is up: wandb's exit hook now exists and would run first
        reached = wandb_reached("offline-run-*/logs/debug.log", "run started")
    if not reached:
        sys.exit("wandb never got there")
    if how == "with-block":
        with tel:
            pass
        print(f"shutdown-returned {time.time():.3f}", flush=True)
    else:
        print(f"script-ended {time.time():.3f}", flush=True)


if __name__ == "__main__":
    main()
