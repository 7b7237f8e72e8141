"""Parquet input: read row batches with pyarrow (bounded memory) into the table layouts.

A file written by ``routelog.record`` states its score function in its key-value metadata
(``routelog``: ``{"score": "sigmoid", ...}``); its logits are read with that function.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo, table

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from routelog.options import Options

BATCH_ROWS = 1 << 16
"""Rows decoded at a time: bounds memory to about BATCH_ROWS x E x 4 bytes per batch."""
READ_BUFFER = 1 << 20
"""Bytes read from the file at a time. pyarrow's default (pre-buffering, decoding ahead on
its own threads) holds much more of a large file in memory; one column chunk of the current
row group at a time keeps peak memory independent of the file's size."""


def scan(path: Path, options: Options, info: FileInfo, *, source: Any = None) -> Iterator[Batch]:
    """Read a Parquet file batch by batch into canonical batches.

    ``source`` (optional) is an open random-access file to read instead of ``path`` (an
    object in a bucket: each column chunk is a ranged read); ``path`` still names it.
    """
    if source is None and not _utf8(path):
        # pyarrow takes file names as UTF-8 only: read an undecodable one through Python
        with Path(path).open("rb") as stream:
            yield from scan(path, options, info, source=stream)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # from object storage every request is a round trip: fetch each row group in a few
        # coalesced ranged requests (memory: one compressed row group) rather than 1 MB reads
        reader = pq.ParquetFile(
            path if source is None else source,
            pre_buffer=source is not None,
            buffer_size=READ_BUFFER,
        )
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a valid Parquet file ({_first_line(exc)})") from exc
    columns = reader.schema_arrow.names
    twice = sorted({name for name in columns if columns.count(name) > 1})
    if twice:
        raise InputError(f"{path}: column {twice[0]!r} appears more than once")
    options = _stated_score(reader.schema_arrow.metadata, path, options, info)
    empty = pl.from_arrow(reader.schema_arrow.empty_table())
    assert isinstance(empty, pl.DataFrame)
    layout = table.detect_layout(empty.schema, path)
    info.layout = layout.name
    info.payload = layout.payload_name
    offset = 0
    try:
        for record_batch in _record_batches(reader, path if source is None else None, columns):
            frame = pl.from_arrow(record_batch)
            assert isinstance(frame, pl.DataFrame)
            yield from table.batches(
                frame,
                layout,
                path,
                row_offset=offset,
                options=options,
                info=info,
                locate=lambda row: f"{path} row {row}",
            )
            offset += frame.height
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read row {offset} onwards ({_first_line(exc)})") from exc


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _record_batches(
    reader: pq.ParquetFile, path: Path | None, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    """The file's record batches in order, BATCH_ROWS rows at most each.

    Row groups are read in units (:func:`row_group_units`): a row group alone, or consecutive
    small ones together, so that a file written in many small row groups (a writer appending
    a few thousand tokens at a time) is reduced in batches of up to BATCH_ROWS rows, not one
    small batch per row group, each with its fixed cost. A local file of several units none
    larger than PARALLEL_ROW_GROUP_BYTES decoded is decoded DECODE_THREADS units at a time
    (each on its own thread, in its own reader: pyarrow decodes one column chunk on one
    thread, and a routing log is one big column), but for its first unit, which streams batch
    by batch (so the first batch is ready after a fraction of a row group's decoding);
    otherwise one batch at a time, as pyarrow streams it.
    Either way batches break at the same rows (no batch spans two units, and within a unit
    every BATCH_ROWS rows), so a file gives the same sums whichever path reads it (a bucket's
    or a disk's).
    """
    metadata = reader.metadata
    units = row_group_units([metadata.row_group(i) for i in range(metadata.num_row_groups)])
    if path is None or len(units) < 2 or max(size for _, size in units) > PARALLEL_ROW_GROUP_BYTES:
        # unit by unit, as the parallel path: batches never span two units, so sums are
        # added in the same order and the results are identical bit for bit
        for unit, _ in units:
            yield from _streamed(reader, unit, columns)
        return
    from concurrent.futures import Future, ThreadPoolExecutor

    import pyarrow.parquet as pq

    def decoded(unit: list[int]) -> list[pa.RecordBatch]:
        # its own reader: one per thread
        return _whole(pq.ParquetFile(path, buffer_size=READ_BUFFER), unit, columns)

    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="routelog-decode") as pool:
        pending: list[Future[list[pa.RecordBatch]]] = []
        try:
            pending = [pool.submit(decoded, units[1][0])]
            # the first unit streams here, batch by batch, so that reducing starts after
            # one batch is decoded, not a whole row group, while the next one decodes
            yield from _streamed(reader, units[0][0], columns)
            for unit, _ in units[2:]:
                pending.append(pool.submit(decoded, unit))
                if len(pending) > DECODE_THREADS:  # this many decode while one is used
                    yield from pending.pop(0).result()
            for future in pending:
                yield from future.result()
        finally:
            for future in pending:
                future.cancel()


