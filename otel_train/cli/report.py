"""`otel-train report RUN_DIR`: summary table, summary.json and PNG plots next to the run.

Reading never destroys: a path that is not a run, an empty run or a missing rank is refused
with one line before anything is written, and every file is replaced atomically (a link
planted in the run folder is replaced, never written through).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from otel_train.cli.summary import SUMMARY, format_value, summarize
from otel_train.errors import OtelTrainError
from otel_train.runs import read_run, require_rows
from otel_train.safe_files import replace_file


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("report", help="summary table and PNG plots of one run")
    parser.add_argument("run_dir", type=Path, help="runs/<run> (or its rank<N>.jsonl)")
    parser.add_argument(
        "--rank", type=int, default=None, help="which rank's file (default rank0.jsonl)"
    )
    parser.add_argument("--no-plots", action="store_true", help="table and summary.json only")
    parser.set_defaults(run_command=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    record = require_rows(read_run(args.run_dir, rank=args.rank))
    if args.rank is not None and record.rank != args.rank:
        raise OtelTrainError(
            f"{record.path} holds rank {record.rank}, not rank {args.rank}; pass "
            f"--rank {record.rank} or that rank's rank{args.rank}.jsonl"
        )
    summary = summarize(record)
    title = f"{record.name} ({record.stage}, rank {record.rank}): {record.path}"
    table = Table(title=escape(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for line in SUMMARY:
        table.add_row(line.label, format_value(line, summary[line.key]))
    console.print(table)
    directory = record.path.parent
    clean = {k: (v if v is None or math.isfinite(v) else None) for k, v in summary.items()}
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    try:
        written = [replace_file(directory / "summary.json", text.encode())]
        if not args.no_plots:
            from otel_train.cli.plots import plot_run

            written += plot_run(record, directory)
    except OSError as error:
        raise OtelTrainError(
            f"cannot write the report into {directory}: {error}; copy the run somewhere "
            "writable and report it there"
        ) from error
    for warning in record.warnings:
        console.print(f"[yellow]warning[/]: {escape(warning)}")
    console.print(escape("wrote " + ", ".join(str(p) for p in written)))
    return 0
