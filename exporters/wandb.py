"""Weights & Biases: one history row per export on the run's global step, `final/*` to summary.

A real OTel `MetricExporter`. `wandb` is imported and `wandb.init` called on a helper thread
(never the training thread), bounded; a failing W&B is logged once and costs training nothing,
and a W&B that cannot finish does not hold the process at exit either.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from exporters._wandb_lifecycle import WandbRunLifecycle
from exporters._wandb_run import (
    StepAxis,
    StepAxisLog,
    WandbRunSpec,
    as_config,
    default_name,
    define_step_metrics,
    identity_file,
    identity_from_run,
    open_run,
    project_from_env,
    read_run_id,
    write_identity,
    write_text_atomically,
)
from otel_train.errors import OtelTrainError
from otel_train.naming import KeyNamer
from otel_train.rows import RowBuilder, SharedRowConsumer, shared_row
from otel_train.run_context import RunContext

_logger = logging.getLogger("otel_train.wandb")

RUN_ID_FILE = "wandb_run_id"


class WandbMetricExporter(SharedRowConsumer, MetricExporter):
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
        _check_seconds("init_timeout_seconds", init_timeout_seconds)
        _check_seconds("finish_timeout_seconds", finish_timeout_seconds)
        self._spec = WandbRunSpec(
            project=project,
            entity=entity,
            name=name,
            group=group,
            job_type=job_type,
            tags=tuple(tags or ()),
            notes=notes,
            config=as_config(config),
            mode=mode,
            id=id,
            resume=resume,
            dir=os.fspath(dir) if dir is not None else None,
        )
        self.rank_zero_only = rank_zero_only
        self.use_active_run = use_active_run
        self.init_timeout_seconds = float(init_timeout_seconds)
        self.finish_timeout_seconds = float(finish_timeout_seconds)
        self._rows = RowBuilder(namer)
        self._namer = namer or KeyNamer()
        self._axis = StepAxisLog(StepAxis.from_namer(self._namer))
        self._context: RunContext | None = None
        self._active = True
        self._life = WandbRunLifecycle(
            open_run=self._open_run,
            on_started=self._remember_run_id,
            mode=lambda: self._spec.mode,
            init_timeout_seconds=self.init_timeout_seconds,
            finish_timeout_seconds=self.finish_timeout_seconds,
        )
        self._warned_log_failure = False
        self.failures = 0

    # -- wiring ---------------------------------------------------------------------------
    def bind_run_context(self, context: RunContext) -> None:
        """Called by setup(): take the run's identity, config (redacted) and key namer, keep
        that identity next to the JSON lines (for `otel-train sync`), and begin starting W&B in
        the background, so its start overlaps the first steps."""
        self._adopt_context(context)
        if self._active:
            spec = self.run_spec()
            project, entity = project_from_env(spec.project, spec.entity)
            self._remember_identity(replace(spec, project=project, entity=entity).identity())
            self._begin_start()

    def _adopt_context(self, context: RunContext) -> None:
        self._context = context
        self._namer = context.namer
        self._rows = RowBuilder(context.namer)
        self._axis = StepAxisLog(StepAxis.from_namer(context.namer))
        self._active = context.is_main_rank or not self.rank_zero_only
        merged = as_config(context.config)
        merged.update(self._spec.config)
        self._spec = replace(self._spec, config=merged)

    @property
    def run(self) -> Any:
        """The wandb Run once started (None before the first export or after a failure)."""
        return self._life.run

    @property
    def failure_reason(self) -> str | None:
        return self._life.broken

    @property
    def logged_rows(self) -> int:
        return self._axis.logged_rows

    @property
    def dropped_backwards(self) -> int:
        return self._axis.dropped_backwards

    def run_spec(self) -> WandbRunSpec:
        """The run this exporter opens: its options, then the run's defaults (name, stage)."""
        spec = self._spec
        context = self._context
        if context is None:
            return spec
        all_ranks = not self.rank_zero_only and context.world_size > 1
        changes: dict[str, Any] = {
            "name": spec.name or default_name(context.run, context.rank, all_ranks=all_ranks),
            "job_type": spec.job_type or context.stage,
        }
        if all_ranks and spec.group is None:
            changes["group"] = context.run  # W&B's way to show one job's ranks
        if context.stage not in spec.tags:
            changes["tags"] = (*spec.tags, context.stage)
        if context.resume and spec.id is None:
            previous = read_run_id(context.run_dir / RUN_ID_FILE)
            if previous:
                changes["id"] = previous
                changes["resume"] = spec.resume if spec.resume is not None else "allow"
        return replace(spec, **changes)

    def init_options(self) -> dict[str, Any]:
        """The keyword arguments `wandb.init` gets (None values are left out)."""
        return self.run_spec().init_options()

    # -- OTel exporter verbs --------------------------------------------------------------
    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if not self._active:
            return MetricExportResult.SUCCESS  # not this rank's job
        life = self._life
        if life.broken is not None or life.closed:
            return MetricExportResult.FAILURE
        row = shared_row(metrics_data, self._rows)
        with life.lock:
            run = life.current_or_start()
            if run is None:
                return MetricExportResult.FAILURE
            try:
                self._axis.log(run, row.step, row.values, row.time)
            except Exception as error:  # wandb must never take training down
                self._count_log_failure(error)
                return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True  # wandb.log hands rows to wandb's own process; finish() makes them durable

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """`run.finish()`, bounded: a hanging W&B cannot hold the process, at shutdown or at
        exit (see `exporters._wandb_exit`)."""
        self._life.shutdown(timeout_millis)

    # -- internals ------------------------------------------------------------------------
    def _count_log_failure(self, error: Exception) -> None:
        self.failures += 1
        if not self._warned_log_failure:
            self._warned_log_failure = True
            _logger.error(
                "otel-train: wandb.log failed (%r); rows that fail are dropped and "
                "counted, training and the other exporters continue",
                error,
            )

    def _exit_grace(self) -> float | None:
        """At interpreter exit: how long wandb's teardown may take for our run (None: none)."""
        return self._life.exit_grace()

    def _begin_start(self) -> None:
        self._life.begin()

    def _open_run(self) -> Any:
        """On the helper thread (wandb's service already started): the user's active run when
        asked for and present, else a new run of ours."""
        import wandb

        if self.use_active_run and wandb.run is not None:
            run = wandb.run
            self._life.owns_run = False
            if self._spec.config:
                run.config.update(dict(self._spec.config), allow_val_change=True)
            define_step_metrics(run, StepAxis.from_namer(self._namer))
        else:
            run = open_run(
                self.run_spec(),
                StepAxis.from_namer(self._namer),
                init_timeout_seconds=self.init_timeout_seconds,
            )
        self._remember_identity(identity_from_run(run, self.run_spec()))
        return run

    def _remember_run_id(self, run: Any) -> None:
        """Kept so that a resumed run (`resume=True`) continues the same W&B run."""
        run_id = getattr(run, "id", None)
        if self._context is not None and isinstance(run_id, str):
            write_text_atomically(self._context.run_dir / RUN_ID_FILE, run_id + "\n")

    def _remember_identity(self, identity: Mapping[str, Any]) -> None:
        """Kept next to the JSON lines: what `otel-train sync` needs to replay this very run."""
        if self._context is not None:
            axis = StepAxis.from_namer(self._namer).to_json()
            path = identity_file(self._context.run_dir, self._context.rank)
            write_identity(path, {**identity, "axis": axis})


def _check_seconds(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise OtelTrainError(f"{label} must be a positive number of seconds, got {value!r}")


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
