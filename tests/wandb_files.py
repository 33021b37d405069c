"""Read back an offline W&B run from its own files (the transaction log that `wandb sync` uploads)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32 * 1024  # the log is LevelDB's format: 32 KiB blocks of 7-byte-header chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # block padding
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def _flat(items: Any) -> dict[str, Any]:
    """Items carry a key, or a key path (joined with "/")."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def history(records: list[Any]) -> list[dict[str, Any]]:
    return [_flat(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]


def summary(records: list[Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            values.update(_flat(record.summary.update))
    return values


def media(row: dict[str, Any], name: str) -> dict[str, Any]:
    """A logged media object, whose fields the log stores flattened as ``<name>/<field>``."""
    return {key[len(name) + 1 :]: value for key, value in row.items() if key.startswith(name + "/")}
