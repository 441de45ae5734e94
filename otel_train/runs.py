"""Read a JSON-lines run back (for `otel-train report | compare | sync`).

Tolerant of what real runs leave behind and of what a hostile file holds: a partial last line
(the process was killed mid-write), lines that are not rows (bad JSON, a rank of "abc", deep
nesting) and lines longer than `MAX_LINE_BYTES` are skipped with one warning each kind; when
a resumed run repeats steps the latest rows win. A file with no row at all is refused.
Reading is one linear pass, line by line: memory is bounded by the longest accepted line.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from otel_train.errors import OtelTrainError
from otel_train.run_lines import MAX_LINE_BYTES as MAX_LINE_BYTES  # re-exported
from otel_train.run_lines import BadLines, bounded_lines

_logger = logging.getLogger(__name__)

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

_MAX_INT = 2**63 - 1  # steps and ranks are int64 everywhere else (W&B, torch, Prometheus)

Axis = Literal["step", "time"]


class RunNotFoundError(OtelTrainError):
    """The path holds no otel-train JSON-lines file."""


class NotARunError(OtelTrainError):
    """The file has lines, but none is an otel-train row: it is some other file."""


class EmptyRunError(OtelTrainError):
    """The run's file holds no row yet: there is nothing to report, compare or sync."""


@dataclass(frozen=True, slots=True)
class RunRow:
    """One exported line: non-finite values are restored as float NaN / inf.

    `step` is None for rows written without a training step (a plain OTel pipeline through
    `OTEL_METRICS_EXPORTER=jsonl`); `time` is the collection time, in Unix seconds.
    """

    step: int | None
    time: float
    metrics: dict[str, float]


