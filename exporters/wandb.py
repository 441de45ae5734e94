"""Weights & Biases: one history row per export on the run's global step, `final/*` to summary.

A real OTel `MetricExporter`. `wandb` is imported and `wandb.init` called on a helper thread
(never the training thread), bounded; a failing W&B is logged once and costs training nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from exporters._bounded_call import BoundedCall
from otel_train.catalog import STANDARD_INSTRUMENTS
from otel_train.errors import OtelTrainError
from otel_train.naming import KeyNamer
from otel_train.redaction import redact
from otel_train.rows import GLOBAL_STEP_INSTRUMENT, RowBuilder
from otel_train.run_context import RunContext
from otel_train.safe_files import replace_file

_logger = logging.getLogger("otel_train.wandb")

FINAL_PREFIX = "final/"
RUN_ID_FILE = "wandb_run_id"
# Summaries W&B keeps per key (define_metric): the best value, and the last one as well.
# W&B run summaries from the one instrument catalog: min for losses, max for throughput.
MIN_SUMMARY_INSTRUMENTS = tuple(s.name for s in STANDARD_INSTRUMENTS if s.summary == "min")
MAX_SUMMARY_INSTRUMENTS = tuple(s.name for s in STANDARD_INSTRUMENTS if s.summary == "max")


class WandbMetricExporter(MetricExporter):
    """Logs each exported batch as one W&B history row at the run's global step.

    Keyword arguments not given are left to wandb (and its `WANDB_*` environment variables).
    The run name defaults to the otel-train run, `job_type` and a tag to the stage. The exporter
    starts its own run (`reinit="create_new"`), never touching one the user started, unless
    `use_active_run=True`: then it logs into `wandb.run` and leaves finishing it to its owner.
    """

    def __init__(
        self,
        *,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: Sequence[str] | None = None,
        notes: str | None = None,
        mode: str | None = None,
        id: str | None = None,  # wandb.init's own name
        resume: str | bool | None = None,
        dir: str | os.PathLike[str] | None = None,  # wandb.init's own name
        config: Mapping[str, Any] | None = None,
        rank_zero_only: bool = True,
        use_active_run: bool = False,
        init_timeout_seconds: float = 60.0,
        finish_timeout_seconds: float = 30.0,
        namer: KeyNamer | None = None,
    ) -> None:
        super().__init__()
        for label, value in (
            ("init_timeout_seconds", init_timeout_seconds),
            ("finish_timeout_seconds", finish_timeout_seconds),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise OtelTrainError(f"{label} must be a positive number of seconds, got {value!r}")
        self._options: dict[str, Any] = {
            "project": project,
            "entity": entity,
            "name": name,
            "group": group,
            "job_type": job_type,
            "notes": notes,
            "mode": mode,
            "id": id,
            "resume": resume,
            "dir": os.fspath(dir) if dir is not None else None,
        }
        self._tags = list(tags or ())
        self._config: dict[str, Any] = _as_config(config)
        self.rank_zero_only = rank_zero_only
        self.use_active_run = use_active_run
        self._owns_run = True
        self.init_timeout_seconds = float(init_timeout_seconds)
        self.finish_timeout_seconds = float(finish_timeout_seconds)
        self._rows = RowBuilder(namer)
        self._namer = namer or KeyNamer()
        self._context: RunContext | None = None
        self._active = True
        self._lock = threading.Lock()
        self._run: Any = None
        self._broken: str | None = None
        self._closed = False
        self._starting: BoundedCall | None = None
        self._last_step: int | None = None
        self._exports_without_step = 0
        self._warned_log_failure = False
        self._warned_backwards = False
        self.logged_rows = 0
        self.failures = 0
        self.dropped_backwards = 0

    # -- wiring ---------------------------------------------------------------------------
    def bind_run_context(self, context: RunContext) -> None:
        """Called by setup(): take the run's identity, config (redacted) and key namer, and
        begin starting W&B in the background, so its start overlaps the first steps."""
        self._adopt_context(context)
        if self._active:
            self._begin_start()

    def _adopt_context(self, context: RunContext) -> None:
        self._context = context
        self._namer = context.namer
        self._rows = RowBuilder(context.namer)
        self._active = context.is_main_rank or not self.rank_zero_only
        merged = _as_config(context.config)
        merged.update(self._config)
        self._config = merged

    @property
    def run(self) -> Any:
        """The wandb Run once started (None before the first export or after a failure)."""
        return self._run

    @property
    def failure_reason(self) -> str | None:
        return self._broken

    def init_options(self) -> dict[str, Any]:
        """The keyword arguments `wandb.init` gets (None values are left out)."""
        context = self._context
        options = {k: v for k, v in self._options.items() if v is not None}
        tags = list(self._tags)
        if context is not None:
            all_ranks = not self.rank_zero_only and context.world_size > 1
            default_name = f"{context.run}-rank{context.rank}" if all_ranks else context.run
            options.setdefault("name", default_name)
            options.setdefault("job_type", context.stage)
            if all_ranks:
                options.setdefault("group", context.run)  # W&B's way to show one job's ranks
            if context.stage not in tags:
                tags.append(context.stage)
            if context.resume and "id" not in options:
                previous = self._read_run_id()
                if previous:
                    options["id"] = previous
                    options.setdefault("resume", "allow")
        if tags:
            options["tags"] = tags
        if self._config:
            options["config"] = self._config
        return options

    # -- OTel exporter verbs --------------------------------------------------------------
    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if not self._active:
            return MetricExportResult.SUCCESS  # not this rank's job
        if self._broken is not None or self._closed:
            return MetricExportResult.FAILURE
        row = self._rows.build(metrics_data)
        with self._lock:
            run = self._run if self._run is not None else self._start()
            if run is None:
                return MetricExportResult.FAILURE
            try:
                self._log_row(run, row.step, row.values)
            except Exception as error:  # wandb must never take training down
                self.failures += 1
                if not self._warned_log_failure:
                    self._warned_log_failure = True
                    _logger.error(
                        "otel-train: wandb.log failed (%r); rows that fail are dropped and "
                        "counted, training and the other exporters continue",
                        error,
                    )
                return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True  # wandb.log hands rows to wandb's own process; finish() makes them durable

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """`run.finish()`, bounded: a hanging W&B cannot hold the process at exit."""
        budget = min(self.finish_timeout_seconds, max(timeout_millis / 1000, 0.05))
        self._closed = True  # later exports fail fast, even while an init still hangs
        if not self._lock.acquire(timeout=budget):
            _logger.error("otel-train: W&B is still starting at shutdown; not waiting for it")
            return
        try:
            run, self._run = self._run, None
            starting = self._starting
            if run is None and starting is not None and self._broken is None:
                # Started at setup but nothing exported yet: finish that run too. If it is still
                # starting, it is finished whenever it comes up (if_late).
                waited = time.monotonic() - starting.started
                try:
                    run = starting.result(waited + budget / 2)
                except Exception as error:
                    _logger.debug("otel-train: W&B run never came up before shutdown: %r", error)
        finally:
            self._lock.release()
        if run is None or not self._owns_run:
            return
        try:
            BoundedCall(run.finish, "finish").result(budget)
        except Exception as error:
            _logger.error("otel-train: wandb finish failed or timed out (%r)", error)

    # -- internals ------------------------------------------------------------------------
    def _begin_start(self) -> None:
        """Start W&B on a helper thread now (setup() calls this), so its ~1 s start-up (import,
        the wandb-core process) overlaps the first steps instead of waiting for the first
        export; the export thread then waits for it, bounded, and training never does."""
        with self._lock:
            if self._starting is None:
                self._starting = BoundedCall(self._open_run, "init", if_late=self._finish_late)

    def _open_run(self) -> Any:
        import wandb

        if self.use_active_run and wandb.run is not None:
            run = wandb.run
            self._owns_run = False
            if self._config:
                run.config.update(self._config, allow_val_change=True)
        else:
            options = self.init_options()
            options["settings"] = wandb.Settings(
                init_timeout=self.init_timeout_seconds, reinit="create_new"
            )
            run = wandb.init(**options)
        self._define_metrics(run)
        return run

    def _finish_late(self, run: Any) -> None:
        if self._owns_run:
            run.finish()

    def _start(self) -> Any:
        """On the export thread: wait (bounded) for the run the helper thread is opening."""
        if self._starting is None:
            self._starting = BoundedCall(self._open_run, "init", if_late=self._finish_late)
        # A little more than W&B's own timeout: ours only matters if init hangs anyway.
        bound = self.init_timeout_seconds + min(5.0, max(1.0, self.init_timeout_seconds))
        try:
            run = self._starting.result(bound)
        except Exception as error:
            self._broken = repr(error)
            hint = (
                'install it with pip install "otel-train[wandb]"'
                if isinstance(error, ImportError)
                else "check `wandb login` / WANDB_API_KEY, the network, or set WANDB_MODE=offline"
            )
            _logger.error(
                "otel-train: W&B could not start (%s); W&B logging is off for this run (%s). "
                "Training and the other exporters continue.",
                self._broken,
                hint,
            )
            return None
        self._run = run
        self._write_run_id(run)
        return run

    def _define_metrics(self, run: Any) -> None:
        step_key = self._namer.key(GLOBAL_STEP_INSTRUMENT)
        run.define_metric(step_key)
        run.define_metric("*", step_metric=step_key)  # one x-axis for every group
        for names, summary in (
            (MIN_SUMMARY_INSTRUMENTS, "min,last"),
            (MAX_SUMMARY_INSTRUMENTS, "max,last"),
        ):
            for instrument in names:
                for spec in self._namer.keys_for(instrument):
                    run.define_metric(spec.key, step_metric=step_key, summary=summary)

    def _log_row(self, run: Any, step: int | None, values: Mapping[str, float]) -> None:
        summary = {k: v for k, v in values.items() if k.startswith(FINAL_PREFIX)}
        history = {k: v for k, v in values.items() if not k.startswith(FINAL_PREFIX)}
        if summary:
            run.summary.update(summary)
        if step is None:
            # Behind a plain OTel reader there is no global step: number the exports instead.
            self._exports_without_step += 1
            step = max(self._last_step or 0, self._exports_without_step)
            history[self._namer.key(GLOBAL_STEP_INSTRUMENT)] = float(step)
        if self._last_step is not None and step < self._last_step:
            # W&B would drop it with a warning per row; count it and say so once.
            self.dropped_backwards += 1
            if not self._warned_backwards:
                self._warned_backwards = True
                _logger.warning(
                    "otel-train: W&B row at step %d is behind step %d already logged; W&B keeps "
                    "one monotonic axis, so rows behind it are dropped (counted)",
                    step,
                    self._last_step,
                )
            return
        step_key = self._namer.key(GLOBAL_STEP_INSTRUMENT)
        if summary and set(history) <= {step_key}:
            return  # a summary-only export (final/*) adds no history row
        run.log(history, step=step)
        self._last_step = step
        self.logged_rows += 1

    def _run_id_path(self) -> Path | None:
        return self._context.run_dir / RUN_ID_FILE if self._context is not None else None

    def _read_run_id(self) -> str | None:
        path = self._run_id_path()
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError:
            return None

    def _write_run_id(self, run: Any) -> None:
        """Remember the W&B run id, so a resumed run (`resume=True`) continues the same run."""
        path = self._run_id_path()
        run_id = getattr(run, "id", None)
        if path is None or not isinstance(run_id, str):
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, (run_id + "\n").encode())  # never through a planted link
        except OSError as error:
            _logger.warning("otel-train: cannot remember the W&B run id in %s (%s)", path, error)


def _as_config(config: Any) -> dict[str, Any]:
    """wandb.config takes a mapping; anything else (a list, a string) is kept under "config"."""
    if not config:
        return {}
    redacted = redact(config)
    return dict(redacted) if isinstance(redacted, Mapping) else {"config": redacted}


def _all_ranks_from_env() -> bool:
    raw = os.environ.get("OTEL_TRAIN_WANDB_ALL_RANKS", "").strip().lower()
    return raw in ("1", "true", "yes", "on")


def create_for_run(context: RunContext) -> WandbMetricExporter | None:
    """`exporters=("wandb",)`: rank 0 only unless OTEL_TRAIN_WANDB_ALL_RANKS=1.

    wandb itself is imported later, on the export thread (it takes ~1 s); a missing package is
    reported here, at setup, so the warning comes before training starts.
    """
    all_ranks = _all_ranks_from_env()
    if not all_ranks and not context.is_main_rank:
        return None
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:  # sys.modules["wandb"] is None: imports of it are blocked
        found = False
    if not found:
        raise ImportError("No module named 'wandb'")
    exporter = WandbMetricExporter(rank_zero_only=not all_ranks)
    exporter.bind_run_context(context)
    return exporter
