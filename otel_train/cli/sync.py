"""`otel-train sync RUN_DIR --to wandb`: replay a JSON-lines run into W&B.

The JSON-lines keys are the W&B keys and the JSON-lines step is the W&B step, so a run whose
W&B was down or offline ends up exactly as if it had logged live. Non-finite values go back
as NaN / inf (W&B accepts them).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from otel_train.errors import OtelTrainError
from otel_train.runs import RunRecord, read_run


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("sync", help="replay a JSON-lines run into W&B")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--to", choices=("wandb",), required=True, help="destination")
    parser.add_argument("--project", default=None, help="W&B project (default otel-train)")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--name", default=None, help="W&B run name (default: the run's name)")
    parser.add_argument(
        "--mode", choices=("online", "offline"), default=None, help="default: WANDB_MODE"
    )
    parser.add_argument("--dir", type=Path, default=None, help="W&B files (default: RUN_DIR)")
    parser.add_argument("--rank", type=int, default=0, help="which rank's file (default 0)")
    parser.set_defaults(run_command=run)


def replay_to_wandb(record: RunRecord, **init_options: Any) -> Any:
    """Log every row at its step; rows sharing a step (train + eval events) share a W&B row."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError(f'{error}; sync needs: pip install "otel-train[wandb]"') from error
    if not record.rows:
        raise OtelTrainError(f"{record.path}: no rows to sync")
    run = wandb.init(**init_options)
    try:
        for row in record.rows:
            run.log(dict(row.metrics), step=row.step)
    finally:
        run.finish()
    return run


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    record = read_run(args.run_dir, rank=args.rank)
    directory = args.dir or record.path.parent
    directory.mkdir(parents=True, exist_ok=True)
    wandb_run = replay_to_wandb(
        record,
        project=args.project or os.environ.get("WANDB_PROJECT") or "otel-train",
        entity=args.entity,
        name=args.name or record.name,
        job_type=record.stage or None,
        mode=args.mode or os.environ.get("WANDB_MODE") or None,
        dir=str(directory),
        config={"otel_train_synced_from": str(record.path)},
    )
    steps = len({row.step for row in record.rows})
    console.print(
        f"synced {len(record.rows)} rows ({steps} steps) of {record.path} to W&B run "
        f"{wandb_run.id} ({wandb_run.dir})"
    )
    for warning in record.warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    return 0
