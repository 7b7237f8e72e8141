"""Read the records of a W&B offline run file (``run-ID.wandb``) without wandb's own code.

The file is W&B's header (``:W&B``, a 2-byte magic, a version byte) followed by a LevelDB
log: 32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1) | data``, a
protobuf ``wandb.proto.wandb_internal_pb2.Record`` split over FULL / FIRST, MIDDLE..., LAST
chunks. Only what the export tests need: every history row as ``{key: value}``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    out: list[bytes] = []
    pending = b""
    pos = HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer: skip to the next block
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """Every ``run.log`` row of the file, values decoded from JSON."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    "/".join(item.nested_key) if item.nested_key else item.key: json.loads(
                        item.value_json
                    )
                    for item in record.history.item
                }
            )
    return rows


def summary(path: Path) -> dict[str, Any]:
    """The run summary as last updated in the file."""
    from wandb.proto import wandb_internal_pb2

    values: dict[str, Any] = {}
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                values[key] = json.loads(item.value_json)
    return values
