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

    A local file of several row groups none larger than PARALLEL_ROW_GROUP_BYTES decoded is
    decoded DECODE_THREADS row groups at a time (each on its own thread, in its own reader:
    pyarrow decodes one column chunk on one thread, and a routing log is one big column),
    but for its first row group, which streams batch by batch (so the first batch is ready
    after a fraction of a row group's decoding); otherwise one batch at a time, as pyarrow
    streams it.
    Either way no batch spans two row groups, so a file gives the same sums whichever path
    reads it (a bucket's or a disk's).
    """
    metadata = reader.metadata
    sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
    if path is None or len(sizes) < 2 or max(sizes) > PARALLEL_ROW_GROUP_BYTES:
        # row group by row group, as the parallel path: batches never span two row groups,
        # so sums are added in the same order and the results are identical bit for bit
        for index in range(len(sizes)):
            yield from _streamed(reader, index, columns)
        return
    from concurrent.futures import Future, ThreadPoolExecutor

    import pyarrow.parquet as pq

    def row_group(index: int) -> list[pa.RecordBatch]:
        # read whole (6% less CPU than iter_batches), then cut at the same row offsets
        own = pq.ParquetFile(path, buffer_size=READ_BUFFER)
        whole = own.read_row_group(index, columns=columns, use_threads=False)
        parts: list[pa.RecordBatch] = whole.combine_chunks().to_batches(max_chunksize=BATCH_ROWS)
        return parts

    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="routelog-decode") as pool:
        pending: list[Future[list[pa.RecordBatch]]] = []
        try:
            pending = [pool.submit(row_group, 1)]
            # the first row group streams here, batch by batch, so that reducing starts
            # after one batch is decoded, not a whole row group, while the next one decodes
            yield from _streamed(reader, 0, columns)
            for index in range(2, len(sizes)):
                pending.append(pool.submit(row_group, index))
                if len(pending) > DECODE_THREADS:  # this many decode while one is used
                    yield from pending.pop(0).result()
            for future in pending:
                yield from future.result()
        finally:
            for future in pending:
                future.cancel()


def _streamed(reader: pq.ParquetFile, index: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Row group ``index`` batch by batch, as pyarrow decodes it."""
    return reader.iter_batches(  # type: ignore[no-any-return]
        batch_size=BATCH_ROWS, row_groups=[index], columns=columns, use_threads=False
    )


DECODE_THREADS = 2
"""Row groups decoded at once, ahead of the one in use (memory: DECODE_THREADS + 1 decoded
row groups)."""
PARALLEL_ROW_GROUP_BYTES = 256 << 20
"""Files with a row group larger than this (decoded) stream one batch at a time instead."""


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
