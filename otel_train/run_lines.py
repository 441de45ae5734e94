"""Reading a run file line by line with a cap on line length, and tallying what was skipped
so a file of 200k bad lines gives one warning, not 200k."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# A real row is a few KiB (hundreds of KiB with thousands of attribute sets); a line beyond
# this is not one, and parsing it would cost seconds and gigabytes.
MAX_LINE_BYTES = 8 * 1024 * 1024


def bounded_lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) pairs; None for a line over MAX_LINE_BYTES, read past unparsed."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE_BYTES + 2)
        if not line:
            return
        number += 1
        if len(line.rstrip(b"\r\n")) <= MAX_LINE_BYTES:
            yield number, line
            continue
        while not line.endswith(b"\n"):  # drain the rest of the long line in bounded chunks
            line = handle.readline(1 << 20)
            if not line:
                break
        yield number, None


class BadLines:
    """Collects skipped lines so a file with 200k bad lines gives one warning, not 200k."""

    def __init__(self, file: Path, logger: logging.Logger) -> None:
        self.file = file
        self._logger = logger
        self.messages: list[str] = []
        self._count = 0
        self._first = ""
        self._long = 0
        self._first_long = 0
        self._partial = False

    def add(self, number: int, error: BaseException, *, partial: bool) -> None:
        if partial:  # only the last line can lack its newline: a killed writer's half line
            self._partial = True
            return
        self._count += 1
        if not self._first:
            self._first = f"line {number}: {error.__class__.__name__}"

    def oversized(self, number: int) -> None:
        self._long += 1
        if self._long == 1:
            self._first_long = number

    def warn(self, message: str) -> None:
        text = f"{self.file}: {message}"
        self.messages.append(text)
        self._logger.warning("otel-train: %s", text)

    def finish(self) -> None:
        if self._count:
            self.warn(f"skipped {self._count} bad line(s), not rows (first: {self._first})")
        if self._long:
            self.warn(
                f"skipped {self._long} line(s) longer than {MAX_LINE_BYTES // (1024 * 1024)} "
                f"MiB (first: line {self._first_long}); no real row is that long"
            )
        if self._partial:
            self.warn("skipped partial last line (the writer was stopped mid-line)")
