"""A training process whose W&B server cannot be reached, ending by `with` or by atexit alone.

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


def wandb_is_retrying(deadline_seconds: float = 60) -> bool:
    """Wait until wandb's service has this run's stream and retries the unreachable server."""
    deadline = time.monotonic() + deadline_seconds
    wandb_dir = Path(os.environ["WANDB_DIR"]) / "wandb"
    while time.monotonic() < deadline:
        for log in wandb_dir.glob("run-*/logs/debug-internal.log"):
            if "retrying error" in log.read_text(errors="replace"):
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
    if not wandb_is_retrying():
        sys.exit("wandb never reached the server-retry phase")
    if how == "with-block":
        with tel:
            pass
        print(f"shutdown-returned {time.time():.3f}", flush=True)
    else:
        print(f"script-ended {time.time():.3f}", flush=True)


if __name__ == "__main__":
    main()
