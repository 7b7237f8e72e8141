"""Token-level kernels: how two sets of per-token top-k choices relate.

They need the same tokens routed twice (two runs, or two steps of one run) and work on the
``(T, k)`` expert-id arrays of :class:`routelog.kernels.Reduced` selections, row t of both
arrays being the same token. Ids within a row are distinct and sorted largest first, so
column 0 is the top-1 expert. No loop over tokens: numpy over whole arrays.

Definitions (S_t, S'_t: token t's top-k expert sets; a_t, a'_t: its top-1 experts)::

    agreement_top1 = mean_t [a_t == a'_t]
    overlap_topk   = mean_t |S_t ∩ S'_t| / k
    flip_rate(s)   = 1 - agreement_top1(step s, previous logged step)
    saturation(s)  = overlap_topk(step s, the run's final step)     (OLMoE's router saturation)

When the two arrays have different k, both are cut to the smaller k (their first columns
are the top choices, so this compares the top-min(k) sets). So are the steps of a layer
whose k changes between logged steps: its flip rate and saturation compare the top-min(k)
sets of all its steps. (A run whose layers select different numbers of experts holds its
ids padded to the largest k, see :func:`routelog.kernels.concat_selections`; the padding is
cut off here.)
"""

from __future__ import annotations

import numpy as np
import polars as pl

from routelog import kernels

TOKEN_KEYS = ["dataset", "token"]
"""What identifies a routed token within one (step, layer): its dataset and position."""

TOKEN_METRICS_SCHEMA: dict[str, pl.DataType] = {
    "step": pl.Int64(),
    "layer": pl.Int32(),
    "flip_rate": pl.Float64(),
    "saturation": pl.Float64(),
}
"""Extra metric columns of ``analyze``, null when the same tokens are not routed every step."""


