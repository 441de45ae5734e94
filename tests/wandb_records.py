"""A small reader for wandb's `.wandb` run files (recent wandb ships none).

The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then
32 KiB blocks of records, each with a 7-byte header (crc32 of type+data, uint16 length, uint8
type: FULL, FIRST, MIDDLE, LAST) followed by its data; a block tail shorter than a header is
zero padding. Each assembled payload is one `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK_LEN = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0


class WandbFileError(ValueError):
    """The file is not a well-formed `.wandb` log."""


def _crc_ok(checksum: int, kind: int, data: bytes) -> bool:
    # wandb's Python writer used zlib's crc32 over the type byte and the data.
    return zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum


def iter_payloads(path: Path) -> Iterator[bytes]:
    raw = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(raw, 0)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise WandbFileError(f"{path}: bad header {(ident, magic, version)!r}")
    offset = HEADER.size
    pending: bytearray | None = None
    while offset + RECORD_HEADER.size <= len(raw):
        left_in_block = BLOCK_LEN - offset % BLOCK_LEN
        if left_in_block < RECORD_HEADER.size:
            offset += left_in_block  # trailer padding
            continue
        checksum, length, kind = RECORD_HEADER.unpack_from(raw, offset)
        if checksum == 0 and length == 0 and kind == 0:
            offset += left_in_block  # zero-filled rest of a block
            continue
        start = offset + RECORD_HEADER.size
        data = raw[start : start + length]
        if len(data) != length or length > left_in_block - RECORD_HEADER.size:
            raise WandbFileError(f"{path}: record at {offset} runs past its block")
        if not _crc_ok(checksum, kind, data):
            raise WandbFileError(f"{path}: checksum mismatch at {offset}")
        offset = start + length
        if kind == FULL:
            yield bytes(data)
        elif kind == FIRST:
            pending = bytearray(data)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise WandbFileError(f"{path}: continuation record without a FIRST at {offset}")
            pending += data
            if kind == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown record type {kind} at {offset}")


def iter_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(payload)
        yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class WandbRun:
    """What a `.wandb` file says about one run, decoded."""

    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    notes: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    history_steps: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[Any] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


def read_run(path: Path) -> WandbRun:
    run = WandbRun()
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        run.kinds.append(str(kind))
        if kind == "run":
            run.run_id = record.run.run_id
            run.project = record.run.project
            run.entity = record.run.entity
            run.name = record.run.display_name
            run.notes = record.run.notes
            run.group = record.run.run_group
            run.job_type = record.run.job_type
            run.tags = list(record.run.tags)
            for item in record.run.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            run.history.append(row)
            run.history_steps.append(record.history.step.num)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            run.metrics.append(record.metric)
    return run


def find_run_file(wandb_dir: Path) -> Path:
    files = sorted(wandb_dir.rglob("run-*.wandb"))
    files = [f for f in files if "latest-run" not in f.parts]
    if len(files) != 1:
        raise WandbFileError(f"expected one .wandb file under {wandb_dir}, found {files}")
    return files[0]


def read_finished_run(path: Path, *, timeout_seconds: float = 30.0) -> WandbRun:
    """`read_run` once wandb's writer process has written the run's `exit` record.

    `run.finish()` returns when wandb-core has the data; on a loaded machine the file's tail
    can land a moment later, so wait for the condition (with a deadline), not for a time.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            run = read_run(path)
            if "exit" in run.kinds:
                return run
            problem = f"{path}: no exit record yet (kinds so far: {sorted(set(run.kinds))})"
        except (WandbFileError, struct.error) as error:  # a tail still being written
            problem = str(error)
        if time.monotonic() > deadline:
            raise WandbFileError(f"run file never completed within {timeout_seconds} s: {problem}")
        time.sleep(0.05)
