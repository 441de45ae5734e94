"""Read the history rows back from a wandb offline `.wandb` file (wandb ships no reader now).

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records (7-byte
header: crc32, uint16 length, uint8 type FULL/FIRST/MIDDLE/LAST); each assembled payload is a
`wandb.proto.wandb_internal_pb2.Record`. Checksums are not verified here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = 7
_RECORD = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(raw: bytes) -> Iterator[bytes]:
    if raw[:4] != b":W&B":
        raise ValueError("not a .wandb file")
    offset, pending = _HEADER, bytearray()
    while offset + _RECORD.size <= len(raw):
        left = _BLOCK - offset % _BLOCK
        if left < _RECORD.size:
            offset += left
            continue
        _, length, kind = _RECORD.unpack_from(raw, offset)
        if length == 0 and kind == 0:
            offset += left
            continue
        data = raw[offset + _RECORD.size : offset + _RECORD.size + length]
        offset += _RECORD.size + length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            pending = bytearray(data)
        else:
            pending += data
            if kind == _LAST:
                yield bytes(pending)


def read_records(path: Path) -> list[tuple[str, Any]]:
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(payload)
        records.append((str(record.WhichOneof("record_type")), record))
    return records


def read_history(path: Path) -> dict[int, dict[str, Any]]:
    """W&B step -> {key: value} of every history row (`_step`, `_runtime`... left out)."""
    history: dict[int, dict[str, Any]] = {}
    for kind, record in read_records(path):
        if kind != "history":
            continue
        row = history.setdefault(record.history.step.num, {})
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                row[key] = json.loads(item.value_json)
    return history