@dataclass(slots=True)
class RunRecord:
    """One rank's rows, in x-axis order, with the run's identity.

    `axis` is "step" when the rows carry training steps, "time" when none does: the x of a
    row is then its seconds since the run's first row."""

    path: Path
    run: str = ""
    stage: str = ""
    rank: int = 0
    rows: list[RunRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    axis: Axis = "step"

    @property
    def name(self) -> str:
        return self.run or self.path.parent.name

    @property
    def axis_label(self) -> str:
        return "step" if self.axis == "step" else "seconds since the first row"

    def keys(self) -> list[str]:
        return sorted({key for row in self.rows for key in row.metrics})

    def x(self, row: RunRow) -> float:
        """The row's place on the run's x-axis (its step, or seconds since the first row)."""
        if self.axis == "step" and row.step is not None:
            return row.step
        return row.time - self.rows[0].time if self.rows else 0.0

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(x, values) of `key`; the last value wins where one x has several."""
        by_x: dict[float, float] = {}
        for row in self.rows:
            if key in row.metrics:
                by_x[self.x(row)] = row.metrics[key]
        xs = sorted(by_x)
        return xs, [by_x[x] for x in xs]

    def last(self, key: str) -> float | None:
        for row in reversed(self.rows):
            if key in row.metrics:
                return row.metrics[key]
        return None

    @property
    def last_step(self) -> int | None:
        steps = [row.step for row in self.rows if row.step is not None]
        return steps[-1] if steps else None


def run_file(path: Path, rank: int | None = None) -> Path:
    """`path` may be the JSON-lines file itself or the run directory holding rank<N>.jsonl.

    With `rank=None` a directory gives rank0.jsonl, else its first `*.jsonl`; a rank asked
    for must exist (never another rank's file in its place)."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.jsonl")) if path.is_dir() else []
    candidate = path / f"rank{0 if rank is None else rank}.jsonl"
    if candidate.is_file():
        return candidate
    if found and rank is None:
        return found[0]
    if found:
        names = ", ".join(p.name for p in found)
        raise RunNotFoundError(
            f"{path}: no rank{rank}.jsonl here (this run has {names}); pass --rank with one "
            "of those ranks"
        )
    raise RunNotFoundError(
        f"{path}: no JSON-lines run here; pass a run directory such as runs/<run> "
        "(it holds rank0.jsonl) or the .jsonl file itself"
    )


def read_run(path: str | Path, *, rank: int | None = None) -> RunRecord:
    """All rows of one rank's file, in one pass.

    Resumed runs: a step going backwards means the run was restarted from a checkpoint, so
    rows at or after that step from before are dropped. Raises `NotARunError` when the file
    has lines but no row (e.g. a summary.json passed by mistake)."""
    file = run_file(Path(path), rank)
    record = RunRecord(path=file)
    bad = BadLines(file, _logger)
    stepless: list[RunRow] = []
    lines_seen = 0
    with file.open("rb") as handle:
        for number, raw in bounded_lines(handle):
            if raw is None:
                lines_seen += 1
                bad.oversized(number)
                continue
            if not raw.strip():
                continue
            lines_seen += 1
            try:
                obj = json.loads(raw)
                row, identity = _row(obj)
            except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
                bad.add(number, error, partial=not raw.endswith(b"\n"))
                continue
            if not record.rows and not stepless:
                record.run, record.stage, record.rank = identity
            if row.step is None:
                stepless.append(row)
                continue
            _append_in_step_order(record.rows, row, row.step)
    if record.rows and stepless:
        bad.warn(
            f"skipped {len(stepless)} rows without a step (the other rows have steps; "
            "rows of one file share one x-axis)"
        )
    elif stepless:
        timed = [row for row in stepless if row.time > 0]
        if len(timed) < len(stepless):
            bad.warn(f"skipped {len(stepless) - len(timed)} rows with neither step nor time")
        record.axis = "time"
        record.rows = sorted(timed, key=lambda row: row.time)
    bad.finish()
    record.warnings.extend(bad.messages)
    if lines_seen and not record.rows and not stepless:
        raise NotARunError(
            f"{file} is not an otel-train JSON-lines run (none of its {lines_seen} lines is a "
            'row with "step", "time" and "metrics"); pass a run folder such as runs/<run> or '
            "its rank<N>.jsonl"
        )
    return record


def _append_in_step_order(rows: list[RunRow], row: RunRow, step: int) -> None:
    """A step lower than the last one: the run restarted from a checkpoint, so the earlier
    rows at or after `step` are superseded. Rows kept are in step order, so that is popping
    from the end: each row is appended and removed at most once (linear in the file)."""
    if rows and rows[-1].step is not None and rows[-1].step > step:
        while rows and rows[-1].step is not None and rows[-1].step >= step:
            rows.pop()
    rows.append(row)


def require_rows(record: RunRecord) -> RunRecord:
    """The CLI's check before it draws or writes anything: an empty run is an error."""
    if not record.rows:
        raise EmptyRunError(
            f"{record.path} holds no rows yet (the run exported nothing: it stopped before its "
            "first sampled step, or is still starting); nothing was written"
        )
    return record


def _int_field(obj: dict[str, object], key: str, *, default: int | None) -> int | None:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise ValueError(f"{key} is not a non-negative int")
    return value


def _row(obj: object) -> tuple[RunRow, tuple[str, str, int]]:
    if not isinstance(obj, dict):
        raise TypeError("a row is a JSON object")
    metrics_raw = obj["metrics"]
    if not isinstance(metrics_raw, dict):
        raise TypeError("metrics is not an object")
    nonfinite = obj.get("nonfinite") or {}
    if not isinstance(nonfinite, dict):
        raise TypeError("nonfinite is not an object")
    if "step" not in obj:
        raise KeyError("step")
    metrics: dict[str, float] = {}
    for key, value in metrics_raw.items():
        if value is None:
            spelled = nonfinite.get(key)
            if isinstance(spelled, str) and spelled in _NONFINITE:
                metrics[key] = _NONFINITE[spelled]
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r} is not a number")
        metrics[key] = float(value)  # OverflowError for a 400-digit int: a bad line
    step = _int_field(obj, "step", default=None)
    rank = _int_field(obj, "rank", default=0) or 0
    time_value = obj.get("time")
    seconds = float(time_value) if isinstance(time_value, (int, float)) else 0.0
    if not math.isfinite(seconds) or isinstance(time_value, bool):
        raise ValueError("time is not a finite number")
    run, stage = obj.get("run", ""), obj.get("stage", "")
    identity = (run if isinstance(run, str) else "", stage if isinstance(stage, str) else "", rank)
    return RunRow(step=step, time=seconds, metrics=metrics), identity


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]
