"""What a scrape shows of step-sampled data: exponential histograms as classic buckets, and
every gauge series' last value even when a batch carried only the series set for its step."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest

import otel_train

pytest.importorskip("opentelemetry.exporter.prometheus")
from exporters.prometheus import PrometheusExporter


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _value(text: str, prefix: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])


def test_an_exponential_histogram_is_scraped_as_classic_buckets_with_count_and_sum(tmp_path):
    exporter = PrometheusExporter(port=0)
    with otel_train.setup(
        run="hist", output_dir=tmp_path, exporters=(exporter,), intervals={"train": 10}
    ) as tel:
        latency = tel.meter.create_histogram("train.latency", unit="s")
        for step in range(1, 11):
            latency.record(0.25 if step <= 5 else 4.0)
            tel.step(step)
        tel.flush()
        assert exporter.url is not None
        text = _scrape(exporter.url)
    labels = 'rank="0",run="hist",stage="train"'
    assert _value(text, f"train_latency_seconds_count{{{labels}}}") == 10.0
    assert _value(text, f"train_latency_seconds_sum{{{labels}}}") == pytest.approx(21.25)
    # a bound at exactly 0.25 holds the five 0.25s; nothing below it; all ten below +Inf
    assert _value(text, f'train_latency_seconds_bucket{{le="0.25",{labels}}}') == 5.0
    assert _value(text, f'train_latency_seconds_bucket{{le="+Inf",{labels}}}') == 10.0
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert "error" not in (check.stdout + check.stderr).lower(), check.stdout + check.stderr


def test_a_scrape_keeps_every_gauge_series_last_value(tmp_path):
    exporter = PrometheusExporter(port=0)
    with otel_train.setup(
        run="series", output_dir=tmp_path, exporters=(exporter,), intervals={"train": 2}
    ) as tel:
        reward = tel.meter.create_gauge("train.reward")
        for step in range(1, 5):
            reward.set(float(step), {"dataset": "a" if step <= 2 else "b"})
            tel.step(step)
        tel.flush()
        assert exporter.url is not None
        text = _scrape(exporter.url)
    assert _value(text, 'train_reward{dataset="a"') == 2.0  # set at step 2 only: still shown
    assert _value(text, 'train_reward{dataset="b"') == 4.0