def _common_k(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    k = min(a.shape[-1], b.shape[-1])
    return a[..., :k], b[..., :k], k


def agreement_top1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of tokens whose top-1 expert is the same, over the second-to-last axis.

    ``a`` and ``b`` are ``(..., T, k)`` id arrays; the result has shape ``(...)``.

    Examples
    --------
    >>> float(agreement_top1(np.array([[0, 1], [2, 3]]), np.array([[0, 2], [3, 2]])))
    0.5
    """
    same: np.ndarray = (a[..., 0] == b[..., 0]).mean(axis=-1)
    return same


def overlap_topk(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean over tokens of |S_t ∩ S'_t| / k, over the second-to-last axis.

    Ids within a row are distinct, so the number of equal (i, j) pairs of a row is the size
    of the intersection. The pairs are counted column pair by column pair (k is small), over
    whole columns: the sum equals that of a (T, k, k) comparison without building it.

    Examples
    --------
    >>> overlap_topk(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [3, 4]]))
    array(0.75)
    """
    a, b, k = _common_k(a, b)
    shared = sum(
        np.count_nonzero(a[..., i] == b[..., j], axis=-1) for i in range(k) for j in range(k)
    )
    overlap: np.ndarray = np.asarray(shared / a.shape[-2] / k)
    return overlap


def step_series(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``flip_rate`` and ``saturation`` per step of a ``(S, T, k)`` array, steps in order.

    ``flip_rate`` is NaN at the first step (nothing to compare with); ``saturation`` of the
    final step is 1 by definition.

    Examples
    --------
    >>> ids = np.array([[[0, 1], [2, 3]], [[1, 0], [2, 3]], [[1, 0], [2, 4]]])
    >>> flips, saturation = step_series(ids)
    >>> flips.tolist(), saturation.tolist()
    ([nan, 0.5, 0.0], [0.75, 0.75, 1.0])
    """
    flips = np.full(ids.shape[0], np.nan)
    saturation = np.ones(ids.shape[0])
    if ids.shape[0] > 1:
        flips[1:] = 1.0 - agreement_top1(ids[1:], ids[:-1])
        saturation[:-1] = overlap_topk(ids[:-1], ids[-1:])
    return flips, saturation


def same_tokens(a: pl.DataFrame, b: pl.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """Two selections' ``topk`` arrays, row-aligned on (dataset, token), or None.

    None unless both frames hold exactly the same tokens, each once (the same probe batch
    routed twice). Inputs are the selections of one (step, layer) each.
    """
    if a.height == 0 or a.height != b.height:
        return None
    left = a.sort(TOKEN_KEYS, nulls_last=True)
    right = b.sort(TOKEN_KEYS, nulls_last=True)
    keys = left.select(TOKEN_KEYS)
    if not keys.is_unique().all() or not keys.equals(right.select(TOKEN_KEYS)):
        return None
    return _ids(left), _ids(right)


def _ids(selections: pl.DataFrame) -> np.ndarray:
    return _unpadded(selections["topk"].to_numpy())


def _unpadded(ids: np.ndarray) -> np.ndarray:
    """``(..., T, k)`` ids cut to the smallest k of their rows: without the columns that
    pad a smaller k (:data:`routelog.kernels.NO_EXPERT`), unchanged when there are none.

    Examples
    --------
    >>> _unpadded(np.array([[3, -1], [1, 0]])).tolist()
    [[3], [1]]
    """
    padded = ids < 0
    if not padded.any():
        return ids
    k = int(padded.shape[-1] - padded.sum(axis=-1).max())
    return ids[..., :k]


def token_metrics(selections: pl.DataFrame) -> pl.DataFrame:
    """``flip_rate`` and ``saturation`` per (step, layer) of one run's selections.

    A layer gets values only when every logged step routed the same tokens, each once;
    its rows are left out otherwise (the caller's join makes them null).

    Rows arrive as ingest wrote them: in runs of one (step, layer), each file's tokens in the
    file's order, which is usually the same at every step. Then the steps of a layer line up
    as they are, and only their keys are compared (integer arrays); a layer whose steps list
    their tokens in different orders is sorted on its own. Both give the same values, as
    each value is a mean of per-token integers, exact in any order.

    Examples
    --------
    >>> sel = pl.DataFrame({"step": [0, 0, 1, 1], "layer": [0, 0, 0, 0],
    ...     "dataset": [None, None, None, None], "token": [0, 1, 0, 1],
    ...     "topk": [[0], [1], [0], [2]]}, schema_overrides={"layer": pl.Int32,
    ...     "dataset": pl.String, "topk": pl.Array(pl.Int32, 1)})
    >>> token_metrics(sel)
    shape: (2, 4)
    ┌──────┬───────┬───────────┬────────────┐
    │ step ┆ layer ┆ flip_rate ┆ saturation │
    │ ---  ┆ ---   ┆ ---       ┆ ---        │
    │ i64  ┆ i32   ┆ f64       ┆ f64        │
    ╞══════╪═══════╪═══════════╪════════════╡
    │ 0    ┆ 0     ┆ null      ┆ 0.5        │
    │ 1    ┆ 0     ┆ 0.5       ┆ 1.0        │
    └──────┴───────┴───────────┴────────────┘
    """
    if selections.height == 0:
        return pl.DataFrame(schema=TOKEN_METRICS_SCHEMA)
    if any(selections[name].null_count() for name in ("step", "layer", "token")):
        return _sorted_token_metrics(selections)
    dataset = selections["dataset"]
    named = dataset.null_count() < selections.height
    start, stop = _runs(selections)
    run_step = selections["step"].gather(start).to_numpy()
    run_layer = selections["layer"].gather(start).to_numpy()
    order = None
    token: np.ndarray | pl.Series = selections["token"]
    ids: np.ndarray | pl.Series = selections["topk"]
    if _pairs_repeat(run_step, run_layer):
        # A (step, layer) in several runs (several files of one step, or rows token by
        # token): gather each one's rows by a stable integer sort, keeping their order.
        # Layers where a (step, layer) has more rows than token positions repeat a token:
        # they are left out before sorting.
        step, layer = selections["step"].to_numpy(), selections["layer"].to_numpy()
        keep = np.ones(len(step), dtype=bool)
        if not named:
            positions = selections.select(pl.col("token").max() - pl.col("token").min() + 1)
            crowded = _crowded_layers(run_step, run_layer, stop - start, int(positions.item()))
            if np.isin(run_layer, crowded).all():
                return _concat([])
            if crowded.size:
                keep = ~np.isin(layer, crowded)
        order = np.flatnonzero(keep)[np.lexsort((step[keep], layer[keep]))]
        sorted_rows = selections[order]
        dataset = sorted_rows["dataset"]
        start, stop = _runs(sorted_rows)
        run_step = sorted_rows["step"].gather(start).to_numpy()
        run_layer = sorted_rows["layer"].gather(start).to_numpy()
        token, ids = sorted_rows["token"].to_numpy(), sorted_rows["topk"].to_numpy()

    def rows_of(column: np.ndarray | pl.Series, s: int, n: int) -> np.ndarray:
        if isinstance(column, np.ndarray):
            return column[s : s + n]
        part: np.ndarray = column.slice(s, n).to_numpy()
        return part

    parts: list[pl.DataFrame] = []
    for this_layer in np.unique(run_layer):
        mine = np.flatnonzero(run_layer == this_layer)
        mine = mine[np.argsort(run_step[mine], kind="stable")]
        first, n_tokens = int(start[mine[0]]), int(stop[mine[0]] - start[mine[0]])
        if np.any(stop[mine] - start[mine] != n_tokens):
            continue  # not the same number of tokens every step
        keys = rows_of(token, first, n_tokens)
        firsts = dataset.slice(first, n_tokens)
        in_order = all(
            np.array_equal(rows_of(token, s, n_tokens), keys)
            and (not named or dataset.slice(s, n_tokens).equals(firsts))
            for s in start[mine[1:]].tolist()
        )
        if not in_order:
            rows = np.concatenate([np.arange(s, s + n_tokens) for s in start[mine].tolist()])
            taken = order[rows] if order is not None else rows
            parts.append(_sorted_token_metrics(selections[taken]))
            continue
        if not _unique(keys, firsts if named else None):
            continue
        stacked = np.stack([rows_of(ids, s, n_tokens) for s in start[mine].tolist()])
        parts.append(_layer_frame(run_step[mine], this_layer, _unpadded(stacked)))
    return _concat(parts)


def token_ranges(selections: pl.DataFrame) -> pl.DataFrame:
    """The first and last token position (``lo``, ``hi``) per (step, layer, dataset) of one
    file's selections, in the order the groups first appear (null where a group has no
    position): enough to tell whether two files log the same tokens.

    Rows come in runs of one (step, layer, dataset): each run's minimum and maximum are
    taken in numpy (``reduceat``), and only the few runs are grouped (a group may be in
    several). A group-by over every row took 0.9 ms of a 50k-token file, on the Dask
    worker that sends it or, locally, in the serial end of an analysis.

    Examples
    --------
    >>> sel = pl.DataFrame({"step": [0, 0, 0, 0], "layer": [0, 0, 1, 0],
    ...     "dataset": [None, None, None, None], "token": [5, 3, 4, 9]},
    ...     schema_overrides={"layer": pl.Int32, "dataset": pl.String})
    >>> token_ranges(sel).rows()
    [(0, 0, None, 3, 9), (0, 1, None, 4, 4)]
    """
    if selections.height == 0:
        return selections.select(
            *kernels.KEYS, pl.col("token").alias("lo"), pl.col("token").alias("hi")
        )
    starts = kernels.run_starts(selections, kernels.KEYS)
    token = selections["token"]
    if token.null_count():
        limits = np.iinfo(np.int64)
        low = np.minimum.reduceat(token.fill_null(limits.max).to_numpy(), starts)
        high = np.maximum.reduceat(token.fill_null(limits.min).to_numpy(), starts)
        unknown = np.flatnonzero(np.add.reduceat(token.is_not_null().to_numpy(), starts) == 0)
        lo = pl.Series("lo", low).scatter(unknown, None)
        hi = pl.Series("hi", high).scatter(unknown, None)
    else:
        positions = token.to_numpy()
        lo = pl.Series("lo", np.minimum.reduceat(positions, starts))
        hi = pl.Series("hi", np.maximum.reduceat(positions, starts))
    keys = [selections[key].gather(starts) for key in kernels.KEYS]
    runs = pl.DataFrame([*keys, lo, hi])
    if len(set(zip(*(key.to_list() for key in keys), strict=True))) == runs.height:
        return runs  # each group in one run, as files are mostly written
    return runs.group_by(kernels.KEYS, maintain_order=True).agg(
        pl.col("lo").min(), pl.col("hi").max()
    )


def _runs(selections: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop of each run of consecutive rows of one (step, layer)."""
    changed = (pl.col("step") != pl.col("step").shift()) | (
        pl.col("layer") != pl.col("layer").shift()
    )
    start = selections.select(changed.fill_null(True).arg_true()).to_series().to_numpy()
    return start, np.append(start[1:], selections.height)


def _pairs_repeat(step: np.ndarray, layer: np.ndarray) -> bool:
    """Whether some (step, layer) pair occurs more than once."""
    order = np.lexsort((step, layer))
    step, layer = step[order], layer[order]
    return bool(np.any((step[1:] == step[:-1]) & (layer[1:] == layer[:-1])))


def _crowded_layers(
    step: np.ndarray, layer: np.ndarray, rows: np.ndarray, positions: int
) -> np.ndarray:
    """Layers with a (step, layer) of more rows than there are token ``positions``;
    ``step``, ``layer``, ``rows`` describe runs of rows, a (step, layer) maybe in several."""
    pairs, which = np.unique(np.stack([layer, step]), axis=1, return_inverse=True)
    per_pair = np.bincount(which.ravel(), weights=rows)
    crowded: np.ndarray = np.unique(pairs[0][per_pair > positions])
    return crowded


def _unique(token: np.ndarray, dataset: pl.Series | None) -> bool:
    """Whether no (dataset, token) occurs twice (``dataset`` None: all null)."""
    if dataset is not None:
        return bool(pl.DataFrame([dataset, pl.Series("token", token)]).is_unique().all())
    if np.all(token[1:] > token[:-1]):
        return True
    low, span = token.min(), int(token.max() - token.min()) + 1
    if span < len(token):
        return False  # more tokens than positions
    if span <= 4 * len(token):
        return bool(np.bincount(token - low, minlength=span).max() <= 1)
    return bool(np.unique(token).size == len(token))


def _sorted_token_metrics(selections: pl.DataFrame) -> pl.DataFrame:
    """``token_metrics`` by sorting every layer's rows by step and token, then comparing."""
    parts = []
    for layer_rows in selections.sort("layer", "step", *TOKEN_KEYS, nulls_last=True).partition_by(
        "layer", maintain_order=True
    ):
        steps = layer_rows["step"].unique(maintain_order=True)
        n_tokens = layer_rows.height // len(steps)
        if n_tokens * len(steps) != layer_rows.height:
            continue
        keys = layer_rows.select(TOKEN_KEYS)
        first = keys.head(n_tokens)
        if not first.is_unique().all() or not keys.equals(pl.concat([first] * len(steps))):
            continue
        ids = _ids(layer_rows)
        stacked = ids.reshape(len(steps), n_tokens, ids.shape[-1])
        parts.append(_layer_frame(steps.to_numpy(), layer_rows["layer"][0], stacked))
    return _concat(parts)


def _layer_frame(steps: np.ndarray, layer: object, ids: np.ndarray) -> pl.DataFrame:
    """One layer's rows from its ``(S, T, k)`` ids, steps in order (no flip rate: null)."""
    flips, saturation = step_series(ids)
    columns = [
        pl.Series("step", steps),
        pl.Series("layer", [layer] * len(steps)),
        pl.Series("flip_rate", flips, nan_to_null=True),
        pl.Series("saturation", saturation),
    ]
    return pl.DataFrame(
        [c.cast(dtype) for c, dtype in zip(columns, TOKEN_METRICS_SCHEMA.values(), strict=True)]
    )


def _concat(parts: list[pl.DataFrame]) -> pl.DataFrame:
    if not parts:
        return pl.DataFrame(schema=TOKEN_METRICS_SCHEMA)
    return pl.concat(parts)
