"""Tabular layouts shared by Parquet and JSONL: a Polars frame of rows -> canonical batches.

Every table has a ``layer`` column and a step (a ``step``/``iter``/``iteration``/
``global_step`` column, else the step in the file name), plus exactly one payload, which
decides the layout (:func:`detect_layout` is the one place that decides it):

per-token rows
    ``probs`` or ``logits`` (also ``router_probs``/``router_logits``): a list of E floats.
batched lines
    the same column holding a list of T lists of E floats (one row holds T tokens); an
    optional ``token`` or ``mask`` list gives each token's position or mask.
wide columns
    ``p_0 ... p_{E-1}`` (probabilities) or ``logit_0 ... logit_{E-1}``.
tokens-per-expert counts
    ``tokens_per_expert``, ``expert_counts`` or ``tpe``: a list of E token counts per
    (step, layer), or a list of such lists (Megatron-LM's per-micro-batch counts, summed).
expert/count rows
    long rows with ``expert`` and ``count`` columns.
top-k ids
    ``topk_ids``: the k experts each token was routed to (``topk_weights`` optional).
probabilities and selections
    ``probs``/``logits`` (per-token, batched or wide) together with ``topk_ids`` (a list of
    k ids per token, or per batched row a list of such lists): probability metrics come from
    the probabilities, counts from the selected ids, and ``selection_mismatch`` compares them.

Optional columns: ``token``, ``dataset``, ``mask`` (false rows are excluded and counted), and
for id payloads ``num_experts``/``n_experts`` (else ``--num-experts``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo
from routelog.ingest.payload import PAYLOAD_KINDS, Locate, step_from_name, to_probabilities
from routelog.kernels import check_count_total, first_difference
from routelog.options import MAX_EXPERTS

if TYPE_CHECKING:
    from routelog.options import Options

STEP_COLUMNS = ("step", "iter", "iteration", "global_step")
COUNT_COLUMNS = ("tokens_per_expert", "expert_counts", "tpe")
ID_COLUMN = "topk_ids"
WEIGHT_COLUMN = "topk_weights"
EXPERT_COLUMNS = ("num_experts", "n_experts")
WIDE_PREFIXES: dict[str, Literal["probs", "logits"]] = {"p": "probs", "logit": "logits"}
WIDE_COLUMN = re.compile(r"^(p|logit)_(\d+)$")
ROW = "__row"
RANK_STRIDE = 1 << 32
WIDE = "__wide"

Kind = Literal["probs", "logits", "counts", "expert_counts", "topk"]
PAYLOAD_NAMES: dict[Kind, str] = {
    "probs": "probabilities",
    "logits": "logits",
    "counts": "counts",
    "expert_counts": "counts",
    "topk": "top-k ids",
}


@dataclass(frozen=True)
class Layout:
    """Which columns of a table carry what, decided once per file from its schema."""

    name: str
    kind: Kind
    step: str | None
    payload: str
    nested: bool = False
    wide: tuple[str, ...] = ()
    experts: str | None = None
    selection: str | None = None
    """The column of selected expert ids beside a probability payload (``topk_ids``)."""

    @property
    def payload_name(self) -> str:
        """What the payload holds, as ``inspect`` and the report say it."""
        return PAYLOAD_NAMES[self.kind]


def detect_layout(schema: Mapping[str, pl.DataType], path: Path) -> Layout:
    """Decide the layout from a table's column names and types, or raise naming what is wrong."""
    columns = list(schema)
    if "layer" not in columns:
        raise InputError(f"{path}: no 'layer' column (columns: {_listing(columns)})")
    step = next((c for c in STEP_COLUMNS if c in columns), None)
    if step is None and step_from_name(path) is None:
        raise InputError(
            f"{path}: no 'step' column, and no step in the file name "
            "(name it like step_000200.parquet, iter-200 or global_step200)"
        )
    experts = next((c for c in EXPERT_COLUMNS if c in columns), None)
    wide = _wide_columns(columns, path)
    found = [
        *[c for c in PAYLOAD_KINDS if c in columns],
        *[c for c in COUNT_COLUMNS if c in columns],
        *([ID_COLUMN] if ID_COLUMN in columns else []),
        *(["expert/count"] if {"expert", "count"} <= set(columns) else []),
        *([f"{wide[0]}..."] if wide else []),
    ]
    if not found:
        expected = [
            *PAYLOAD_KINDS,
            *COUNT_COLUMNS,
            ID_COLUMN,
            "expert+count",
            "p_0...",
            "logit_0...",
        ]
        raise InputError(
            f"{path}: no payload column: expected one of {_listing(expected)} "
            f"(columns: {_listing(columns)})"
        )
    if ID_COLUMN in found and len(found) == 2:
        kept = detect_layout({c: t for c, t in schema.items() if c != ID_COLUMN}, path)
        if kept.kind in ("probs", "logits"):
            name = f"{kept.name} with selected ids"
            return Layout(
                name, kept.kind, step, kept.payload, kept.nested, kept.wide, None, ID_COLUMN
            )
    if len(found) > 1:
        raise InputError(f"{path}: ambiguous payload, both {found[0]!r} and {found[1]!r}")
    payload = found[0]
    if payload in PAYLOAD_KINDS:
        nested = _depth(schema[payload]) >= 2
        name = "batched lines" if nested else "per-token rows"
        return Layout(name, PAYLOAD_KINDS[payload], step, payload, nested=nested)
    if payload in COUNT_COLUMNS:
        nested = _depth(schema[payload]) >= 2
        return Layout("tokens-per-expert counts", "counts", step, payload, nested=nested)
    if payload == ID_COLUMN:
        return Layout("top-k ids", "topk", step, ID_COLUMN, experts=experts)
    if payload == "expert/count":
        return Layout("expert/count rows", "expert_counts", step, "count", experts=experts)
    kind = WIDE_PREFIXES[wide[0].split("_")[0]]
    return Layout("wide columns", kind, step, WIDE, wide=wide)


