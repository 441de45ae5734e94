"""benchmarks/prometheus_export.py runs (CI smoke): batches captured from a real pipeline give
the same bytes through the export-time shaping of before and the scrape-time shaping of now,
and both costs are reported side by side. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_prometheus_export_benchmark_serves_equal_bytes_and_reports_both_costs(
    tmp_path: Path,
) -> None:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    out = tmp_path / "export.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "prometheus_export.py"), "--rounds", "1",
         "--batches", "60", "--json", str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr  # exits 1 on unequal bytes
    report = json.loads(out.read_text())
    for workload in ("standard", "standard+histogram+8 gpu gauge"):
        numbers = report[workload]
        assert numbers["metrics_per_batch"] >= 17
        assert numbers["before_us"] > 0 and numbers["now_us"] > 0
        assert numbers["ratio_now_over_before"] > 0 and numbers["render_now_us"] > 0
    assert "now / before" in result.stdout
