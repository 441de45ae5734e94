"""`otel-train sync RUN_DIR --to wandb`: replay a JSON-lines run into W&B.

The replay is the live run: the JSON-lines keys and steps are the W&B keys and steps, and the
run is opened, its metrics defined and its rows logged by the live exporter's own code
(`exporters._wandb_run`), with the identity the exporter kept next to the JSON lines (project,
entity, name, group, job type, tags, redacted config, step axis). Each row keeps its original
time (`_timestamp`); non-finite values go back as NaN / inf.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otel_train.errors import OtelTrainError
from otel_train.exporter_loading import _import_ours
from otel_train.naming import KeyNamer
from otel_train.runs import RunRecord, read_run, require_rows

if TYPE_CHECKING:
    from exporters._wandb_run import StepAxis, WandbRunSpec

INIT_TIMEOUT_SECONDS = 60.0


class SyncError(OtelTrainError):
    """The replay could not start (not logged in, no network) or had nothing to send."""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("sync", help="replay a JSON-lines run into W&B")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--to", choices=("wandb",), required=True, help="destination")
    parser.add_argument(
        "--project", default=None, help="W&B project (default: the live run's, else wandb's)"
    )
    parser.add_argument("--entity", default=None, help="default: the live run's, else wandb's")
    parser.add_argument("--name", default=None, help="W&B run name (default: the live run's)")
    parser.add_argument(
        "--mode", choices=("online", "offline"), default=None, help="default: WANDB_MODE"
    )
    parser.add_argument("--dir", type=Path, default=None, help="W&B files (default: RUN_DIR)")
    parser.add_argument(
        "--rank", type=int, default=None, help="which rank's file (default rank0.jsonl)"
    )
    parser.set_defaults(run_command=run)


def replay_spec(record: RunRecord, **overrides: Any) -> tuple[WandbRunSpec, StepAxis]:
    """The run to open and its step axis: what the live exporter recorded for this rank, else
    the live exporter's defaults for this run; then the command line's `overrides`."""
    shared = _import_ours("exporters._wandb_run")  # checks `exporters` is otel-train's
    all_ranks = record.rank != 0  # a rank > 0 reaches W&B only when every rank logs
    stage = record.stage or None
    spec: WandbRunSpec = shared.WandbRunSpec(
        name=shared.default_name(record.name, record.rank, all_ranks=all_ranks),
        group=record.name if all_ranks else None,
        job_type=stage,
        tags=(stage,) if stage else (),
    )
    axis: StepAxis = shared.StepAxis.from_namer(KeyNamer())
    identity = shared.read_identity(shared.identity_file(record.path.parent, record.rank))
    if identity is not None:
        spec = spec.with_identity(identity)
        axis = shared.StepAxis.from_json(identity.get("axis"), axis)
    if spec.notes is None:
        spec = replace(spec, notes=f"replayed by otel-train sync from {record.path}")
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None}), axis


def replay_to_wandb(record: RunRecord, **overrides: Any) -> Any:
    """Log every row at its step; rows sharing a step (train + eval events) share a W&B row."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError(f'{error}; sync needs: pip install "otel-train[wandb]"') from error
    shared = _import_ours("exporters._wandb_run")
    require_rows(record)
    spec, axis = replay_spec(record, **overrides)
    try:
        run = shared.open_run(spec, axis, init_timeout_seconds=INIT_TIMEOUT_SECONDS)
    except (wandb.Error, TimeoutError, OSError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise SyncError(
            f"W&B could not start ({reason}). Log in with `wandb login` (or set WANDB_API_KEY), "
            "or replay into local files with --mode offline (or WANDB_MODE=offline) and upload "
            "them later with `wandb sync`"
        ) from None
    log = shared.StepAxisLog(axis)
    try:
        for row in record.rows:
            log.log(run, row.step, row.metrics, row.time)
    finally:
        run.finish()
    return run


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    record = require_rows(read_run(args.run_dir, rank=args.rank))
    if args.rank is not None and record.rank != args.rank:
        raise SyncError(
            f"{record.path} holds rank {record.rank}, not rank {args.rank}; pass "
            f"--rank {record.rank} or that rank's rank{args.rank}.jsonl"
        )
    directory = args.dir or record.path.parent
    directory.mkdir(parents=True, exist_ok=True)
    wandb_run = replay_to_wandb(
        record,
        project=args.project,
        entity=args.entity,
        name=args.name,
        mode=args.mode,
        dir=str(directory),
    )
    steps = len({row.step for row in record.rows})
    console.print(
        f"synced {len(record.rows)} rows ({steps} steps) of {record.path} to W&B run "
        f"{wandb_run.id} ({wandb_run.dir})"
    )
    for warning in record.warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    return 0