def _wide_columns(columns: list[str], path: Path) -> tuple[str, ...]:
    """``p_0 ... p_{E-1}`` (or ``logit_*``) in expert order; a gap or a mix is an error."""
    matches = [m for m in map(WIDE_COLUMN.match, columns) if m]
    if not matches:
        return ()
    prefixes = sorted({m.group(1) for m in matches})
    if len(prefixes) > 1:
        raise InputError(f"{path}: ambiguous payload, both p_* and logit_* columns")
    prefix = prefixes[0]
    indices = sorted(int(m.group(2)) for m in matches)
    if indices[-1] >= MAX_EXPERTS:
        raise InputError(
            f"{path}: wide column {prefix}_{indices[-1]} is beyond the {MAX_EXPERTS} experts "
            "routelog handles"
        )
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing or len(indices) != len(set(indices)):
        gap = f"no {prefix}_{missing[0]}" if missing else "a repeated index"
        raise InputError(
            f"{path}: wide columns {prefix}_0..{prefix}_{indices[-1]} have {gap} "
            "(expected contiguous columns 0..E-1)"
        )
    return tuple(f"{prefix}_{i}" for i in range(indices[-1] + 1))


DType = Any  # a polars DataType instance or class (nested dtypes hold either)


def _depth(dtype: DType) -> int:
    depth = 0
    while isinstance(dtype, (pl.List, pl.Array)):
        depth += 1
        dtype = dtype.inner
    return depth


def _leaf(dtype: DType) -> DType:
    while isinstance(dtype, (pl.List, pl.Array)):
        dtype = dtype.inner
    return dtype