def row_group_units(row_groups: list[Any]) -> list[tuple[list[int], int]]:
    """Consecutive row groups read together (their indices, and their decoded bytes): each
    unit is one row group, or several small ones adding up to at most BATCH_ROWS rows."""
    units: list[tuple[list[int], int]] = []
    rows = 0
    for index, group in enumerate(row_groups):
        joins = units and rows + group.num_rows <= BATCH_ROWS
        if joins:
            indices, size = units[-1]
            units[-1] = ([*indices, index], size + group.total_byte_size)
            rows += group.num_rows
        else:
            units.append(([index], group.total_byte_size))
            rows = group.num_rows
    return units


def _streamed(
    reader: pq.ParquetFile, unit: list[int], columns: list[str]
) -> Iterator[pa.RecordBatch]:
    """A unit of row groups batch by batch: one row group as pyarrow decodes it; several small
    ones (BATCH_ROWS rows at most in all) read together, as one batch."""
    if len(unit) > 1:
        return iter(_whole(reader, unit, columns))
    return reader.iter_batches(  # type: ignore[no-any-return]
        batch_size=BATCH_ROWS, row_groups=unit, columns=columns, use_threads=False
    )


def _whole(reader: pq.ParquetFile, unit: list[int], columns: list[str]) -> list[pa.RecordBatch]:
    """A unit of row groups read whole (6% less CPU than iter_batches), then cut every
    BATCH_ROWS rows, where streaming it would cut too."""
    whole = reader.read_row_groups(unit, columns=columns, use_threads=False)
    parts: list[pa.RecordBatch] = whole.combine_chunks().to_batches(max_chunksize=BATCH_ROWS)
    return parts


DECODE_THREADS = 2
"""Units of row groups decoded at once, ahead of the one in use (memory: DECODE_THREADS + 1
decoded units)."""
PARALLEL_ROW_GROUP_BYTES = 256 << 20
"""Files with a unit of row groups larger than this (decoded) stream one batch at a time."""


def _stated_score(
    metadata: dict[bytes, bytes] | None, path: Path, options: Options, info: FileInfo
) -> Options:
    """Options with the score function the file states (``routelog`` metadata), if any;
    the metadata is kept in ``info.recorded`` (``inspect`` shows it)."""
    raw = (metadata or {}).get(b"routelog")
    if raw is None:
        return options
    try:
        stated = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: 'routelog' metadata is not valid JSON ({exc})") from None
    info.recorded = stated if isinstance(stated, dict) else None
    score = stated.get("score") if isinstance(stated, dict) else None
    if score is None or score == options.score:
        return options
    if score not in ("softmax", "sigmoid"):
        raise InputError(f"{path}: 'routelog' metadata: score must be softmax or sigmoid")
    return dataclasses.replace(options, score=score)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
