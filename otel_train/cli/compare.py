"""`otel-train compare RUN_DIR RUN_DIR...`: runs side by side, table and one overlaid plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from otel_train.cli.summary import SUMMARY, format_value, summarize
from otel_train.errors import OtelTrainError
from otel_train.runs import read_run, require_rows


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("compare", help="several runs side by side (table + plot)")
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="PNG path (default: compare.png in the first run's parent folder)",
    )
    parser.add_argument(
        "--rank", type=int, default=None, help="which rank's file (default rank0.jsonl)"
    )
    parser.set_defaults(run_command=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from otel_train.cli.plots import axis_label, plot_comparison

    console = Console()
    if len(args.run_dirs) < 2:
        console.print("[yellow]compare needs two runs or more; see `otel-train report` for one")
        return 2
    # Every run is read and checked before anything is drawn or written.
    records = [require_rows(read_run(path, rank=args.rank)) for path in args.run_dirs]
    axis_label(records)
    table = Table(title="Runs compared")
    table.add_column("metric")
    for record in records:
        table.add_column(escape(record.name), justify="right")
    summaries = [summarize(record) for record in records]
    for line in SUMMARY:
        table.add_row(line.label, *(format_value(line, s[line.key]) for s in summaries))
    console.print(table)
    for record in records:
        for warning in record.warnings:
            console.print(f"[yellow]warning[/]: {escape(warning)}")
    output = args.output or records[0].path.parent.parent / "compare.png"
    try:
        written = plot_comparison(records, output)
    except OSError as error:
        raise OtelTrainError(f"cannot write {output}: {error}; pass --output PATH") from error
    console.print(escape(f"wrote {written}"))
    return 0