def type_problem(schema: Mapping[str, pl.DataType], layout: Layout) -> str | None:
    """The first column whose type does not fit the layout, as a message; None when all fit."""
    integers = ["layer", *([layout.step] if layout.step else [])]
    if layout.kind == "expert_counts":
        integers += ["expert", "count"]
    integers += [
        c for c in ("token", "rank", *EXPERT_COLUMNS) if c in schema and _depth(schema[c]) == 0
    ]
    for column in integers:
        dtype = schema[column]
        if not (dtype.is_integer() or dtype == pl.Null):
            return f"column {column!r} must hold integers, not {dtype}"
    if "mask" in schema and _depth(schema["mask"]) == 0:
        dtype = schema["mask"]
        if not (dtype == pl.Boolean or dtype.is_integer() or dtype == pl.Null):
            return f"column 'mask' must hold booleans, not {dtype}"
    if "dataset" in schema and schema["dataset"] not in (pl.String, pl.Categorical, pl.Null):
        return f"column 'dataset' must hold strings, not {schema['dataset']}"
    payloads = [layout.payload] if layout.kind != "expert_counts" else []
    if layout.wide:
        payloads = list(layout.wide)
    depth = 1 + int(layout.nested)
    if layout.selection is not None:
        ids = schema[layout.selection]
        if _depth(ids) != depth or not (_leaf(ids).is_integer() or _leaf(ids) == pl.Null):
            kind = "a list of integers" if depth == 1 else "a list of lists of integers"
            return f"column {layout.selection!r} must hold {kind} per row, not {ids}"
    for column in payloads:
        dtype = schema[column]
        leaf = _leaf(dtype)
        want_depth = 0 if layout.wide else depth
        numeric = leaf.is_integer() if layout.kind in ("counts", "topk") else leaf.is_numeric()
        if _depth(dtype) != want_depth or not (numeric or leaf == pl.Null):
            what = "integers" if layout.kind in ("counts", "topk") else "numbers"
            shape = {0: "a number", 1: f"a list of {what}", 2: f"a list of lists of {what}"}
            return f"column {column!r} must hold {shape[want_depth]} per row, not {dtype}"
    return None


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
    """Turn one chunk of table rows into canonical batches, validating every row.

    ``locate`` turns a row index of the file (0-based) into a place such as
    ``f.parquet row 17`` or ``f.jsonl:18`` for error messages.
    """
    problem = type_problem(frame.schema, layout)
    if problem is not None:
        raise InputError(f"{path}: {problem}")
    # a flat payload of probabilities or logits stays a fixed-size array: its numpy view needs
    # no copy, and all its rows have one width
    flat = layout.payload if layout.kind in ("probs", "logits") and not layout.nested else None
    frame = _as_lists(frame, keep=flat).with_row_index(ROW, offset=row_offset)
    if layout.kind == "counts":
        info.rows += frame.height
    if layout.nested:
        frame = _explode(frame, layout, options, info, locate)
    if layout.kind != "counts":
        info.rows += frame.height
    frame = _required(frame, "layer", options, info, locate)
    frame = _integers_in_range(frame, layout, options, info, locate)
    frame = _with_step(frame, layout, path, options, info, locate)
    frame = _drop_masked(frame, info, path)
    frame = select_rows(frame, options)
    if frame.height == 0:
        return
    if layout.wide:
        for column in layout.wide:  # named here: the concatenated list is routelog's own
            frame = _required(frame, column, options, info, locate)
        frame = frame.with_columns(pl.concat_list(layout.wide).alias(WIDE))
    if layout.kind == "expert_counts":
        yield from _expert_count_batches(frame, layout, options, info, locate)
        return
    frame = _required(frame, layout.payload, options, info, locate)
    if frame.height == 0:
        return
    for width, part in _by_width(frame, layout.payload, path, locate):
        if width == 0:
            raise InputError(f"{locate(int(part[ROW][0]))}: empty {layout.payload!r} row")
        if width > MAX_EXPERTS and layout.kind != "topk":
            raise InputError(
                f"{locate(int(part[ROW][0]))}: {width} experts in {layout.payload!r}, beyond the "
                f"{MAX_EXPERTS} routelog handles"
            )
        if layout.kind in ("probs", "logits") and layout.selection is not None:
            yield from _selected_batches(part, width, layout, options, info, locate)
        elif layout.kind in ("probs", "logits"):
            yield from _probability_batch(part, width, layout, options, info, locate)
        elif layout.kind == "counts":
            yield from _count_batch(part, width, layout, options, info, locate)
        else:
            yield from _topk_batches(part, width, layout, options, info, locate)


