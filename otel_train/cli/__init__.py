"""`otel-train demo | report | compare | sync`: the command line (needs the `cli` extra)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from otel_train.errors import OtelTrainError


def build_parser() -> argparse.ArgumentParser:
    from otel_train.cli import compare, demo, report, sync

    parser = argparse.ArgumentParser(
        prog="otel-train", description="Training metrics through OpenTelemetry: try it, read runs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, report, compare, sync):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The commands print what the reader skipped themselves (record.warnings), once.
    logging.getLogger("otel_train.runs").setLevel(logging.ERROR)
    try:
        code: int = args.run_command(args)
    except ImportError as error:
        print(f"otel-train: {error}", file=sys.stderr)
        return 3
    except OtelTrainError as error:
        print(f"otel-train: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
