"""The one place that opens a W&B run for otel-train, defines its step axis and logs rows into it.

Shared by the live exporter and `otel-train sync`, so a replayed run is the live run: the same
identity (kept next to the JSON lines in `rank<N>.wandb.json`), metrics, summaries and rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from otel_train.catalog import STANDARD_INSTRUMENTS
from otel_train.naming import KeyNamer
from otel_train.redaction import redact, redact_argv
from otel_train.rows import GLOBAL_STEP_INSTRUMENT
from otel_train.safe_files import replace_file

_logger = logging.getLogger("otel_train.wandb")

FINAL_PREFIX = "final/"
# Summaries W&B keeps per key (define_metric), from the one instrument catalog: the best value
# (min for losses, max for throughput), and the last one as well.
MIN_SUMMARY_INSTRUMENTS = tuple(s.name for s in STANDARD_INSTRUMENTS if s.summary == "min")
MAX_SUMMARY_INSTRUMENTS = tuple(s.name for s in STANDARD_INSTRUMENTS if s.summary == "max")
LOGIN_HINT = (
    "log in with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to write "
    "local files and upload them later with `wandb sync`"
)
_IDENTITY_FIELDS = ("project", "entity", "name", "group", "job_type", "tags", "notes", "config")


def identity_file(run_dir: Path, rank: int) -> Path:
    """Where the W&B identity of one rank's run is kept, next to its `rank<N>.jsonl`."""
    return run_dir / f"rank{rank}.wandb.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class WandbRunSpec:
    """What `wandb.init` gets. None is left to wandb and its `WANDB_*` variables."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: tuple[str, ...] = ()
    notes: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # redacted
    mode: str | None = None
    id: str | None = None
    resume: str | bool | None = None
    dir: str | None = None

    def init_options(self) -> dict[str, Any]:
        names = ("project", "entity", "name", "group", "job_type", "notes", "mode", "id", "resume")
        options = {name: getattr(self, name) for name in (*names, "dir")}
        options = {key: value for key, value in options.items() if value is not None}
        if self.tags:
            options["tags"] = list(self.tags)
        if self.config:
            options["config"] = dict(self.config)
        return options

    def identity(self) -> dict[str, Any]:
        """What a replay needs to be the same run (not where or how: mode, dir, id, resume)."""
        values = {name: getattr(self, name) for name in _IDENTITY_FIELDS}
        values["tags"] = list(self.tags)
        values["config"] = dict(self.config)
        return values

    def with_identity(self, identity: Mapping[str, Any]) -> WandbRunSpec:
        """This spec with the identity fields a replay file recorded (unknown fields ignored)."""
        changes: dict[str, Any] = {}
        for name in ("project", "entity", "name", "group", "job_type", "notes"):
            value = identity.get(name)
            if isinstance(value, str) and value:
                changes[name] = value
        tags = identity.get("tags")
        if isinstance(tags, list):
            changes["tags"] = tuple(str(tag) for tag in tags)
        config = identity.get("config")
        if isinstance(config, Mapping):
            changes["config"] = as_config(config)
        return replace(self, **changes)


def as_config(config: Any) -> dict[str, Any]:
    """wandb.config takes a mapping; anything else (a list, a string) is kept under "config"."""
    if not config:
        return {}
    redacted = redact(config)
    return dict(redacted) if isinstance(redacted, Mapping) else {"config": redacted}


def default_name(run: str, rank: int, *, all_ranks: bool) -> str:
    """The live exporter's run name: the run, or `<run>-rank<N>` when every rank logs."""
    return f"{run}-rank{rank}" if all_ranks else run


def project_from_env(project: str | None, entity: str | None) -> tuple[str | None, str | None]:
    """Where wandb will put the run when not told: WANDB_PROJECT / WANDB_ENTITY (else wandb's
    own defaults), resolved now so a replay lands in the same project."""
    env = os.environ
    return project or env.get("WANDB_PROJECT") or None, entity or env.get("WANDB_ENTITY") or None


