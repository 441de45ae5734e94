"""JSON lines: one object per export, one file per rank, valid JSON on every line.

`{"step": 120, "time": ..., "run": ..., "stage": ..., "rank": 0, "metrics": {"train/loss": ...}}`
Non-finite values are written as null and listed under "nonfinite" (bare NaN is not JSON).
One `write()` per line and a flush per export, so a killed process leaves at most one partial
last line; fsync at shutdown. A file that already holds rows is appended to only by a resumed
run (`resume=True`); a new run under a used name is refused, never merged into the old one.
A row without a training step (a plain OTel pipeline) has `"step": null`; its `time` (the
collection time, Unix seconds) is then its x-axis. Files are opened with `O_NOFOLLOW`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from otel_train.errors import OtelTrainError
from otel_train.naming import KeyNamer
from otel_train.ranks import detect_ranks
from otel_train.rows import MetricRow, RowBuilder, SharedRowConsumer, shared_row
from otel_train.run_context import RunContext, output_dir_from, run_dir_for
from otel_train.safe_files import LinkRefusedError, open_for_append

_logger = logging.getLogger("otel_train.jsonl")

RESUME_ENV = "OTEL_TRAIN_RESUME"  # the env-configured exporter's `resume=True`


class RunExistsError(OtelTrainError):
    """The run's JSON-lines file already holds rows and this run is not a resumed one."""


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.jsonl"


def row_to_json(row: MetricRow, *, run: str, stage: str, rank: int) -> str:
    """The line for one row: always valid JSON (allow_nan=False proves it)."""
    values = row.values
    # Copied only to spell non-finite values as null (the row is shared: never changed).
    metrics = (
        {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        if row.nonfinite
        else values
    )
    record: dict[str, Any] = {
        "step": row.step,
        # The collection time; a batch with no data point carries none, so the export's own.
        "time": round(row.time if row.time > 0 else time.time(), 6),
        "run": run,
        "stage": stage,
        "rank": rank,
        "metrics": metrics,
    }
    if row.nonfinite:
        record["nonfinite"] = {key: _spell(row.values[key]) for key in row.nonfinite}
    return _ENCODER.encode(record)


# One encoder for every line (json.dumps builds a new one per call when given options): the
# same C encoder, the same bytes. allow_nan=False: a bare NaN can never reach the file.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _spell(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class JsonLinesMetricExporter(SharedRowConsumer, MetricExporter):
    """A real OTel MetricExporter. Usable behind any reader; `setup()` gives it the run's path.

    With no `path`, it writes `<output_dir>/<run>/rank<N>.jsonl` once bound to a run. A file
    that already holds rows is refused (`RunExistsError`) unless `resume=True` (or, bound by
    `setup()`, the run is resumed: `resume=True` / `resume_step=N`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        run: str = "run",
        stage: str = "train",
        rank: int = 0,
        namer: KeyNamer | None = None,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self._run, self._stage, self._rank = run, stage, rank
        self._resume = resume
        self._rows = RowBuilder(namer)
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._broken = False
        self.failures = 0
        if path is not None:
            self._open(Path(path), resume_hint="JsonLinesMetricExporter(path, resume=True)")

    @property
    def path(self) -> Path | None:
        return self._path

    def bind_run_context(self, context: RunContext) -> None:
        """Called by setup(): take the run's identity, and its path unless one was given."""
        self._run, self._stage, self._rank = context.run, context.stage, context.rank
        self._rows = RowBuilder(context.namer)
        if self._path is None:
            self._resume = self._resume or context.resume
            self._open(context.run_dir / rank_file_name(context.rank))

    def _open(
        self, path: Path, *, resume_hint: str = "setup(resume=True) or resume_step=N"
    ) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered append: each line is one write(2), resumed runs add to the same file.
            file = open_for_append(path)
        except LinkRefusedError as error:
            raise OtelTrainError(
                f"cannot write JSON lines to {path}: it {error.strerror}; otel-train never "
                "writes through a link or into a special file. Remove it, or pass another "
                "run= / output_dir=."
            ) from error
        except OSError as error:
            raise OtelTrainError(
                f"cannot write JSON lines to {path}: {error.strerror or error}. Pass a writable "
                "output_dir= (or set OTEL_TRAIN_OUTPUT_DIR)."
            ) from error
        if not self._resume and os.fstat(file.fileno()).st_size > 0:
            file.close()
            raise RunExistsError(
                f"{path} already holds the rows of an earlier run; a new run is never merged "
                f"into it. To continue that run, pass {resume_hint}; otherwise pick another "
                "run name or output_dir."
            )
        self._file = file
        self._path = path

    def _open_from_env(self) -> bool:
        """Built with no path and never bound (e.g. `OTEL_METRICS_EXPORTER=jsonl` through the
        OTel SDK's configurator): take the run's place from the environment, once."""
        env = os.environ
        run = env.get("OTEL_TRAIN_RUN") or env.get("OTEL_SERVICE_NAME") or "otel"
        rank = detect_ranks().rank
        self._run, self._rank = run, rank
        resume = env.get(RESUME_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self._resume = self._resume or resume
        directory = output_dir_from(None, env)
        try:
            directory = run_dir_for(directory, run)
            self._open(directory / rank_file_name(rank), resume_hint=f"{RESUME_ENV}=1")
        except OtelTrainError as error:
            self._path = directory  # do not retry on every export
            _logger.error("otel-train: %s", error)
            return False
        return True

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if self._file is None and self._path is None:
            self._open_from_env()
        file = self._file
        if file is None:
            return MetricExportResult.FAILURE
        row = shared_row(metrics_data, self._rows)
        line = row_to_json(row, run=self._run, stage=self._stage, rank=self._rank) + "\n"
        payload = line.encode("utf-8")
        with self._lock:
            try:
                _write_whole_line(file, payload)
            except (OSError, ValueError) as error:
                self.failures += 1
                if not self._broken:
                    self._broken = True
                    _logger.error(
                        "otel-train: cannot append to %s (%s); JSON lines are being lost, "
                        "other exporters continue",
                        self._path,
                        error,
                    )
                return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        with self._lock:
            if self._file is None or self._file.closed:
                return True
            try:
                os.fsync(self._file.fileno())
            except (OSError, ValueError):
                return False
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.force_flush(timeout_millis)
        with self._lock:
            if self._file is not None and not self._file.closed:
                try:
                    self._file.close()
                except OSError:
                    pass


def _write_whole_line(file: IO[bytes], payload: bytes) -> None:
    """One write(2); a short write (disk full) is cut back so no half line stays behind.

    Appends land at the end of the file whatever the offset says (O_APPEND; after a failed
    write the offset can be stale), so the part written is the file's last `written` bytes
    (one writer per file: this exporter, under its lock). Asking the size only then keeps a
    syscall off every line."""
    written = file.write(payload)
    if written is not None and written < len(payload):
        os.ftruncate(file.fileno(), max(0, os.fstat(file.fileno()).st_size - written))
        raise OSError(errno.ENOSPC, f"short write: {written} of {len(payload)} bytes")


def create_for_run(context: RunContext) -> JsonLinesMetricExporter:
    """`exporters=("jsonl",)`: every rank writes its own file."""
    exporter = JsonLinesMetricExporter()
    exporter.bind_run_context(context)
    return exporter
