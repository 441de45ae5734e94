"""The JSON-lines run reader behind report / compare / sync, on files written by real runs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

import otel_train
from otel_train.runs import RunNotFoundError, read_run


def _train(output_dir: Path, steps: range, *, loss: float, resume_step: int = 0) -> Path:
    with otel_train.setup(
        run="reader-run",
        output_dir=output_dir,
        exporters=("jsonl",),
        intervals={"train": 10, "perf": 10},
        resume_step=resume_step,
    ) as tel:
        for step in steps:
            tel.training.record(loss=loss + step / 1000, tokens=8, samples=1)
            tel.step(step)
        return tel.context.run_dir


def test_rows_come_back_with_keys_steps_and_identity(tmp_path: Path) -> None:
    run_dir = _train(tmp_path, range(1, 31), loss=2.0)
    record = read_run(run_dir)
    assert record.run == "reader-run" and record.rank == 0 and not record.warnings
    steps, losses = record.series("train/loss")
    assert steps == [10, 20, 30]
    # the interval mean of the ten losses before each export
    assert losses == pytest.approx([2.0055, 2.0155, 2.0255])
    assert record.last("train/num_input_tokens_seen") == 240.0
    assert record.last("final/total_steps") == 30.0


def test_partial_last_line_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _train(tmp_path, range(1, 31), loss=2.0)
    file = run_dir / "rank0.jsonl"
    whole = file.read_bytes()
    # What SIGKILL mid-write leaves: the first half of one more line, no newline.
    file.write_bytes(whole + whole.splitlines(keepends=True)[0][:40])
    with caplog.at_level(logging.WARNING, logger="otel_train.runs"):
        record = read_run(run_dir)
    assert record.series("train/loss")[0] == [10, 20, 30]
    assert len(record.warnings) == 1 and "partial last line" in record.warnings[0]
    assert "partial last line" in caplog.text


def test_resumed_run_keeps_the_latest_rows_for_repeated_steps(tmp_path: Path) -> None:
    _train(tmp_path, range(1, 31), loss=5.0)  # crashed after step 30 ...
    run_dir = _train(tmp_path, range(11, 41), loss=1.0, resume_step=10)  # ... resumed from 10
    record = read_run(run_dir)
    steps, losses = record.series("train/loss")
    assert steps == [10, 20, 30, 40]
    # Step 10 is from the first run; 20 and 30 were redone by the resumed run and win.
    assert losses == pytest.approx([5.0055, 1.0155, 1.0255, 1.0355])  # interval means
    assert [row.step for row in record.rows] == sorted(row.step for row in record.rows)
    assert record.last("final/total_steps") == 40.0  # the crashed run's final row is gone


def test_nonfinite_values_come_back_as_nan(tmp_path: Path) -> None:
    with otel_train.setup(
        run="nan-run", output_dir=tmp_path, exporters=("jsonl",), intervals={"train": 1}
    ) as tel:
        tel.training.record(loss=1.5)
        tel.step(1)
        tel.training.record(loss=float("nan"))
        tel.step(2)
        run_dir = tel.context.run_dir
    steps, losses = read_run(run_dir).series("train/loss")
    assert steps == [1, 2] and losses[0] == 1.5 and math.isnan(losses[1])


def test_a_folder_without_a_run_names_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError, match=r"rank0\.jsonl"):
        read_run(tmp_path)
    assert issubclass(RunNotFoundError, otel_train.OtelTrainError)
