"""Run folders and files: one folder per distinct run name, no silent merge of two runs into
one file, no write through a planted link, and a reader that survives whatever a file holds."""

from __future__ import annotations

import json
import logging
import os
import threading
import tracemalloc
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

import otel_train
from exporters.jsonl import JsonLinesMetricExporter, RunExistsError
from otel_train.run_context import MAX_RUN_FOLDER_BYTES, RunNameError
from otel_train.runs import MAX_LINE_BYTES, NotARunError, read_run


def _train(output_dir: Path, run: str = "r", *, steps: int = 20, **options: object) -> Path:
    with otel_train.setup(
        run=run,
        output_dir=output_dir,
        exporters=("jsonl",),
        intervals={"train": 10, "perf": 10},
        handle_signals=False,
        **options,  # type: ignore[arg-type]
    ) as tel:
        first = int(options.get("resume_step", 0)) + 1  # type: ignore[call-overload]
        for step in range(first, first + steps):
            tel.training.record(loss=1.0 + step / 100, tokens=4)
            tel.step(step)
        return tel.context.run_dir / "rank0.jsonl"


# -- item 12: a used run name -----------------------------------------------------------------
def test_a_new_run_under_a_used_name_is_refused_and_names_resume(tmp_path: Path) -> None:
    file = _train(tmp_path)
    before = file.read_bytes()
    with pytest.raises(RunExistsError, match=r"resume=True") as caught:
        _train(tmp_path)
    assert str(file) in str(caught.value)
    assert file.read_bytes() == before  # nothing appended, nothing truncated


def test_a_run_that_crashed_after_setup_is_not_merged_into_the_next(tmp_path: Path) -> None:
    crashed = otel_train.setup(
        run="r", output_dir=tmp_path, exporters=("jsonl",), handle_signals=False
    )
    crashed.shutdown()  # died before its first step: leaves only final/* at step 0
    file = crashed.context.run_dir / "rank0.jsonl"
    assert [row["step"] for row in map(json.loads, file.read_text().splitlines())] == [0]
    with pytest.raises(RunExistsError):
        _train(tmp_path)
    assert len(file.read_text().splitlines()) == 1


def test_resumed_runs_keep_appending_to_the_same_file(tmp_path: Path) -> None:
    file = _train(tmp_path)
    _train(tmp_path, resume_step=20)
    _train(tmp_path, resume=True, resume_step=40)
    record = read_run(file.parent)
    assert record.series("train/loss")[0] == [10, 20, 30, 40, 50, 60]


def test_an_empty_file_left_by_a_killed_run_is_reused(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "rank0.jsonl").write_bytes(b"")
    file = _train(tmp_path)
    assert read_run(file).series("train/loss")[0] == [10, 20]


