"""JSON lines: the documented layout, valid JSON on every line, append on resume."""

from __future__ import annotations

import json

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import otel_train
from exporters import JsonLinesMetricExporter


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_line_has_the_documented_fields(tmp_path):
    with otel_train.setup(
        run="gpt-small-sft",
        stage="sft",
        output_dir=tmp_path,
        exporters=("jsonl",),
        intervals={"train": 1},
    ) as tel:
        tel.training.record(loss=2.31, learning_rate=1e-4, tokens=512, samples=2, epoch=0.5)
        tel.step(1)
    first = _lines(tmp_path / "gpt-small-sft" / "rank0.jsonl")[0]
    assert set(first) == {"step", "time", "run", "stage", "rank", "metrics"}
    assert (first["step"], first["run"], first["stage"], first["rank"]) == (
        1,
        "gpt-small-sft",
        "sft",
        0,
    )
    assert first["time"] > 1.6e9
    assert first["metrics"]["train/loss"] == 2.31
    assert first["metrics"]["train/num_input_tokens_seen"] == 512
    assert first["metrics"]["train/epoch"] == 0.5


def test_resumed_run_appends_instead_of_clobbering(tmp_path):
    for start in (0, 20):
        tel = otel_train.setup(
            run="resumable",
            output_dir=tmp_path,
            exporters=("jsonl",),
            intervals={"train": 10},
            resume_step=start,
        )
        for step in range(start + 1, start + 21):
            tel.training.record(loss=1.0, tokens=1)
            tel.step(step)
        tel.shutdown()
    rows = _lines(tmp_path / "resumable" / "rank0.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r["metrics"]] == [10, 20, 30, 40]
    assert sum(1 for r in rows if "final/total_steps" in r["metrics"]) == 2


def test_exporter_works_behind_a_plain_otel_reader(tmp_path):
    """It is a real MetricExporter: any OTel pipeline can drive it, not only ours."""
    path = tmp_path / "plain.jsonl"
    exporter = JsonLinesMetricExporter(path, run="plain")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("x").create_counter("train.tokens").add(42)
    exporter.export(reader.get_metrics_data())
    exporter.shutdown()
    provider.shutdown()
    (row,) = _lines(path)
    assert row["metrics"] == {"train/num_input_tokens_seen": 42.0}
    assert row["step"] is None  # no global step in a plain pipeline: said, not invented


def test_each_export_is_on_disk_before_shutdown(tmp_path):
    tel = otel_train.setup(
        run="live", output_dir=tmp_path, exporters=("jsonl",), intervals={"train": 5}
    )
    for step in range(1, 11):
        tel.training.record(loss=0.5)
        tel.step(step)
    tel.flush()
    assert [r["step"] for r in _lines(tmp_path / "live" / "rank0.jsonl")] == [5, 10]
    tel.shutdown()
