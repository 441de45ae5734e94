"""`otel-train report RUN_DIR`: summary table, summary.json and PNG plots next to the run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from otel_train.cli.summary import SUMMARY, format_value, summarize
from otel_train.runs import read_run


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("report", help="summary table and PNG plots of one run")
    parser.add_argument("run_dir", type=Path, help="runs/<run> (or its rank<N>.jsonl)")
    parser.add_argument("--rank", type=int, default=0, help="which rank's file (default 0)")
    parser.add_argument("--no-plots", action="store_true", help="table and summary.json only")
    parser.set_defaults(run_command=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    record = read_run(args.run_dir, rank=args.rank)
    summary = summarize(record)
    table = Table(title=f"{record.name} ({record.stage}, rank {record.rank}): {record.path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for line in SUMMARY:
        table.add_row(line.label, format_value(line, summary[line.key]))
    console.print(table)
    directory = record.path.parent
    summary_path = directory / "summary.json"
    clean = {k: (v if v is None or math.isfinite(v) else None) for k, v in summary.items()}
    summary_path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    written = [summary_path]
    if not args.no_plots:
        from otel_train.cli.plots import plot_run

        written += plot_run(record, directory)
    for warning in record.warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    console.print("wrote " + ", ".join(str(p) for p in written))
    return 0 if record.rows else 1
