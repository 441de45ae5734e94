"""A Telemetry the program no longer references (set up inside a function that returned, never
shut down) still exports its tail and final/* at exit: the exit hook holds it until then."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import otel_train

def train(output_dir):
    tel = otel_train.setup(run="dropped", output_dir=output_dir, exporters=("jsonl",),
                           intervals={"train": 10}, gpu_metrics=False, system_metrics=False)
    for step in range(1, 26):
        tel.training.record(loss=1.0, tokens=10)
        tel.step(step)

train(sys.argv[1])  # returns: nothing references the Telemetry any more
"""


def test_an_unreferenced_telemetry_is_flushed_at_exit(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [
        json.loads(line) for line in (tmp_path / "dropped/rank0.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows if "train/loss" in row["metrics"]] == [10, 20, 25]
    assert rows[-1]["metrics"]["final/total_tokens"] == 250