def _as_lists(frame: pl.DataFrame, keep: str | None = None) -> pl.DataFrame:
    """Fixed-size lists (Parquet's FixedSizeList) as lists, so one code path checks both;
    ``keep`` (optional) names a column left as it is when it is an array of numbers."""
    arrays = {
        name: _list_type(dtype)
        for name, dtype in frame.schema.items()
        if _depth(dtype)
        and _list_type(dtype) != dtype
        and not (name == keep and _depth(dtype) == 1 and _leaf(dtype).is_numeric())
    }
    return frame.with_columns(pl.col(n).cast(d) for n, d in arrays.items()) if arrays else frame


def _list_type(dtype: DType) -> DType:
    if isinstance(dtype, (pl.List, pl.Array)):
        return pl.List(_list_type(dtype.inner))
    return dtype


def _skip(
    frame: pl.DataFrame,
    bad: pl.Series,
    message: str,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> pl.DataFrame:
    """Raise naming the first bad row, or drop the bad rows and count them (--skip-bad-rows)."""
    bad = bad.fill_null(True)
    if not bad.any():
        return frame
    if not options.skip_bad_rows:
        row = int(frame.filter(bad)[ROW][0])
        raise InputError(f"{locate(row)}: {message} (use --skip-bad-rows to drop such rows)")
    info.skipped_rows += int(bad.sum())
    return frame.filter(~bad)


def _required(
    frame: pl.DataFrame, column: str, options: Options, info: FileInfo, locate: Locate
) -> pl.DataFrame:
    if frame[column].null_count() == 0:  # known without a pass over the column
        return frame
    return _skip(frame, frame[column].is_null(), f"missing {column!r} value", options, info, locate)


def _explode(
    frame: pl.DataFrame, layout: Layout, options: Options, info: FileInfo, locate: Locate
) -> pl.DataFrame:
    """One row per token of a batched row; ``token`` and ``mask`` lists go along."""
    frame = _required(frame, layout.payload, options, info, locate)
    lengths = frame[layout.payload].list.len()
    along: list[str] = [
        c for c in ("token", "mask") if c in frame.columns and _depth(frame.schema[c]) == 1
    ]
    if layout.selection is not None:
        frame = _required(frame, layout.selection, options, info, locate)
        lengths = frame[layout.payload].list.len()
        along.append(layout.selection)
    for column in along:
        differs = frame[column].list.len() != lengths
        message = f"{column!r} list and {layout.payload!r} have different lengths"
        frame = _skip(frame, differs, message, options, info, locate)
    # a batched row of no tokens (or counts of no layer) would vanish in the explode
    empty = frame[layout.payload].list.len() == 0
    frame = _skip(frame, empty, f"empty {layout.payload!r} row", options, info, locate)
    if layout.kind in ("counts",):
        return frame.explode(layout.payload)
    if "token" not in along:
        frame = frame.with_columns(pl.int_ranges(pl.col(layout.payload).list.len()).alias("token"))
        along.append("token")
    return frame.explode([layout.payload, *along])


MAX_COUNT = 1 << 53
"""Largest token count of one expert in one row: exact in float64, and far beyond any run."""
INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)


_SMALL: tuple[pl.DataType, ...] = (pl.Int8(), pl.Int16(), pl.Int32(), pl.UInt8(), pl.UInt16())
_FITS: dict[tuple[int, int], tuple[pl.DataType, ...]] = {
    INT32: _SMALL,
    INT64: (*_SMALL, pl.Int64(), pl.UInt32()),
}
"""Integer types whose every value lies within each range (no row to check)."""