def write_identity(path: Path, identity: Mapping[str, Any]) -> None:
    text = json.dumps(identity, indent=1, sort_keys=True, default=str)
    write_text_atomically(path, text + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` whole (a planted symlink is replaced, never followed); log a failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, text.encode("utf-8"))
    except OSError as error:
        _logger.warning("otel-train: cannot write %s (%s)", path, error)


def read_run_id(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def read_identity(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        _logger.warning("otel-train: ignoring unreadable %s (%s)", path, error)
        return None
    return loaded if isinstance(loaded, dict) else None


def open_run(spec: WandbRunSpec, axis: StepAxis, *, init_timeout_seconds: float) -> Any:
    """`wandb.init` with this spec (a new run, never the user's), then the step axis."""
    import wandb

    options = spec.init_options()
    settings: dict[str, Any] = {"init_timeout": init_timeout_seconds, "reinit": "create_new"}
    if redact_argv(sys.argv[1:]) != sys.argv[1:]:
        # wandb records the command line verbatim in the run's metadata; it has a secret.
        settings["x_disable_meta"] = True
        _logger.warning(
            "otel-train: the command line holds a secret (e.g. --api-key); W&B's system "
            "metadata, which records the command line, is off for this run"
        )
    options["settings"] = wandb.Settings(**settings)
    run = wandb.init(**options)
    define_step_metrics(run, axis)
    return run


@dataclass(frozen=True, slots=True)
class StepAxis:
    """The run's x-axis key and the keys W&B summarises by their best value. Kept as data in
    the identity file, so a replay defines the same metrics whatever key preset the run used."""

    step_key: str
    min_keys: tuple[str, ...] = ()
    max_keys: tuple[str, ...] = ()

    @classmethod
    def from_namer(cls, namer: KeyNamer) -> StepAxis:
        def keys(names: Sequence[str]) -> tuple[str, ...]:
            return tuple(spec.key for name in names for spec in namer.keys_for(name))

        return cls(
            step_key=namer.key(GLOBAL_STEP_INSTRUMENT),
            min_keys=keys(MIN_SUMMARY_INSTRUMENTS),
            max_keys=keys(MAX_SUMMARY_INSTRUMENTS),
        )

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step_key, "min": list(self.min_keys), "max": list(self.max_keys)}

    @classmethod
    def from_json(cls, value: Any, default: StepAxis) -> StepAxis:
        if not isinstance(value, Mapping) or not isinstance(value.get("step"), str):
            return default

        def keys(name: str) -> tuple[str, ...]:
            listed = value.get(name)
            return tuple(str(k) for k in listed) if isinstance(listed, list) else ()

        return cls(step_key=value["step"], min_keys=keys("min"), max_keys=keys("max"))


def define_step_metrics(run: Any, axis: StepAxis) -> None:
    """One x-axis (the global step) for every group; min/max summaries for the headline keys."""
    run.define_metric(axis.step_key)
    run.define_metric("*", step_metric=axis.step_key)
    for keys, summary in ((axis.min_keys, "min,last"), (axis.max_keys, "max,last")):
        for key in keys:
            run.define_metric(key, step_metric=axis.step_key, summary=summary)


class StepAxisLog:
    """Rows into a run on one monotonic step axis: `final/*` to the summary, the rest to history
    at `step=` with the row's own time as `_timestamp` (W&B keeps it; `_runtime` it does not)."""

    def __init__(self, axis: StepAxis) -> None:
        self._step_key = axis.step_key
        self._last_step: int | None = None
        self._exports_without_step = 0
        self._warned_backwards = False
        self.logged_rows = 0
        self.dropped_backwards = 0

    def log(
        self, run: Any, step: int | None, values: Mapping[str, float], time: float | None
    ) -> None:
        summary = {k: v for k, v in values.items() if k.startswith(FINAL_PREFIX)}
        history: dict[str, Any] = {
            k: v for k, v in values.items() if not k.startswith(FINAL_PREFIX)
        }
        if summary:
            run.summary.update(summary)
        if step is None:
            # Behind a plain OTel reader there is no global step: number the exports instead.
            self._exports_without_step += 1
            step = max(self._last_step or 0, self._exports_without_step)
            history[self._step_key] = float(step)
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
        if summary and set(history) <= {self._step_key}:
            return  # a summary-only export (final/*) adds no history row
        if time is not None and math.isfinite(time) and time > 0:
            history["_timestamp"] = time
        run.log(history, step=step)
        self._last_step = step
        self.logged_rows += 1


def identity_from_run(run: Any, spec: WandbRunSpec) -> dict[str, Any]:
    """The identity the started run really has (wandb resolved project / entity / name)."""
    identity = spec.identity()
    for name, attribute in (
        ("project", "project"),
        ("entity", "entity"),
        ("name", "name"),
        ("group", "group"),
        ("job_type", "job_type"),
        ("notes", "notes"),
    ):
        value = _safe_attribute(run, attribute)
        if isinstance(value, str) and value:
            identity[name] = value
    tags = _safe_attribute(run, "tags")
    if isinstance(tags, Sequence) and not isinstance(tags, str):
        identity["tags"] = [str(tag) for tag in tags]
    return identity


def _safe_attribute(run: Any, name: str) -> Any:
    try:
        return getattr(run, name, None)
    except Exception:  # a finished or half-started run may raise on attribute access
        return None
