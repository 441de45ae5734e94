"""Read a JSON-lines run back (for `otel-train report | compare | sync`).

Tolerant of what real runs leave behind: a partial last line (the process was killed mid-write)
is skipped with a warning, and when a resumed run repeats steps the latest rows win.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from otel_train.errors import OtelTrainError

_logger = logging.getLogger("otel_train.runs")

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class RunNotFoundError(OtelTrainError):
    """The path holds no otel-train JSON-lines file."""


@dataclass(frozen=True, slots=True)
class RunRow:
    """One exported line: non-finite values are restored as float NaN / inf."""

    step: int
    time: float
    metrics: dict[str, float]


@dataclass(slots=True)
class RunRecord:
    """One rank's rows, in step order, with the run's identity."""

    path: Path
    run: str = ""
    stage: str = ""
    rank: int = 0
    rows: list[RunRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run or self.path.parent.name

    def keys(self) -> list[str]:
        return sorted({key for row in self.rows for key in row.metrics})

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key`; the last value wins where one step has several."""
        by_step: dict[int, float] = {}
        for row in self.rows:
            if key in row.metrics:
                by_step[row.step] = row.metrics[key]
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def last(self, key: str) -> float | None:
        for row in reversed(self.rows):
            if key in row.metrics:
                return row.metrics[key]
        return None


def run_file(path: Path, rank: int = 0) -> Path:
    """`path` may be the JSON-lines file itself or the run directory holding rank<N>.jsonl."""
    if path.is_file():
        return path
    candidate = path / f"rank{rank}.jsonl"
    if candidate.is_file():
        return candidate
    found = sorted(path.glob("*.jsonl")) if path.is_dir() else []
    if found:
        return found[0]
    raise RunNotFoundError(
        f"{path}: no JSON-lines run here; pass a run directory such as runs/<run> "
        "(it holds rank0.jsonl) or the .jsonl file itself"
    )


def read_run(path: str | Path, *, rank: int = 0) -> RunRecord:
    """All rows of one rank's file. Resumed runs: a step going backwards means the run was
    restarted from a checkpoint, so rows at or after that step from before are dropped."""
    file = run_file(Path(path), rank)
    record = RunRecord(path=file)
    lines = file.read_bytes().split(b"\n")
    last_index = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            row = _row(obj)
        except (ValueError, KeyError, TypeError) as error:
            where = "partial last line" if index == last_index else f"bad line {index + 1}"
            message = f"{file}: skipped {where} ({error.__class__.__name__})"
            record.warnings.append(message)
            _logger.warning("otel-train: %s", message)
            continue
        if not record.run:
            record.run = str(obj.get("run", ""))
            record.stage = str(obj.get("stage", ""))
            record.rank = int(obj.get("rank", 0))
        if record.rows and row.step < record.rows[-1].step:
            record.rows = [kept for kept in record.rows if kept.step < row.step]
        record.rows.append(row)
    return record


def _row(obj: dict[str, object]) -> RunRow:
    metrics_raw = obj["metrics"]
    if not isinstance(metrics_raw, dict):
        raise TypeError("metrics is not an object")
    nonfinite = obj.get("nonfinite") or {}
    if not isinstance(nonfinite, dict):
        raise TypeError("nonfinite is not an object")
    metrics: dict[str, float] = {}
    for key, value in metrics_raw.items():
        if value is None:
            spelled = nonfinite.get(key)
            if spelled in _NONFINITE:
                metrics[key] = _NONFINITE[spelled]
            continue
        metrics[key] = float(value)
    step = obj["step"]
    if not isinstance(step, int):
        raise TypeError("step is not an int")
    time_value = obj.get("time")
    seconds = float(time_value) if isinstance(time_value, (int, float)) else 0.0
    return RunRow(step=step, time=seconds, metrics=metrics)


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]
