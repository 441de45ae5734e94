"""Writing into a run folder without writing through links someone planted there.

A run folder is often shared (a team's NFS, a copied archive). A symlink at `summary.json` or
`rank0.jsonl` pointing elsewhere must not make otel-train overwrite its target: whole files
are replaced atomically (temp file + `os.replace`, which replaces the link itself), appended
files are opened with `O_NOFOLLOW` and must be regular files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class LinkRefusedError(OSError):
    """The path is a symbolic link or not a regular file: otel-train does not write there."""


def replace_file(path: Path, data: bytes) -> Path:
    """Write `data` to `path` in one step: readers see the old file or the new one, and a link
    at `path` is replaced by the file, its target left untouched."""
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; these are reports meant to be shared
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def open_for_append(path: Path) -> IO[bytes]:
    """An unbuffered append handle on a regular file at `path` (created when missing).

    Raises `LinkRefusedError` for a symlink (`O_NOFOLLOW`), a FIFO or a device: opening a
    FIFO for writing would block until a reader comes (`O_NONBLOCK` makes it fail instead)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _NONBLOCK
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK) or path.is_symlink():
            raise LinkRefusedError(error.errno, "is a symbolic link", str(path)) from error
        if error.errno == errno.ENXIO:  # a FIFO with no reader
            raise LinkRefusedError(error.errno, "is not a regular file", str(path)) from error
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise LinkRefusedError(errno.EINVAL, "is not a regular file", str(path))
    if _NONBLOCK:
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "ab", buffering=0)