def _integers_in_range(
    frame: pl.DataFrame, layout: Layout, options: Options, info: FileInfo, locate: Locate
) -> pl.DataFrame:
    """Integers that do not fit routelog's types (a uint64 step of 2^63, a layer beyond int32,
    a JSON token of 2^70) are bad rows, named, instead of a failed cast further down."""
    limits: dict[str, tuple[int, int]] = {"layer": INT32}
    if layout.step is not None:
        limits[layout.step] = INT64
    limits.update({c: INT64 for c in ("token", "expert", "count") if c in frame.columns})
    limits.update({c: (1, MAX_EXPERTS) for c in EXPERT_COLUMNS if c in frame.columns})
    for column, (lo, hi) in limits.items():
        if column not in frame.columns or _depth(frame.schema[column]) != 0:
            continue
        dtype = frame.schema[column]
        if not dtype.is_integer():
            continue
        if (lo, hi) in _FITS and dtype in _FITS[(lo, hi)]:  # no value of the type is outside
            frame = frame.with_columns(
                pl.col(column).cast(pl.Int32 if hi == INT32[1] else pl.Int64)
            )
            continue
        outside = frame.select(
            ((pl.col(column) < lo) | (pl.col(column) > hi)).fill_null(False)
        ).to_series()
        span = f"[1, {hi}]" if lo == 1 else f"the {'int32' if hi == INT32[1] else 'int64'} range"
        message = f"{column!r} value outside {span}"
        frame = _skip(frame, outside, message, options, info, locate)
        if frame.height:
            target = pl.Int32 if (lo, hi) == INT32 else pl.Int64
            frame = frame.with_columns(pl.col(column).cast(target))
    return frame


