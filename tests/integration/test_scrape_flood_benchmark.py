"""benchmarks/scrape_flood.py runs (CI smoke) and reports both phases side by side, as ratios.
No timing is asserted: the numbers are for the README and the reviewer, not for CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_scrape_flood_benchmark_smoke_reports_quiet_and_flood_phases(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    out = tmp_path / "flood.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scrape_flood.py"), "--threads", "2",
         "--blocks", "1", "--block-steps", "40", "--width", "32", "--json", str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["steps_per_phase"] == 40 and report["threads"] == 2
    for phase in ("quiet", "flood"):
        assert report[phase]["p50_ms"] > 0 and report[phase]["p99_ms"] >= report[phase]["p50_ms"]
    assert report["scrapes_per_second_during_flood"] > 0  # the flood really scraped
    assert report["ratio_p50"] > 0 and "flood / quiet" in result.stdout
