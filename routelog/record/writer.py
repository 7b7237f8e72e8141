"""Recorded steps -> Parquet files, on a background thread with a bounded queue.

The file is exactly the per-token layout :mod:`routelog.ingest.table` reads ("per-token rows
with selected ids"): ``step``, ``layer``, ``token``, ``rank``, ``logits`` or ``probs`` (E
floats), ``topk_ids`` (the k experts the model selected) and, when the padding is known,
``mask`` (false: a padding token, excluded and counted by ingest). The file's key-value
metadata ``routelog`` (JSON) says what the payload holds, the score function, k and E per
layer and which router class each layer came from. It is written under a hidden temporary
name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from routelog.errors import RecordError

METADATA_KEY = b"routelog"
FORMAT_VERSION = 1
OnFull = Literal["block", "drop"]
_DICTIONARY_COLUMNS = ["step", "layer", "rank"]
"""The columns worth a Parquet dictionary (a few distinct values). Router outputs and token
positions are nearly all distinct: a dictionary for them was two thirds of the writer's CPU
time and made the file larger (on 4 layers x 4,096 tokens x E=8: 13 ms and 790 kB, against
4.4 ms and 516 kB without)."""


@dataclass
class LayerRecord:
    """One layer's recorded tokens of one step (numpy, already on the CPU)."""

    layer: int
    values: np.ndarray  # [T, E] float32
    ids: np.ndarray  # [T, k] int32
    tokens: np.ndarray  # [T] int64
    mask: np.ndarray | None  # [T] bool, True = a real token


@dataclass
class StepRecord:
    """Everything recorded for one step on this rank."""

    step: int
    rank: int
    world_size: int
    layers: list[LayerRecord]
    meta: dict[str, Any] = field(default_factory=dict)


def file_name(step: int, rank: int, world_size: int) -> str:
    """``step_000200.parquet``, or ``step_000200.rank3.parquet`` under torch.distributed."""
    suffix = f".rank{rank}" if world_size > 1 else ""
    return f"step_{step:06d}{suffix}.parquet"


def write_step(directory: Path, record: StepRecord, holds: str) -> Path:
    """Write one step's file (temporary name, then an atomic rename); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [_layer_table(record, layer, holds) for layer in record.layers]
    if not tables:
        raise RecordError(f"step {record.step}: nothing recorded")
    table = pa.concat_tables(tables)
    meta = {**record.meta, "format": FORMAT_VERSION, "payload": holds}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    target = directory / file_name(record.step, record.rank, record.world_size)
    temporary = directory / f".{target.name}.{os.getpid()}.tmp"
    pq.write_table(table, temporary, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS)
    temporary.replace(target)
    return target


def _layer_table(record: StepRecord, layer: LayerRecord, holds: str) -> Any:
    import pyarrow as pa

    n, width = layer.values.shape
    k = layer.ids.shape[1]
    columns: dict[str, Any] = {
        "step": pa.array(np.full(n, record.step, dtype=np.int64)),
        "layer": pa.array(np.full(n, layer.layer, dtype=np.int32)),
        "token": pa.array(layer.tokens),
        "rank": pa.array(np.full(n, record.rank, dtype=np.int32)),
        holds: _lists(layer.values.astype(np.float32, copy=False).ravel(), n, width),
        "topk_ids": _lists(layer.ids.astype(np.int32, copy=False).ravel(), n, k),
    }
    if layer.mask is not None:
        columns["mask"] = pa.array(layer.mask)
    return pa.table(columns)


def _lists(flat: np.ndarray, n: int, width: int) -> Any:
    """``n`` lists of ``width`` values from one flat array, without a Python loop."""
    import pyarrow as pa

    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int64))
    return pa.LargeListArray.from_arrays(offsets, pa.array(flat)).cast(
        pa.list_(pa.from_numpy_dtype(flat.dtype))
    )


class Writer:
    """A background thread writing queued steps; ``on_full`` says what a full queue does.

    ``block`` (default) makes the training loop wait for the disk; ``drop`` drops the step and
    counts it in ``dropped``. An error on the thread is raised by the next ``submit``/``close``.
    """

    def __init__(self, directory: Path, holds: str, *, size: int = 4, on_full: OnFull = "block"):
        if on_full not in ("block", "drop"):
            raise RecordError(f"on_full must be 'block' or 'drop', not {on_full!r}")
        if size < 1:
            raise RecordError(f"queue_size must be at least 1, not {size}")
        self.directory = directory
        self.holds = holds
        self.on_full = on_full
        self.dropped = 0
        self.written: list[Path] = []
        self._queue: queue.Queue[StepRecord | None] = queue.Queue(maxsize=size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="routelog-record", daemon=True)
        self._thread.start()

    def submit(self, record: StepRecord) -> None:
        self._raise()
        if self.on_full == "block":
            self._queue.put(record)
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RecordError(f"writing to {self.directory} failed: {error}") from error

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            if self._error is not None:
                continue  # keep draining so that a blocked submit returns
            try:
                self.written.append(write_step(self.directory, record, self.holds))
            except BaseException as exc:  # raised in the training thread by _raise
                self._error = exc