def _with_step(
    frame: pl.DataFrame,
    layout: Layout,
    path: Path,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> pl.DataFrame:
    if layout.step is not None:
        frame = _required(frame, layout.step, options, info, locate)
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


def select_rows(frame: pl.DataFrame, options: Options) -> pl.DataFrame:
    """Apply --layers and --steps (to ``layer`` and ``step`` columns) before any payload work;
    table layouts and Megatron traces alike."""
    if options.layers is not None:
        frame = frame.filter(options.layers.expression("layer"))
    if options.steps is not None:
        if options.steps.start is not None:
            frame = frame.filter(pl.col("step") >= options.steps.start)
        if options.steps.stop is not None:
            frame = frame.filter(pl.col("step") <= options.steps.stop)
    return frame


def _by_width(
    frame: pl.DataFrame, column: str, path: Path, locate: Locate
) -> Iterator[tuple[int, pl.DataFrame]]:
    """Split rows by payload width E; one layer with two widths is an error naming both."""
    dtype = frame.schema[column]
    if isinstance(dtype, pl.Array):
        yield int(dtype.size), frame
        return
    if not isinstance(dtype, pl.List):
        raise InputError(f"{path}: column {column!r} must hold lists of numbers, not {dtype}")
    widths = frame.select(pl.col(column).list.len().alias("_w"), "step", "layer", ROW)
    if column == ID_COLUMN:
        _one_k_per_step(widths, "_w", locate)
    else:
        _one_width_per_layer(widths, "_w", column, locate)
    for width in sorted(widths["_w"].unique().to_list()):
        yield int(width), frame.filter(widths["_w"] == width)


def _one_width_per_layer(widths: pl.DataFrame, column: str, source: str, locate: Locate) -> None:
    """Refuse a layer whose rows give two expert counts (``column``, read from the data's
    ``source``): the error names the first row that differs from its layer's first row, and
    that first row."""
    clash = first_difference(widths, column, ["layer"], ROW)
    if clash is not None:
        (layer,), width, row, first_width, first_row = clash
        raise InputError(
            f"{locate(int(row))}: layer {layer} has {width} experts in {source!r}, but "
            f"{first_width} at {locate(int(first_row))} (all rows of a layer must have the "
            "same expert count)"
        )


def _one_k_per_step(widths: pl.DataFrame, column: str, locate: Locate) -> None:
    """Refuse a step of a layer whose rows select two numbers of experts per token (the
    widths of their ``topk_ids``, in ``column``), naming the first such row and the step's
    first row. Another step may have another k."""
    clash = first_difference(widths, column, ["step", "layer"], ROW)
    if clash is not None:
        (step, layer), k, row, first_k, first_row = clash
        raise InputError(
            f"{locate(int(row))}: layer {layer} selects {k} experts per token in "
            f"{ID_COLUMN!r} at step {step}, but {first_k} at {locate(int(first_row))} "
            "(one step of a layer has one k)"
        )


def _keys(frame: pl.DataFrame) -> list[pl.Expr]:
    """The canonical key columns: step, layer, and token/dataset when present.

    With a ``rank`` column (files of several ranks, as ``routelog.record`` writes them under
    torch.distributed), a token is identified by its rank and position: rank r's token t
    becomes ``r * 2**32 + t``, so that ranks merged into one step do not share tokens.
    """
    token = pl.col("token").cast(pl.Int64)
    if "rank" in frame.columns:
        token = token + pl.col("rank").cast(pl.Int64).fill_null(0) * RANK_STRIDE
    return [
        pl.col("step").cast(pl.Int64),
        pl.col("layer").cast(pl.Int32),
        *([token.alias("token")] if "token" in frame.columns else []),
        *([pl.col("dataset").cast(pl.String)] if "dataset" in frame.columns else []),
    ]


def _probability_batch(
    frame: pl.DataFrame,
    width: int,
    layout: Layout,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> Iterator[Batch]:
    column = frame[layout.payload]
    if column.explode().null_count() > column.null_count():
        column = column.cast(_list_type(column.dtype))
        nulls = column.list.eval(pl.element().is_null()).list.any()
        frame = _skip(frame, nulls, f"null value in {layout.payload!r}", options, info, locate)
        column = column.filter(~nulls)
    kind: Literal["probs", "logits"] = "probs" if layout.kind == "probs" else "logits"
    # logits stay float32 when they are (no copy), else float64: a finite 1e39 must not
    # become inf by a cast to float32
    inner = getattr(column.dtype, "inner", None)
    precision = pl.Float32 if kind == "probs" or inner == pl.Float32 else pl.Float64
    if isinstance(column.dtype, pl.List):
        column = column.list.to_array(width)
    matrix = column.cast(pl.Array(precision, width)).to_numpy()
    rows = frame[ROW].to_numpy()
    result = to_probabilities(matrix, kind, options, lambda i: locate(int(rows[i])))
    info.skipped_rows += result.skipped
    if result.skipped:
        frame = frame.filter(pl.Series(result.keep))
    canonical = frame.select(_keys(frame)).with_columns(pl.Series("probs", result.probs))
    if result.logit_lse is not None:
        canonical = canonical.with_columns(pl.Series("logit_lse", result.logit_lse))
    if layout.selection is not None and frame.height:
        k = frame[layout.selection].list.len()[0]
        ids = frame[layout.selection].list.to_array(k).cast(pl.Array(pl.Int32, k))
        yield Batch("probs", canonical.with_columns(ids.alias(ID_COLUMN)), width, top_k=k)
        return
    yield Batch("probs", canonical, width)


def _selected_batches(
    frame: pl.DataFrame,
    width: int,
    layout: Layout,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> Iterator[Batch]:
    """Probability rows that also carry the router's selected ids, checked like ``topk_ids``
    rows (within [0, E), no repeats) and split by k (one k per layer)."""
    column = layout.selection
    assert column is not None
    frame = _required(frame, column, options, info, locate)
    frame = checked_ids(frame, column, width, f"{column!r}: ", options, info, locate)
    if frame.height == 0:
        return
    ks = frame.select(pl.col(column).list.len().alias("_k"), "layer")
    _one_k_per_layer(ks, Path(info.path))
    for k in sorted(ks["_k"].unique().to_list()):
        part = frame.filter(ks["_k"] == k)
        if options.top_k is not None and options.top_k != k:
            info.warn(
                f"rows carry the {k} experts the router selected; --top-k {options.top_k} "
                "is ignored for them"
            )
        yield from _probability_batch(part, width, layout, options, info, locate)


def checked_ids(
    frame: pl.DataFrame,
    column: str,
    n_experts: int | str,
    prefix: str,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> pl.DataFrame:
    """Rows whose list of selected expert ids (``column``) is fit to count, the others
    rejected naming the first or dropped and counted (--skip-bad-rows): an id that is null,
    negative (a fill value such as -1) or at least E (``n_experts``: a number, or the column
    holding each row's E), an empty list, an id repeated within the list. ``prefix`` starts
    the messages (``"'topk_ids': "``). One k per layer is checked where rows are split by k.
    """
    ids = pl.col(column)
    limit = pl.col(n_experts) if isinstance(n_experts, str) else pl.lit(n_experts)
    outside = frame.select(
        (
            ids.list.eval(pl.element().is_null() | (pl.element() < 0)).list.any()
            | (ids.list.max() >= limit).fill_null(False)
        ).fill_null(True)
    ).to_series()
    shown = "E" if isinstance(n_experts, str) else n_experts
    message = f"{prefix}expert id outside [0, {shown}) (or a fill value such as -1)"
    frame = _skip(frame, outside, message, options, info, locate)
    empty = frame.select(ids.list.len() == 0).to_series()
    frame = _skip(frame, empty, f"empty {column!r} list", options, info, locate)
    repeated = frame.select(ids.list.n_unique() < ids.list.len()).to_series()
    message = f"{prefix}an expert id repeated within one token"
    return _skip(frame, repeated, message, options, info, locate)


def _one_k_per_layer(ks: pl.DataFrame, path: Path) -> None:
    per_layer = ks.group_by("layer").agg(pl.col("_k").unique().sort())
    clash = per_layer.filter(pl.col("_k").list.len() > 1)
    if clash.height:
        layer, found = clash.sort("layer").row(0)
        raise InputError(
            f"{path}: layer {layer} has rows selecting {found[0]} and {found[1]} experts "
            f"in {ID_COLUMN!r} (all rows of a layer must select the same k)"
        )


def _count_batch(
    frame: pl.DataFrame,
    width: int,
    layout: Layout,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> Iterator[Batch]:
    counts = pl.col(layout.payload)
    bad = frame.select(
        counts.list.eval(
            pl.element().is_null() | (pl.element() < 0) | (pl.element() > MAX_COUNT)
        ).list.any()
    ).to_series()
    message = f"null or negative count (or one above 2^53) in {layout.payload!r}"
    frame = _skip(frame, bad, message, options, info, locate)
    if frame.height == 0:
        return
    canonical = frame.select(
        *[k for k in _keys(frame) if k.meta.output_name() != "token"],
        counts.list.to_array(width).cast(pl.Array(pl.Int64, width)).alias("counts"),
    )
    yield Batch("counts", canonical, width)


def _experts(
    frame: pl.DataFrame, layout: Layout, options: Options, info: FileInfo, locate: Locate
) -> pl.DataFrame:
    """Add ``__e``, the expert count E of each row: the data's column, else --num-experts."""
    if layout.experts is not None:
        frame = _required(frame, layout.experts, options, info, locate)
        bad = frame[layout.experts] < 1
        frame = _skip(frame, bad, f"{layout.experts!r} must be positive", options, info, locate)
        return frame.with_columns(pl.col(layout.experts).cast(pl.Int64).alias("__e"))
    if options.num_experts is not None:
        return frame.with_columns(pl.lit(options.num_experts, dtype=pl.Int64).alias("__e"))
    if layout.kind == "expert_counts":
        return frame.with_columns(pl.col("expert").max().over("layer").add(1).alias("__e"))
    raise InputError(
        f"{info.path}: expert ids do not say how many experts there are: "
        "pass --num-experts E (or add a 'num_experts' column)"
    )


def _topk_batches(
    frame: pl.DataFrame,
    width: int,
    layout: Layout,
    options: Options,
    info: FileInfo,
    locate: Locate,
) -> Iterator[Batch]:
    frame = _experts(frame, layout, options, info, locate)
    ids = pl.col(ID_COLUMN)
    frame = checked_ids(frame, ID_COLUMN, "__e", "", options, info, locate)
    if WEIGHT_COLUMN in frame.columns:
        weights = pl.col(WEIGHT_COLUMN)
        bad = frame.select(
            (weights.list.len() != ids.list.len())
            | weights.list.eval(~pl.element().cast(pl.Float64).is_finite()).list.any()
        ).to_series()
        message = f"{WEIGHT_COLUMN!r} must hold k finite numbers, like {ID_COLUMN!r}"
        frame = _skip(frame, bad, message, options, info, locate)
    if frame.height == 0:
        return
    if layout.experts is not None:  # E from --num-experts, or from the ids, is one per layer
        _one_width_per_layer(frame.select("layer", "__e", ROW), "__e", layout.experts, locate)
    for n_experts in sorted(frame["__e"].unique().to_list()):
        part = frame.filter(pl.col("__e") == n_experts)
        canonical = part.select(
            *_keys(part), ids.list.to_array(width).cast(pl.Array(pl.Int32, width)).alias(ID_COLUMN)
        )
        yield Batch("topk", canonical, int(n_experts), top_k=width)


def _expert_count_batches(
    frame: pl.DataFrame, layout: Layout, options: Options, info: FileInfo, locate: Locate
) -> Iterator[Batch]:
    """Long ``expert``/``count`` rows -> one counts row per (step, layer[, dataset])."""
    for column in ("expert", "count"):
        frame = _required(frame, column, options, info, locate)
    negative = (frame["count"] < 0) | (frame["count"] > MAX_COUNT)
    frame = _skip(frame, negative, "negative or absurd (above 2^53) 'count'", options, info, locate)
    frame = _experts(frame, layout, options, info, locate)
    outside = (frame["expert"] < 0) | (frame["expert"] >= frame["__e"])
    frame = _skip(frame, outside, "expert id outside [0, E)", options, info, locate)
    if frame.height == 0:
        return
    if layout.experts is not None:  # E from --num-experts, or from the ids, is one per layer
        _one_width_per_layer(frame.select("layer", "__e", ROW), "__e", layout.experts, locate)
    keys = ["step", "layer", *(["dataset"] if "dataset" in frame.columns else [])]
    for n_experts in sorted(frame["__e"].unique().to_list()):
        part = frame.filter(pl.col("__e") == n_experts)
        groups = part.select(keys).unique(maintain_order=True).with_row_index("__g")
        info.dense.claim(info.path, groups.height, int(n_experts), part.height, "count rows")
        gid = part.join(groups, on=keys, how="left", nulls_equal=True, maintain_order="left")
        flat = gid["__g"].to_numpy().astype(np.int64) * n_experts + part["expert"].to_numpy()
        summed = np.bincount(
            flat, weights=part["count"].to_numpy(), minlength=groups.height * n_experts
        )
        check_count_total(summed.reshape(groups.height, n_experts).sum(axis=1))
        matrix = summed.astype(np.int64).reshape(groups.height, n_experts)
        canonical = groups.drop("__g").select(
            [k for k in _keys(groups) if k.meta.output_name() != "token"]
        )
        canonical = canonical.with_columns(
            pl.Series("counts", matrix).cast(pl.Array(pl.Int64, int(n_experts)))
        )
        yield Batch("counts", canonical, int(n_experts))
