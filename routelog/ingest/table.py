"""Tabular layouts shared by Parquet and JSONL: a Polars frame of rows -> canonical batches.

Recognised columns: ``layer``; ``step`` (or ``iter``/``iteration``/``global_step``; else
the step in the file name); one payload column ``probs`` or ``logits`` (a list or fixed-size
list of floats per token); optional ``token``, ``dataset`` and ``mask`` (false rows are
excluded and counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo
from routelog.ingest.payload import Locate, step_from_name, to_probabilities

if TYPE_CHECKING:
    from routelog.options import Options

STEP_COLUMNS = ("step", "iter", "iteration", "global_step")
PAYLOAD_COLUMNS: dict[str, Literal["probs", "logits"]] = {
    "probs": "probs",
    "router_probs": "probs",
    "logits": "logits",
    "router_logits": "logits",
}
ROW = "__row"


@dataclass(frozen=True)
class Layout:
    """Which columns of a table carry what, decided once per file from its column names."""

    step: str | None
    payload: str
    kind: Literal["probs", "logits"]


def detect_layout(columns: list[str], path: Path) -> Layout:
    """Decide the layout from column names, or raise naming what is missing."""
    if "layer" not in columns:
        raise InputError(f"{path}: no 'layer' column (columns: {_listing(columns)})")
    payloads = [c for c in PAYLOAD_COLUMNS if c in columns]
    if not payloads:
        raise InputError(
            f"{path}: no payload column: expected one of {_listing(list(PAYLOAD_COLUMNS))} "
            f"(columns: {_listing(columns)})"
        )
    if len(payloads) > 1:
        raise InputError(f"{path}: ambiguous payload, both {payloads[0]!r} and {payloads[1]!r}")
    step = next((c for c in STEP_COLUMNS if c in columns), None)
    if step is None and step_from_name(path) is None:
        raise InputError(
            f"{path}: no 'step' column, and no step in the file name "
            "(name it like step_000200.parquet, iter-200 or global_step200)"
        )
    return Layout(step, payloads[0], PAYLOAD_COLUMNS[payloads[0]])


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:12])
    return shown + (", ..." if len(names) > 12 else "")


def batches(
    frame: pl.DataFrame,
    layout: Layout,
    path: Path,
    *,
    row_offset: int,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> Iterator[Batch]:
    """Turn one chunk of table rows into probability batches, validating every row.

    ``locate`` turns a row index of the file (0-based) into a place such as
    ``f.parquet row 17`` or ``f.jsonl:18`` for error messages.
    """
    info.rows += frame.height
    frame = _with_step(frame.with_row_index(ROW, offset=row_offset), layout, path)
    frame = _drop_masked(frame, info, path)
    frame = _select(frame, options)
    if frame.height == 0:
        return
    payload = frame[layout.payload]
    missing = payload.is_null()
    if missing.any():
        row = int(frame.filter(missing)[ROW][0])
        if not options.skip_bad_rows:
            raise InputError(f"{locate(row)}: missing {layout.payload!r} value")
        info.skipped_rows += int(missing.sum())
        frame = frame.filter(~missing)
    for width, part in _by_width(frame, layout.payload, path):
        yield from _probability_batch(part, width, layout, options, info, locate)


def _with_step(frame: pl.DataFrame, layout: Layout, path: Path) -> pl.DataFrame:
    if layout.step is not None:
        if frame[layout.step].null_count():
            row = int(frame.filter(pl.col(layout.step).is_null())[ROW][0])
            raise InputError(f"{path} row {row}: missing {layout.step!r} value")
        return frame.with_columns(pl.col(layout.step).cast(pl.Int64).alias("step"))
    return frame.with_columns(pl.lit(step_from_name(path), dtype=pl.Int64).alias("step"))


def _drop_masked(frame: pl.DataFrame, info: FileInfo, path: Path) -> pl.DataFrame:
    if "mask" not in frame.columns:
        return frame
    try:
        keep = frame["mask"].cast(pl.Boolean).fill_null(True)
    except pl.exceptions.InvalidOperationError as exc:
        raise InputError(f"{path}: 'mask' column is not boolean ({frame['mask'].dtype})") from exc
    info.masked_rows += int((~keep).sum())
    return frame.filter(keep)


def _select(frame: pl.DataFrame, options: Options) -> pl.DataFrame:
    """Apply --layers and --steps before any payload work."""
    if options.layers is not None:
        frame = frame.filter(pl.col("layer").is_in(sorted(options.layers)))
    if options.steps is not None:
        if options.steps.start is not None:
            frame = frame.filter(pl.col("step") >= options.steps.start)
        if options.steps.stop is not None:
            frame = frame.filter(pl.col("step") <= options.steps.stop)
    return frame


def _by_width(frame: pl.DataFrame, column: str, path: Path) -> Iterator[tuple[int, pl.DataFrame]]:
    """Split rows by payload width E; one layer with two widths is an error naming both."""
    dtype = frame.schema[column]
    if isinstance(dtype, pl.Array):
        yield int(dtype.size), frame
        return
    if not isinstance(dtype, pl.List):
        raise InputError(f"{path}: column {column!r} must hold lists of numbers, not {dtype}")
    widths = frame.select(pl.col(column).list.len().alias("_w"), "layer")
    per_layer = widths.group_by("layer").agg(pl.col("_w").unique().sort())
    clash = per_layer.filter(pl.col("_w").list.len() > 1)
    if clash.height:
        layer, found = clash.row(0)
        raise InputError(
            f"{path}: layer {layer} has rows with {found[0]} and {found[1]} experts "
            "(all rows of a layer must have the same expert count)"
        )
    for width in sorted(widths["_w"].unique().to_list()):
        yield int(width), frame.filter(widths["_w"] == width)


def _probability_batch(
    frame: pl.DataFrame,
    width: int,
    layout: Layout,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> Iterator[Batch]:
    if width == 0:
        raise InputError(f"{locate(int(frame[ROW][0]))}: empty {layout.payload!r} row")
    column = frame[layout.payload]
    if isinstance(column.dtype, pl.List):
        column = column.list.to_array(width)
    if not column.dtype.inner.is_numeric():  # type: ignore[attr-defined]
        raise InputError(f"{info.path}: column {layout.payload!r} must hold numbers")
    matrix = column.cast(pl.Array(pl.Float32, width)).to_numpy()
    rows = frame[ROW].to_numpy()
    result = to_probabilities(matrix, layout.kind, options, lambda i: locate(int(rows[i])))
    info.skipped_rows += result.skipped
    if result.skipped:
        frame = frame.filter(pl.Series(result.keep))
    canonical = frame.select(
        pl.col("step").cast(pl.Int64),
        pl.col("layer").cast(pl.Int32),
        *[
            pl.col(name).cast(dtype)
            for name, dtype in (("token", pl.Int64), ("dataset", pl.String))
            if name in frame.columns
        ],
    ).with_columns(pl.Series("probs", result.probs))
    if result.logit_lse is not None:
        canonical = canonical.with_columns(pl.Series("logit_lse", result.logit_lse))
    yield Batch("probs", canonical, width)