def test_explicit_path_exporter_refuses_a_used_file_unless_resumed(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text('{"step":1,"time":1.0,"run":"x","stage":"s","rank":0,"metrics":{}}\n')
    with pytest.raises(RunExistsError, match=r"JsonLinesMetricExporter\(path, resume=True\)"):
        JsonLinesMetricExporter(path)
    JsonLinesMetricExporter(path, resume=True).shutdown()


def _plain_pipeline_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `OTEL_METRICS_EXPORTER=jsonl` builds: the exporter with no arguments, no setup()."""
    monkeypatch.setenv("OTEL_TRAIN_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "plain-otel")
    reader = PeriodicExportingMetricReader(JsonLinesMetricExporter(), export_interval_millis=1e9)
    provider = MeterProvider(metric_readers=[reader])
    gauge = provider.get_meter("app").create_gauge("queue.depth")
    for depth in (3, 5):
        gauge.set(depth)
        provider.force_flush()
    provider.shutdown()


def test_env_configured_exporter_never_merges_a_restarted_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _plain_pipeline_export(tmp_path, monkeypatch)
    file = tmp_path / "plain-otel" / "rank0.jsonl"
    before = file.read_bytes()
    with caplog.at_level(logging.ERROR, logger="otel_train.jsonl"):
        _plain_pipeline_export(tmp_path, monkeypatch)
    assert file.read_bytes() == before
    assert "OTEL_TRAIN_RESUME=1" in caplog.text and caplog.text.count("already holds") == 1
    monkeypatch.setenv("OTEL_TRAIN_RESUME", "1")
    _plain_pipeline_export(tmp_path, monkeypatch)
    assert len(file.read_text().splitlines()) > len(before.splitlines())


# -- item 11: rows without a training step ----------------------------------------------------
def test_rows_without_a_step_are_read_on_a_time_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plain_pipeline_export(tmp_path, monkeypatch)
    file = tmp_path / "plain-otel" / "rank0.jsonl"
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    assert all(line["step"] is None and line["time"] > 1.6e9 for line in lines)
    record = read_run(file.parent)
    assert record.axis == "time" and not record.warnings
    xs, values = record.series("queue/depth")
    assert values[:2] == [3.0, 5.0]
    assert xs[0] == 0.0 and xs == sorted(xs)  # seconds since the first row
    assert xs[-1] == pytest.approx(lines[-1]["time"] - lines[0]["time"])


def test_step_less_rows_among_stepped_rows_are_skipped_with_one_warning(tmp_path: Path) -> None:
    file = _train(tmp_path)
    with file.open("a") as handle:
        for _ in range(3):
            handle.write('{"step":null,"time":2e9,"run":"r","rank":0,"metrics":{"x/y":1}}\n')
    record = read_run(file)
    assert record.axis == "step" and record.series("train/loss")[0] == [10, 20]
    assert len(record.warnings) == 1 and "3 rows without a step" in record.warnings[0]


# -- item 16: crafted lines -------------------------------------------------------------------
CRAFTED = [
    b'{"step":5,"time":1.0,"run":"r","rank":"abc","metrics":{"train/loss":9}}',
    b'{"step":5,"time":1.0,"run":"r","rank":1e999,"metrics":{"train/loss":9}}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"step":5,"time":1.0,"run":"r","rank":0,"metrics":{"train/loss":' + b"9" * 400 + b"}}",
    b'{"step":true,"time":1.0,"run":"r","rank":0,"metrics":{"train/loss":9}}',
    b'{"step":5,"time":1e999,"run":"r","rank":0,"metrics":{"train/loss":9}}',
    b'{"step":5,"time":1.0,"run":"r","rank":0,"metrics":{"train/loss":"high"}}',
    b'{"step":-3,"time":1.0,"run":"r","rank":0,"metrics":{"train/loss":9}}',
    b'"just a string"',
    b"\xff\xfe not utf-8",
]


def test_crafted_lines_are_skipped_with_one_warning(tmp_path: Path) -> None:
    file = _train(tmp_path)
    good = file.read_bytes()
    file.write_bytes(b"\n".join(CRAFTED) + b"\n" + good)
    record = read_run(file)
    assert record.series("train/loss")[0] == [10, 20]
    assert record.rank == 0 and record.run == "r"
    (warning,) = record.warnings
    assert f"skipped {len(CRAFTED)} bad line(s)" in warning and "first: line 1" in warning


def test_a_file_with_no_row_is_refused_not_read_as_an_empty_run(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"steps": 20, "final_loss": 1.2}, indent=2))
    with pytest.raises(NotARunError, match=r"summary.json is not an otel-train JSON-lines run"):
        read_run(summary)


# -- item 21: bounded, linear reading ---------------------------------------------------------
def test_a_line_over_the_limit_is_skipped_without_holding_it_in_memory(tmp_path: Path) -> None:
    file = _train(tmp_path)
    huge = (
        b'{"step":15,"time":1.0,"run":"r","rank":0,"metrics":{"big":"'
        + b"x" * (5 * MAX_LINE_BYTES)
        + b'"}}\n'
    )
    file.write_bytes(file.read_bytes() + huge)
    tracemalloc.start()
    try:
        record = read_run(file)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert record.series("train/loss")[0] == [10, 20]
    assert any("longer than 8 MiB" in w for w in record.warnings), record.warnings
    assert peak < 2 * MAX_LINE_BYTES + 4 * 1024 * 1024  # never the whole 40 MiB line


def test_many_backward_steps_keep_the_latest_rows(tmp_path: Path) -> None:
    """Restarts from older and older checkpoints: every backward jump supersedes the rows at
    or after it. (Reading speed on 200k jumps: tests/integration/test_cli_run_files.py.)"""
    file = tmp_path / "rank0.jsonl"
    steps = [*range(1, 1001), *range(999, 500, -1), 700]
    with file.open("w") as handle:
        for step in steps:
            row = {"step": step, "time": 1.0, "run": "j", "rank": 0, "metrics": {"m": step}}
            handle.write(json.dumps(row) + "\n")
    record = read_run(file)
    assert [row.step for row in record.rows] == [*range(1, 502), 700]


# -- item 20: run names and folders -----------------------------------------------------------
def test_distinct_run_names_get_distinct_folders_and_keep_their_name(tmp_path: Path) -> None:
    names = ["训练-实验", "テスト", "a/b", "a_b", "a b", "x" * 300, "x" * 300 + "z"]
    folders = {}
    for name in names:
        file = _train(tmp_path, name, steps=10)
        folders[name] = file.parent
        assert read_run(file).run == name  # the data keeps the name verbatim
    assert len(set(folders.values())) == len(names)
    assert folders["训练-实验"].name == "训练-实验" and folders["テスト"].name == "テスト"
    assert folders["a_b"].name == "a_b" and folders["a/b"].name.startswith("a_b-")
    assert all(f.parent == tmp_path for f in folders.values())
    assert all(len(f.name.encode()) <= MAX_RUN_FOLDER_BYTES for f in folders.values())


@pytest.mark.parametrize("name", ["..", ".", "...", " .. "])
def test_a_run_name_that_cannot_name_a_folder_is_rejected_naming_run(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(RunNameError, match=r"run=.*cannot name the run's folder"):
        otel_train.setup(run=name, output_dir=tmp_path, exporters=("jsonl",))
    assert list(tmp_path.iterdir()) == []


# -- item 19: planted links -------------------------------------------------------------------
def test_json_lines_are_never_written_through_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "rank0.jsonl").symlink_to(target)
    with pytest.raises(otel_train.OtelTrainError, match="symbolic link"):
        _train(tmp_path / "runs", resume=True)  # even a resumed run: the link is refused
    with pytest.raises(otel_train.OtelTrainError, match="symbolic link"):
        JsonLinesMetricExporter(run_dir / "rank0.jsonl", resume=True)
    assert target.read_text() == "precious\n"
    assert os.path.islink(run_dir / "rank0.jsonl")


def test_a_fifo_planted_as_the_json_lines_file_is_refused_without_blocking(
    tmp_path: Path,
) -> None:
    """Opening a FIFO for writing blocks until a reader comes; setup() must fail instead."""
    fifo = tmp_path / "rank0.jsonl"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            JsonLinesMetricExporter(fifo)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=open_it, daemon=True)
    worker.start()
    worker.join(timeout=30)  # a guard against the hang, not a timing claim
    assert outcome, "opening the FIFO blocked"
    assert isinstance(outcome[0], otel_train.OtelTrainError)
    assert "not a regular file" in str(outcome[0])
