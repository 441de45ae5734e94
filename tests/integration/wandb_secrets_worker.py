"""A real training process whose config and command line hold secrets, exporting to W&B.

Usage: python -m tests.integration.wandb_secrets_worker OUTPUT_DIR [any secret-bearing flags]
"""

from __future__ import annotations

import sys

import otel_train
from tests.secrets_corpus import corpus


def main() -> None:
    output_dir = sys.argv[1]  # the rest of the command line is there to be redacted
    with otel_train.setup(
        run="secrets", output_dir=output_dir, exporters=("jsonl", "wandb"), config=corpus()
    ) as tel:
        for step in range(1, 21):
            tel.training.record(loss=1.0 / step, learning_rate=3e-4)
            tel.step(step)


if __name__ == "__main__":
    main()
