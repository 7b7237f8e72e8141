"""Kernels: canonical batches -> mergeable statistics -> metrics.

Reduction visits each token's row once in compiled code (``routelog/_native.c``, through
:mod:`routelog.native`), then numpy and Polars group and count; there is no Python loop over
tokens. Statistics are sums and counts per (step, layer, dataset), so chunks, files and cached
results add up with :func:`merge`; :func:`finish` turns them into metrics.

Definitions (p_t: token t's probabilities over E experts; T tokens; S_t: the k largest p_t;
c_i = #{t : i in S_t}; f_i = c_i / sum_j c_j; P_i = mean_t p_t,i; a_i = #{t : argmax p_t = i};
H(q) = -sum q ln q, 0 ln 0 = 0)::

    token_entropy   = mean_t H(p_t)          load_entropy   = H(P)
    assign_entropy  = H(f)                   mutual_info    = H(P) - mean_t H(p_t)
    *_norm          = value / ln E           max_load_share = max_i f_i
    max_vio         = max_i c_i / mean_i c_i - 1
    load_cv         = std_i c_i / mean_i c_i (population std)
    load_share      = f (count share)        mass_share     = P (probability mass share)
    top1_share      = a / T (argmax share)   dead_experts   = #{i : dead_mask(f, P)_i}
    aux_loss        = E * sum_i (c_i / T) * P_i      (HF load_balancing_loss_func, one layer)
    top1_prob       = mean_t max_i p_t,i     z_loss = mean_t logsumexp(logits_t)^2

An expert is dead (:func:`dead_mask`) when it receives almost no tokens (f_i < dead_fraction/E)
or, where probabilities exist, almost no probability mass (P_i < dead_fraction/E): either way
it contributes almost nothing to its layer's output. Counting alone is blind to weights (with
top-2, an expert chosen second with weight 0.001 still counts as a full slot); mass alone is
blind to selection (an expert can hold 2% of the mass in small slices and never be selected).

When rows carry the experts the router actually selected (``topk_ids`` beside the
probabilities), S_t is that selection, not the k largest p_t, and::

    selection_mismatch = #{t : S_t != top-k(p_t) as sets} / #{t with a selection}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from routelog import native
from routelog.errors import InputError

KERNEL_VERSION = 6
"""Bump when the statistics a kernel produces change, in meaning or in their last bits (5: the
compiled kernels' entropies; 6: their sums in fixed lanes, the same on every CPU level): it
invalidates cached results, so a run never mixes the two."""

KEYS = ["step", "layer", "dataset"]
GROUP = [*KEYS, "n_experts", "top_k"]
SUMS = [
    "n_tokens",
    "sum_entropy",
    "sum_top1",
    "n_selected",
    "sum_lse_sq",
    "n_lse",
    # --- selection vs probabilities (rows carrying both) ---
    "n_mismatch",
    "n_compared",
]
VECTORS = ["sum_probs", "counts", "top1_counts"]

STATS_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.Int64(),
    "layer": pl.Int32(),
    "dataset": pl.String(),
    "n_experts": pl.Int32(),
    "top_k": pl.Int32(),
    "n_tokens": pl.Int64(),
    "sum_entropy": pl.Float64(),
    "sum_top1": pl.Float64(),
    "n_selected": pl.Int64(),
    "sum_lse_sq": pl.Float64(),
    "n_lse": pl.Int64(),
    "n_mismatch": pl.Int64(),
    "n_compared": pl.Int64(),
    "sum_probs": pl.List(pl.Float64()),
    "counts": pl.List(pl.Int64()),
    "top1_counts": pl.List(pl.Int64()),
}

METRICS = [
    "n_tokens",
    "n_experts",
    "top_k",
    "token_entropy",
    "token_entropy_norm",
    "load_entropy",
    "load_entropy_norm",
    "assign_entropy",
    "assign_entropy_norm",
    "mutual_info",
    "max_load_share",
    "max_vio",
    "load_cv",
    "dead_experts",
    "aux_loss",
    "top1_prob",
    "z_loss",
    "selection_mismatch",
]
"""Metric columns of :func:`finish`, in output order (after run, step, layer)."""

SHARES = ["load_share", "mass_share", "top1_share"]
"""Per-expert list columns of :func:`finish`, after the metrics: f_i, P_i and the top-1 share
(``mass_share`` and ``top1_share`` are null without probabilities)."""

PROBABILITY_METRICS = [
    "token_entropy",
    "token_entropy_norm",
    "load_entropy",
    "load_entropy_norm",
    "mutual_info",
    "aux_loss",
    "top1_prob",
    "selection_mismatch",
]
"""Metrics that need probabilities; null for count-only or top-k-id-only data."""

TOWARDS_COLLAPSE = {
    "token_entropy": -1,
    "token_entropy_norm": -1,
    "load_entropy": -1,
    "load_entropy_norm": -1,
    "assign_entropy": -1,
    "assign_entropy_norm": -1,
    "mutual_info": -1,
    "max_load_share": 1,
    "max_vio": 1,
    "load_cv": 1,
    "dead_experts": 1,
    "aux_loss": 1,
    "top1_prob": 1,
    "z_loss": 1,
}
"""The sign of a change towards routing collapse, per metric (-1: lower is worse).

Entropies and mutual information fall as routing concentrates; load share, imbalance, dead
experts, the balancing loss, top-1 confidence and z-loss rise. The metrics a threshold or a
regression tolerance can name (``n_tokens``, ``n_experts`` and ``top_k`` describe the data).
"""

THRESHOLD_METRICS = (*TOWARDS_COLLAPSE, "selection_mismatch", "flip_rate")
"""The metrics a ``min_``/``max_`` threshold can name: those with a direction towards collapse
(which a regression tolerance can also name), and two without one. ``saturation`` is not
among them: it is 1 at the final step by definition, and the ``early_saturation`` rule judges
it where it means something (early in the run)."""

NEEDS: dict[str, str] = {
    "z_loss": "router logits",
    "selection_mismatch": "both probabilities and the selected expert ids",
    "flip_rate": "token positions and an earlier logged step",
    **dict.fromkeys(
        ("token_entropy", "token_entropy_norm", "mutual_info", "top1_prob"),
        "router probabilities or logits",
    ),
}
"""What the data must hold for a metric that is not always known (the others always are)."""

METRIC_RANGES: dict[str, tuple[float, float | None]] = {
    **dict.fromkeys(THRESHOLD_METRICS, (0.0, None)),
    "token_entropy_norm": (0.0, 1.0),
    "load_entropy_norm": (0.0, 1.0),
    "assign_entropy_norm": (0.0, 1.0),
    "max_load_share": (0.0, 1.0),
    "top1_prob": (0.0, 1.0),
    "selection_mismatch": (0.0, 1.0),
    "flip_rate": (0.0, 1.0),
}
"""Values each metric can take whatever E and k (the README's range column, E-free)."""


@dataclass
class Reduced:
    """Statistics of one batch, and per-token top-k choices when token positions are known."""

    stats: pl.DataFrame
    selections: pl.DataFrame | None


def entropy_rows(probs: np.ndarray) -> np.ndarray:
    """H(p_t) = -sum_i p_t,i ln p_t,i per row, with 0 ln 0 = 0 (:func:`token_stats`).

    Examples
    --------
    >>> entropy_rows(np.array([[0.5, 0.5, 0.0]], dtype=np.float32)).round(6)
    array([0.693147])
    """
    return token_stats(probs, 1)[0]


def top_k_ids(probs: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of each row, largest first; ties go to the lower index.

    Examples
    --------
    >>> top_k_ids(np.array([[0.1, 0.6, 0.3]]), 2)
    array([[1, 2]], dtype=int32)
    """
    return token_stats(probs, k, entropy=False)[2]


def token_stats(
    probs: np.ndarray, k: int, *, entropy: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of probabilities: H(p_t) (zeros when ``entropy`` is false), the largest
    probability max_i p_t,i, and the ids of the k largest, largest first, ties to the lower
    index (k >= E orders the whole row).

    One pass of compiled code (``routelog/_native.c``) reads each row once and forms all
    three while it is in the CPU cache, in float32 (the canonical precision; other inputs are
    converted). The entropy's logs agree with numpy's to a few ulp and each row's terms are
    summed in float32 lanes, then in float64: a relative error below 1e-6, checked against
    scipy up to E=256. Zeros are raised to the smallest normal float before the log, so that
    their term is exactly 0 x ln(tiny) = 0. Rows must be finite and non-negative (validated
    probabilities); other values give unspecified results, never an out-of-bounds access.

    Examples
    --------
    >>> h, top1, ids = token_stats(np.array([[0.1, 0.6, 0.3]], dtype=np.float32), 2)
    >>> h.round(4), top1, ids
    (array([0.8979]), array([0.6], dtype=float32), array([[1, 2]], dtype=int32))
    """
    rows = _token_stats(probs, k, entropy=entropy)
    return rows.entropies, rows.top1, rows.ids


class _RowStats(NamedTuple):
    entropies: np.ndarray  # (T,) float64
    top1: np.ndarray  # (T,) float32
    ids: np.ndarray  # (T, k) int32
    sums: np.ndarray | None  # (groups, E) float64, with group ids
    differs: np.ndarray | None  # (T,) bool, with a selection


def _token_stats(
    probs: np.ndarray,
    k: int,
    *,
    entropy: bool = True,
    gid: np.ndarray | None = None,
    n_groups: int = 0,
    selected: np.ndarray | None = None,
) -> _RowStats:
    """:func:`token_stats`; with group ids also the column sums of each group (float64, rows
    added in order), and with a selection (T, ks) of expert ids also whether it differs from
    each row's top ks (:func:`mismatched_rows`): all in the same visit to each row."""
    rows = np.ascontiguousarray(probs, dtype=np.float32)
    n_rows, n_experts = rows.shape
    k = max(1, min(k, n_experts))
    entropies = np.zeros(n_rows, dtype=np.float64)
    top1 = np.empty(n_rows, dtype=np.float32)
    ids = np.empty((n_rows, k), dtype=np.int32)
    groups = None if gid is None else gid.astype(np.int64, copy=False)
    sums = None if gid is None else np.zeros((n_groups, n_experts), dtype=np.float64)
    chosen = None if selected is None else np.ascontiguousarray(selected, dtype=np.int32)
    differs = None if selected is None else np.zeros(n_rows, dtype=np.uint8)
    if n_rows:
        native.token_stats(
            rows, n_experts, k, entropy, entropies, top1, ids, groups, sums, chosen, differs
        )
    return _RowStats(entropies, top1, ids, sums, None if differs is None else differs.view(bool))


def _group_ids(frame: pl.DataFrame) -> tuple[np.ndarray, pl.DataFrame]:
    """Dense ids of the (step, layer, dataset) groups in row order, and the groups."""
    runs = _run_ids(frame)
    if runs is not None:
        return runs
    keys = frame.select(
        pl.col("step").cast(pl.Int64),
        pl.col("layer").cast(pl.Int32),
        (pl.col("dataset") if "dataset" in frame.columns else pl.lit(None))
        .cast(pl.String)
        .alias("dataset"),
    )
    groups = keys.unique(maintain_order=True)
    ids = keys.join(
        groups.with_row_index("gid"), on=KEYS, how="left", nulls_equal=True, maintain_order="left"
    )["gid"].to_numpy()
    return ids.astype(np.int64), groups


def _run_ids(frame: pl.DataFrame) -> tuple[np.ndarray, pl.DataFrame] | None:
    """:func:`_group_ids` of rows that arrive in runs of one (step, layer), each group in
    one run (a log written step by step, layer by layer), from run boundaries alone; None
    when a group comes back after another, or rows carry a dataset or a missing key."""
    if "dataset" in frame.columns or frame.height == 0:
        return None
    if frame["step"].null_count() or frame["layer"].null_count():
        return None
    step = frame["step"].cast(pl.Int64).to_numpy()
    layer = frame["layer"].cast(pl.Int32).to_numpy()
    starts = np.flatnonzero(np.r_[True, (step[1:] != step[:-1]) | (layer[1:] != layer[:-1])])
    keys = np.stack([step[starts], layer[starts].astype(np.int64)], axis=1)
    if len(np.unique(keys, axis=0)) < len(starts):
        return None
    ids = np.repeat(np.arange(len(starts), dtype=np.int64), np.diff(np.r_[starts, len(step)]))
    groups = pl.DataFrame(
        {"step": keys[:, 0], "layer": layer[starts], "dataset": [None] * len(starts)},
        schema={"step": pl.Int64, "layer": pl.Int32, "dataset": pl.String},
    )
    return ids, groups


def _counts(gid: np.ndarray, n_groups: int, ids: np.ndarray, n_experts: int) -> np.ndarray:
    flat = (gid[:, None] * n_experts + ids).ravel()
    counts: np.ndarray = np.bincount(flat, minlength=n_groups * n_experts)
    return counts.reshape(n_groups, n_experts)


def _stats_frame(
    groups: pl.DataFrame, n_experts: int, top_k: int | None, **columns: object
) -> pl.DataFrame:
    n = groups.height
    data: dict[str, object] = {
        "n_experts": np.full(n, n_experts, dtype=np.int32),
        "top_k": [top_k] * n,
        "n_tokens": np.zeros(n, dtype=np.int64),
        "sum_entropy": np.zeros(n),
        "sum_top1": np.zeros(n),
        "n_selected": np.zeros(n, dtype=np.int64),
        "sum_lse_sq": np.zeros(n),
        "n_lse": np.zeros(n, dtype=np.int64),
        "n_mismatch": np.zeros(n, dtype=np.int64),
        "n_compared": np.zeros(n, dtype=np.int64),
        "sum_probs": [None] * n,
        "counts": [None] * n,
        "top1_counts": [None] * n,
    }
    data.update(columns)
    # built from typed series (0.15 ms), not concatenated and cast by a query (0.6 ms a batch)
    keys = [groups[name].cast(STATS_SCHEMA[name]) for name in KEYS]
    return pl.DataFrame(
        keys + [_as_series(name, data[name]) for name in STATS_SCHEMA if name not in KEYS]
    )


def _as_series(name: str, value: Any) -> pl.Series:
    if isinstance(value, np.ndarray) and value.ndim == 2:
        wide: pl.Series = pl.Series(name, value).cast(STATS_SCHEMA[name])
        return wide
    return pl.Series(name, value, dtype=STATS_SCHEMA[name])


def reduce_probs(frame: pl.DataFrame, top_k: int) -> Reduced:
    """Reduce canonical probability rows to statistics per (step, layer, dataset).

    When the frame has a ``topk_ids`` column (the experts the router actually selected),
    counts and per-token selections come from it and ``top_k`` is its width; the top-k of
    the probabilities is only compared with it (``n_mismatch`` of ``n_compared`` tokens).
    """
    probs = frame["probs"].to_numpy()
    n_experts = probs.shape[1]
    gid, groups = _group_ids(frame)
    n_groups = groups.height
    mismatch: dict[str, object] = {}
    if "topk_ids" in frame.columns:
        ids = frame["topk_ids"].to_numpy().astype(np.int32)
        rows = _token_stats(probs, 1, gid=gid, n_groups=n_groups, selected=ids)
        k = ids.shape[1]
        first = rows.ids
        assert rows.differs is not None
        mismatch = {
            "n_mismatch": np.bincount(gid, weights=rows.differs, minlength=n_groups).astype(
                np.int64
            ),
            "n_compared": np.bincount(gid, minlength=n_groups),
        }
    else:
        k = min(top_k, n_experts)
        rows = _token_stats(probs, k, gid=gid, n_groups=n_groups)
        ids = rows.ids
        first = ids[:, :1]
    columns: dict[str, object] = {
        "n_tokens": np.bincount(gid, minlength=n_groups),
        "sum_entropy": np.bincount(gid, weights=rows.entropies, minlength=n_groups),
        "sum_top1": np.bincount(gid, weights=rows.top1, minlength=n_groups),
        "n_selected": np.bincount(gid, minlength=n_groups),
        "sum_probs": rows.sums,
        "counts": _counts(gid, n_groups, ids, n_experts),
        "top1_counts": _counts(gid, n_groups, first, n_experts),
        **mismatch,
    }
    if "logit_lse" in frame.columns:
        lse = frame["logit_lse"].to_numpy().astype(np.float64)
        columns["sum_lse_sq"] = np.bincount(gid, weights=lse * lse, minlength=n_groups)
        columns["n_lse"] = np.bincount(gid, minlength=n_groups)
    stats = _stats_frame(groups, n_experts, k, **columns)
    return Reduced(stats, _selections(frame, ids))


# --- selection vs probabilities -------------------------------------------------------------


def mismatched_rows(probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row: whether the selected ids differ, as a set, from the top-k of the probabilities
    (compiled: ``routelog/_native.c``).

    k is the width of ``ids``. A selection is the top-k when no expert left out has a higher
    probability than one selected, so ties are not a mismatch.

    Examples
    --------
    >>> p = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    >>> mismatched_rows(p, np.array([[1, 0], [2, 0]]))
    array([False,  True])
    """
    differs = _token_stats(probs, 1, entropy=False, selected=ids).differs
    assert differs is not None
    return differs


# --- end selection vs probabilities ---------------------------------------------------------


def reduce_topk(frame: pl.DataFrame, n_experts: int) -> Reduced:
    """Reduce per-token selected expert ids (no probabilities) to count statistics."""
    ids = frame["topk_ids"].to_numpy().astype(np.int64)
    gid, groups = _group_ids(frame)
    n_groups = groups.height
    columns: dict[str, object] = {
        "n_selected": np.bincount(gid, minlength=n_groups),
        "counts": _counts(gid, n_groups, ids, n_experts),
    }
    stats = _stats_frame(groups, n_experts, ids.shape[1], **columns)
    return Reduced(stats, _selections(frame, ids.astype(np.int32)))


def reduce_counts(frame: pl.DataFrame, top_k: int | None = None) -> Reduced:
    """Reduce tokens-per-expert count rows (Megatron-LM style) to statistics."""
    counts = frame["counts"].to_numpy().astype(np.int64)
    gid, groups = _group_ids(frame)
    check_count_total(np.bincount(gid, weights=counts.sum(axis=1, dtype=np.float64)))
    summed = np.zeros((groups.height, counts.shape[1]), dtype=np.int64)
    np.add.at(summed, gid, counts)
    stats = _stats_frame(groups, counts.shape[1], top_k, counts=summed)
    return Reduced(stats, None)


MAX_COUNT_TOTAL = float(1 << 62)
"""Expert counts of one (step, layer) may add up to this; int64 sums would wrap beyond 2^63."""


def check_count_total(totals: np.ndarray) -> None:
    """Refuse count totals (summed in float64, which cannot wrap) that int64 cannot hold."""
    if totals.size and float(np.nanmax(totals)) >= MAX_COUNT_TOTAL:
        raise InputError(
            f"expert counts of one step and layer add up to {float(np.nanmax(totals)):.3g} "
            "tokens, beyond the 2^62 routelog can sum exactly: refusing rather than wrapping"
        )


SELECTION_KEYS: dict[str, pl.DataType] = {
    "step": pl.Int64(),
    "layer": pl.Int32(),
    "dataset": pl.String(),
    "token": pl.Int64(),
}
"""The columns of a selections frame before ``topk`` (Array of Int32, k wide), and their types."""


def _selections(frame: pl.DataFrame, ids: np.ndarray) -> pl.DataFrame | None:
    if "token" not in frame.columns:
        return None
    absent = {} if "dataset" in frame.columns else {"dataset": pl.lit(None)}
    return frame.select(
        absent.get(name, pl.col(name)).cast(dtype).alias(name)
        for name, dtype in SELECTION_KEYS.items()
    ).with_columns(pl.Series("topk", ids))


NO_EXPERT = -1
"""The id that pads a token's top-k ids to a wider selections frame's k (see
:func:`concat_selections`); expert ids are never negative."""


def concat_selections(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Selections frames one after another. Layers (or steps) may select different numbers
    of experts per token; a frame of a smaller k is then padded to the largest k with
    :data:`NO_EXPERT`, which ``routelog.tokens`` cuts off again before comparing.

    Examples
    --------
    >>> one = pl.DataFrame({"topk": [[3]]}, schema={"topk": pl.Array(pl.Int32, 1)})
    >>> two = pl.DataFrame({"topk": [[1, 0]]}, schema={"topk": pl.Array(pl.Int32, 2)})
    >>> concat_selections([one, two])["topk"].to_list()
    [[3, -1], [1, 0]]
    """
    widths = {frame.schema["topk"].size for frame in frames}  # type: ignore[attr-defined]
    if len(widths) > 1:
        k = max(widths)
        frames = [_padded(frame, k) for frame in frames]
    return pl.concat(frames)


def _padded(frame: pl.DataFrame, k: int) -> pl.DataFrame:
    if frame.schema["topk"].size == k:  # type: ignore[attr-defined]
        return frame
    ids = frame["topk"].to_numpy()
    wide = np.full((len(ids), k), NO_EXPERT, dtype=np.int32)
    wide[:, : ids.shape[-1]] = ids
    return frame.with_columns(pl.Series("topk", wide, dtype=pl.Array(pl.Int32, k)))


def pack_selections(frame: pl.DataFrame) -> dict[str, Any]:
    """Selections in a compact form for the wire (a Dask worker's result): (step, layer,
    dataset) as runs; token positions as each run's first when they count up from it (as
    they do in most logs), else as an array; top-k ids as numpy arrays in the narrowest
    exact integer type. At k=2 and up to 256 experts a token takes 2 bytes instead of about
    44, and numpy arrays travel out of band (pickle protocol 5) instead of through a
    serialized frame; :func:`unpack_selections` gives back an equal frame, dtypes included."""
    starts = run_starts(frame, KEYS)
    lengths = np.diff(np.append(starts, frame.height))
    token = frame["token"]
    packed = {
        "runs": {key: frame[key].gather(starts).to_list() for key in KEYS},
        "lengths": lengths,
        "first": None,
        "token": token,  # with nulls: the series itself
        "topk": _narrowest(frame["topk"].to_numpy(), np.uint8, np.uint16, np.int8, np.int16),
        "k": frame.schema["topk"].size,  # type: ignore[attr-defined]
    }
    if token.null_count() == 0:
        positions = token.to_numpy()
        first = positions[starts]
        counting = np.array_equal(positions, _counting(first, lengths))
        packed["first"] = first if counting else None
        packed["token"] = None if counting else _narrowest(positions, np.int32)
    return packed


def unpack_selections(packed: dict[str, Any]) -> pl.DataFrame:
    """The selections frame :func:`pack_selections` was given.

    Runs on the client's event loop for every file a Dask worker sends, so the keys are
    expanded with ``np.repeat`` (a gather of a frame with a string column cost twice as much).
    """
    runs, lengths, k = packed["runs"], packed["lengths"], packed["k"]
    datasets = pl.Series("dataset", runs["dataset"], dtype=pl.String)
    if datasets.null_count() == len(datasets):
        dataset = pl.Series([None], dtype=pl.String).new_from_index(0, int(lengths.sum()))
    else:
        dataset = datasets.gather(np.repeat(np.arange(len(datasets)), lengths))
    token = packed["token"]
    if packed["first"] is not None:
        token = _counting(packed["first"], lengths)
    return pl.DataFrame(
        [
            pl.Series("step", np.repeat(np.asarray(runs["step"], dtype=np.int64), lengths)),
            pl.Series("layer", np.repeat(np.asarray(runs["layer"], dtype=np.int32), lengths)),
            dataset.alias("dataset"),
            pl.Series("token", token, dtype=pl.Int64),
            pl.Series(
                "topk",
                np.asarray(packed["topk"], dtype=np.int32).reshape(-1, k),
                dtype=pl.Array(pl.Int32, k),
            ),
        ]
    )


def first_difference(
    frame: pl.DataFrame, column: str, over: list[str], where: str
) -> tuple[tuple[Any, ...], Any, Any, Any, Any] | None:
    """The first row whose non-null ``column`` differs from the first non-null value of its
    group (``over``), in row order: (the group's keys, its value, its ``where``, the first
    value, the first value's ``where``), or None. ``where`` names a column that locates a
    row (a row number, a file's index). A column of one value returns at once.

    Examples
    --------
    >>> frame = pl.DataFrame({"layer": [0, 1, 0, 0], "k": [2, 1, None, 3], "row": [5, 6, 7, 8]})
    >>> first_difference(frame, "k", ["layer"], "row")
    ((0,), 3, 8, 2, 5)
    """
    values = frame[column]
    if values.min() == values.max():  # nulls ignored (all null: None == None)
        return None
    clash = (
        frame.filter(pl.col(column).is_not_null())
        .select(
            *over,
            column,
            where,
            pl.col(column).first().over(over).alias("__first"),
            pl.col(where).first().over(over).alias("__first_where"),
        )
        .filter(pl.col(column) != pl.col("__first"))
    )
    if clash.height == 0:
        return None
    *group, value, at, first, first_at = clash.row(0)
    return tuple(group), value, at, first, first_at


def run_starts(frame: pl.DataFrame, keys: list[str]) -> np.ndarray:
    """The rows where a run of rows with equal ``keys`` starts (a null equal to a null).

    In numpy: on one file's rows a Polars query costs more than the comparison itself, and
    this runs for every file a Dask worker sends (:func:`pack_selections`,
    :func:`routelog.tokens.token_ranges`).

    Examples
    --------
    >>> frame = pl.DataFrame({"step": [0, 0, 1, 1, 1], "layer": [0, 1, 1, 1, None]})
    >>> run_starts(frame, ["step", "layer"]).tolist()
    [0, 1, 2, 4]
    """
    changed = np.zeros(frame.height, dtype=bool)
    for key in keys:
        changed |= _changes(frame[key])
    return np.flatnonzero(changed)


def _changes(values: pl.Series) -> np.ndarray:
    """Where ``values`` differs from the value before it (null equal to null; the first row
    always)."""
    changed = np.ones(len(values), dtype=bool)
    nulls = values.null_count()
    if nulls == len(values):
        changed[1:] = False
    elif values.dtype.is_integer():
        known = values.fill_null(0).to_numpy() if nulls else values.to_numpy()
        np.not_equal(known[1:], known[:-1], out=changed[1:])
        if nulls:
            missing = values.is_null().to_numpy()
            changed[1:] |= missing[1:] != missing[:-1]
    else:
        changed[1:] = values.ne_missing(values.shift()).to_numpy()[1:]
    return changed


def _counting(first: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Runs of ``lengths`` consecutive integers (int64), each from its ``first``."""
    counted: np.ndarray = np.arange(int(lengths.sum()), dtype=np.int64)
    counted += np.repeat(first.astype(np.int64) - (np.cumsum(lengths) - lengths), lengths)
    return counted


def _narrowest(values: np.ndarray, *narrow: type[np.integer[Any]]) -> np.ndarray:
    """``values`` as the first of the ``narrow`` types that holds every value exactly, else
    unchanged."""
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    for kind in narrow:
        limits = np.iinfo(kind)
        if limits.min <= low and high <= limits.max:
            return values.astype(kind)
    return values


def merge(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """Add up statistics of the same group; vectors (``sum_probs``, ``counts``) elementwise.

    The group is ``run`` (when present), step, layer, dataset, n_experts and top_k. Rows are
    added in their order, so the same parts give the same sums bit for bit.
    """
    frames = [p for p in parts if p.height]
    if not frames:
        return pl.DataFrame(schema=STATS_SCHEMA)
    stats = pl.concat(frames, how="vertical")
    keys = [c for c in ("run", *GROUP) if c in stats.columns]
    if stats.select(keys).is_unique().all():
        return stats
    grouped = stats.with_row_index(_ROW).group_by(keys, maintain_order=True).agg(pl.col(_ROW))
    gid = np.empty(stats.height, dtype=np.int64)
    rows = grouped[_ROW]
    gid[rows.explode().to_numpy()] = np.repeat(
        np.arange(grouped.height), rows.list.len().to_numpy()
    )
    counts = _VectorSums(stats["counts"], gid, grouped.height)
    check_count_total(counts.totals())
    columns = [_scalar_sums(stats[name], gid, grouped.height) for name in SUMS]
    columns += [
        counts.series(),
        _VectorSums(stats["sum_probs"], gid, grouped.height).series(),
        _VectorSums(stats["top1_counts"], gid, grouped.height).series(),
    ]
    return grouped.drop(_ROW).with_columns(columns).select(stats.columns)


def _scalar_sums(column: pl.Series, gid: np.ndarray, n_groups: int) -> pl.Series:
    """Per group, the sum of a number column, added row after row (nulls count as 0)."""
    values = column.fill_null(0).to_numpy()
    sums = np.zeros(n_groups, dtype=values.dtype)
    np.add.at(sums, gid, values)
    return pl.Series(column.name, sums, dtype=column.dtype)


_ROW = "__row"


class _VectorSums:
    """Elementwise sums of a list column per group (``gid``: each row's group); a group
    whose rows are all null stays null. All rows of a group have one length (E is a key).

    The rows' numbers are added with ``np.add.at`` in row order, over the flat values of
    all rows at once (no loop over rows or groups)."""

    def __init__(self, column: pl.Series, gid: np.ndarray, n_groups: int) -> None:
        valid = column.is_not_null().to_numpy()
        lists = column.filter(pl.Series(valid)).to_arrow()
        self.name, self.dtype = column.name, column.dtype
        self.flat = lists.flatten().to_numpy(zero_copy_only=False)
        self.lengths = np.diff(lists.offsets.to_numpy())
        self.gid = gid[valid]
        self.n_groups = n_groups

    def totals(self) -> np.ndarray:
        """Each group's sum of all its numbers, in float64 (which cannot wrap)."""
        per_row = np.bincount(
            np.repeat(np.arange(len(self.lengths)), self.lengths),
            weights=self.flat.astype(np.float64),
            minlength=len(self.lengths),
        )
        return np.bincount(self.gid, weights=per_row, minlength=self.n_groups)

    def series(self) -> pl.Series:
        import pyarrow as pa

        width = np.zeros(self.n_groups, dtype=np.int64)
        width[self.gid] = self.lengths
        present = np.zeros(self.n_groups, dtype=bool)
        present[self.gid] = True
        offsets = np.concatenate([[0], np.cumsum(width)])
        row_starts = np.cumsum(self.lengths) - self.lengths
        within = np.arange(len(self.flat)) - np.repeat(row_starts, self.lengths)
        target = np.repeat(offsets[self.gid], self.lengths) + within
        sums = np.zeros(int(offsets[-1]), dtype=self.flat.dtype)
        np.add.at(sums, target, self.flat)
        lists = pa.LargeListArray.from_arrays(
            pa.array(offsets), pa.array(sums), mask=pa.array(~present)
        )
        series: pl.Series = pl.Series(self.name, lists).cast(self.dtype)
        return series


def entropy(q: np.ndarray) -> np.ndarray:
    """H(q) = -sum_i q_i ln q_i along the last axis, with 0 ln 0 = 0.

    Examples
    --------
    >>> float(entropy(np.array([0.25, 0.25, 0.25, 0.25])).round(6))
    1.386294
    """
    logs = np.zeros_like(q, dtype=np.float64)
    np.log(q, out=logs, where=q > 0)
    values: np.ndarray = 0.0 - (q * logs).sum(axis=-1)  # one expert: 0.0, not -0.0
    return values


def finish(stats: pl.DataFrame, dead_fraction: float = 0.1) -> pl.DataFrame:
    """Turn merged statistics into metrics, one row per group of ``stats``.

    Probability metrics are null where the group has no probability rows (count-only or
    top-k-id-only data); ``z_loss`` is null unless the input carried logits.

    Examples
    --------
    >>> frame = pl.DataFrame({"step": [0, 0], "layer": [0, 0],
    ...     "probs": np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)})
    >>> finish(reduce_probs(frame, top_k=1).stats).select("max_load_share", "dead_experts")
    shape: (1, 2)
    ┌────────────────┬──────────────┐
    │ max_load_share ┆ dead_experts │
    │ ---            ┆ ---          │
    │ f64            ┆ i64          │
    ╞════════════════╪══════════════╡
    │ 0.5            ┆ 0            │
    └────────────────┴──────────────┘
    """
    keys = [c for c in ("run", *KEYS) if c in stats.columns]
    parts = [
        _finish_block(block, dead_fraction, keys)
        for block in stats.partition_by("n_experts", maintain_order=True)
    ]
    if not parts:
        return pl.DataFrame(
            schema={**{k: STATS_SCHEMA.get(k, pl.String()) for k in keys}, **_METRIC_SCHEMA}
        )
    return pl.concat(parts, how="vertical").sort(keys, nulls_last=True)


_METRIC_SCHEMA: dict[str, pl.DataType] = {
    **{name: pl.Float64() for name in METRICS},
    "n_tokens": pl.Int64(),
    "n_experts": pl.Int32(),
    "top_k": pl.Int32(),
    "dead_experts": pl.Int64(),
    "load_share": pl.List(pl.Float64()),
    "mass_share": pl.List(pl.Float64()),
    "top1_share": pl.List(pl.Float64()),
}


def dead_mask(load_share: Any, mass_share: Any = None, dead_fraction: float = 0.1) -> np.ndarray:
    """Which experts are dead: f_i < dead_fraction / E, or P_i < dead_fraction / E.

    The one definition of a dead expert (the ``dead`` column, the heatmap's marks and the
    dead-expert lists call it). ``load_share`` is f (count share) and ``mass_share`` P
    (probability mass share), each of shape (E,) or (rows, E); a mass row that is None or
    NaN (no probabilities: counts or top-k ids only) falls back to the count share alone.
    A row without any count (no tokens) has no dead expert.

    Examples
    --------
    >>> dead_mask([0.5, 0.3, 0.2, 0.0], [0.6, 0.395, 0.004, 0.001], 0.1).tolist()
    [False, False, True, True]
    >>> dead_mask([0.5, 0.5, 0.0, 0.0], None, 0.1).tolist()
    [False, False, True, True]
    """
    counts = np.asarray(load_share, dtype=np.float64)
    single = counts.ndim == 1
    counts = np.atleast_2d(counts)
    n_experts = counts.shape[1]
    limit = dead_fraction / n_experts if n_experts else 0.0
    mass = np.full(counts.shape, np.nan)
    if mass_share is not None:
        rows = [mass_share] if single else list(mass_share)
        mass = np.array(
            [[np.nan] * n_experts if r is None else r for r in rows], dtype=np.float64
        ).reshape(counts.shape)
    with np.errstate(invalid="ignore"):
        dead: np.ndarray = (counts < limit) | (np.isfinite(mass) & (mass < limit))
    dead &= np.isfinite(counts).all(axis=1, keepdims=True)
    out: np.ndarray = dead[0] if single else dead
    return out


def _finish_block(block: pl.DataFrame, dead_fraction: float, keys: list[str]) -> pl.DataFrame:
    n_experts = int(block["n_experts"][0])
    n_tokens = block["n_tokens"].to_numpy().astype(np.float64)
    counts = np.array(block["counts"].to_list(), dtype=np.float64).reshape(block.height, n_experts)
    has_probs = n_tokens > 0
    mean_probs = _vector(block, "sum_probs", n_experts)
    top1 = _vector(block, "top1_counts", n_experts)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_probs /= n_tokens[:, None]
        top1 /= top1.sum(axis=1)[:, None]
        total = counts.sum(axis=1)
        share = counts / total[:, None]
        mean_count = total / n_experts
        log_e = np.log(n_experts) if n_experts > 1 else np.nan
        token_entropy = np.where(has_probs, block["sum_entropy"].to_numpy() / n_tokens, np.nan)
        load_entropy = np.where(has_probs, entropy(np.nan_to_num(mean_probs)), np.nan)
        assign_entropy = np.where(total > 0, entropy(np.nan_to_num(share)), np.nan)
        n_lse = block["n_lse"].to_numpy()
        metrics = {
            "token_entropy": token_entropy,
            "token_entropy_norm": token_entropy / log_e,
            "load_entropy": load_entropy,
            "load_entropy_norm": load_entropy / log_e,
            "assign_entropy": assign_entropy,
            "assign_entropy_norm": assign_entropy / log_e,
            "mutual_info": load_entropy - token_entropy,
            "max_load_share": share.max(axis=1),
            "max_vio": counts.max(axis=1) / mean_count - 1.0,
            "load_cv": counts.std(axis=1) / mean_count,
            "aux_loss": np.where(
                has_probs, n_experts * (counts / n_tokens[:, None] * mean_probs).sum(axis=1), np.nan
            ),
            "top1_prob": np.where(has_probs, block["sum_top1"].to_numpy() / n_tokens, np.nan),
            "z_loss": np.where(n_lse > 0, block["sum_lse_sq"].to_numpy() / n_lse, np.nan),
            "selection_mismatch": block["n_mismatch"].to_numpy() / block["n_compared"].to_numpy(),
        }
    mass = np.where(has_probs[:, None], mean_probs, np.nan)
    dead_rows = dead_mask(share, mass, dead_fraction).sum(axis=1)
    dead = np.where(total > 0, dead_rows, -1)
    out = block.select(keys).with_columns(
        pl.Series("n_tokens", block["n_tokens"]),
        pl.Series("n_experts", block["n_experts"]),
        pl.Series("top_k", block["top_k"]),
        *[
            pl.Series(name, values, dtype=pl.Float64).fill_nan(None)
            for name, values in metrics.items()
        ],
        pl.Series("dead_experts", dead).replace(-1, None),
        pl.Series("load_share", share, dtype=pl.List(pl.Float64)).fill_null([]),
        _share_series("mass_share", mass),
        _share_series("top1_share", top1),
    )
    out = out.with_columns(
        pl.when(pl.col("n_tokens") == 0).then(None).otherwise(pl.col("n_tokens")).alias("n_tokens")
    )
    return out.select(*keys, *METRICS, *SHARES)


def _vector(block: pl.DataFrame, name: str, n_experts: int) -> np.ndarray:
    """A list column as a (rows, E) float array, NaN rows where it is null."""
    rows = block[name].to_list()
    return np.array(
        [row if row is not None else [np.nan] * n_experts for row in rows], dtype=np.float64
    ).reshape(block.height, n_experts)


def _share_series(name: str, values: np.ndarray) -> pl.Series:
    """Per-expert shares as a list column; a row without data (NaN) is null."""
    rows = [None if np.isnan(row).any() else row.tolist() for row in values]
    return pl.Series(name, rows, dtype=pl.List(pl.Float64))


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits along the last axis, in [0, 1].

    JSD(p, q) = H2(m) - (H2(p) + H2(q)) / 2 with m = (p + q) / 2 and H2 the entropy in bits;
    0 for equal distributions, 1 for disjoint supports. (scipy's ``jensenshannon`` returns
    the distance, the square root of this.)

    Examples
    --------
    >>> float(js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])))
    1.0
    >>> float(js_divergence(np.array([0.5, 0.5]), np.array([0.5, 0.5])))
    0.0
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    divergence: np.ndarray = (entropy(m) - (entropy(p) + entropy(q)) / 2) / np.log(2)
    clipped: np.ndarray = np.clip(divergence, 0.0, 1.0)
    return clipped
