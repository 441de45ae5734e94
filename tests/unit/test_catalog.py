"""The one catalog drives the README table; the SDK privates we rely on still exist; the global
meter provider records into the staged pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from otel_train.catalog import RECORD_KEYWORDS, STANDARD_INSTRUMENTS, markdown_table
from otel_train.instruments import RECORDABLE

REPO = Path(__file__).resolve().parents[2]


def test_readme_metric_table_is_the_catalog():
    assert markdown_table() in (REPO / "README.md").read_text()


def test_record_keywords_come_from_the_catalog():
    assert RECORDABLE == RECORD_KEYWORDS
    assert set(RECORD_KEYWORDS) == {s.keyword for s in STANDARD_INSTRUMENTS if s.keyword}


def test_install_global_makes_any_librarys_get_meter_record_staged(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, otel_train
        from opentelemetry import metrics
        with otel_train.setup(run="g", output_dir={str(tmp_path)!r}, exporters=("jsonl",),
                              intervals={{"train": 2}}, install_global=True) as tel:
            lib = metrics.get_meter("some.library")  # what a library does at import time
            gauge = lib.create_gauge("train.library_value")
            for step in (1, 2):
                gauge.set(torch.tensor(float(step)))
                tel.step(step)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)
    rows = [json.loads(line) for line in (tmp_path / "g" / "rank0.jsonl").read_text().split()]
    assert [r["metrics"]["train/library_value"] for r in rows if "train/library_value" in
            r["metrics"]] == [2.0]  # fmt: skip
