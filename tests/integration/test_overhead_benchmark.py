"""benchmarks/overhead.py runs (CI smoke) and counts what it claims: the by-hand loop brings a
value to the host every step, otel-train only on sampled steps. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_overhead_benchmark_smoke_counts_host_materialisations(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    out = tmp_path / "overhead.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--quick",
         "--rounds", "1", "--steps", "30", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {"bare", "by hand", "otel-train"}
    assert rows["bare"]["ratio_to_bare"] == 1.0
    assert "jsonl" in report["otel_train_exporters_active"]
    # by hand: loss.item() every step (+ grad norm and exp(loss) every 10th) = 1.2 per step.
    assert rows["by hand"]["materialisations_per_step"] == pytest.approx(1.2)
    # otel-train: none on the training thread; its one packed transfer per sampled step is
    # read on the finisher thread.
    assert rows["otel-train"]["materialisations_per_step"] == pytest.approx(0.0, abs=1e-9)
    assert "otel-train" in result.stdout and "syncs" in result.stdout
