"""Each expert over time: per-expert, per-step shares, and which experts are dead since when.

The layer table says *how many* experts a layer leaves without tokens; this module says
*which*, and from which step. Everything is computed from the metrics frame of
:func:`routelog.api.metrics_of` (its ``load_share`` and ``mass_share`` lists per run x step x
layer), as one (steps x E)
matrix per run and layer: vectorized numpy, one small block per layer. The dead rule is
:func:`routelog.kernels.dead_mask`, the one that ``dead_experts`` counts.

Definitions (per run, layer and step; f_i the count share, P_i the mean probability)::

    load_share  = f_i = c_i / sum_j c_j          mass_share = P_i = mean_t p_t,i
    dead        = kernels.dead_mask(f_i, P_i, dead_fraction)
    dead_since  = first step of the expert's last unbroken streak of dead steps, when that
                  streak reaches the layer's latest step (else null: the expert is alive)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from routelog import kernels

if TYPE_CHECKING:
    pass

SCHEMA: dict[str, pl.DataType] = {
    "run": pl.String(),
    "layer": pl.Int32(),
    "step": pl.Int64(),
    "expert": pl.Int32(),
    "n_experts": pl.Int32(),
    "load_share": pl.Float64(),
    "mass_share": pl.Float64(),
    "dead": pl.Boolean(),
}
"""Columns of :func:`shares_frame` (one row per run x layer x step x expert)."""

DEAD_SCHEMA: dict[str, pl.DataType] = {
    "run": pl.String(),
    "layer": pl.Int32(),
    "expert": pl.Int32(),
    "since_step": pl.Int64(),
    "step": pl.Int64(),
    "load_share": pl.Float64(),
}
"""Columns of :func:`dead_experts`."""


@dataclass(frozen=True)
class LayerHistory:
    """One layer of one run over its logged steps: (steps x E) matrices.

    ``mass`` is None when no step of the layer has probabilities; rows of ``mass`` for steps
    without probabilities are NaN. ``dead_since`` holds, per expert, the first step of its
    final dead streak, or -1 for an expert alive at the latest step.
    """

    run: str
    layer: int
    steps: np.ndarray
    load: np.ndarray
    mass: np.ndarray | None
    dead: np.ndarray
    dead_since: np.ndarray

    @property
    def n_experts(self) -> int:
        return int(self.load.shape[1])


def dead_since(dead: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per expert (column), the first step of its final dead streak, or -1 if alive at the end.

    Examples
    --------
    >>> dead = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [1, 1]], dtype=bool)
    >>> dead_since(dead, np.array([0, 10, 20, 30, 40])).tolist()
    [30, 20]
    """
    n_steps = dead.shape[0]
    alive = ~dead
    # index of the last alive step per column (-1 when never alive)
    last_alive = np.where(alive.any(axis=0), n_steps - 1 - np.argmax(alive[::-1], axis=0), -1)
    start = last_alive + 1
    since: np.ndarray = np.where(dead[-1], steps[np.minimum(start, n_steps - 1)], -1).astype(
        np.int64
    )
    return since


def histories(metrics: pl.DataFrame, dead_fraction: float = 0.1) -> list[LayerHistory]:
    """One :class:`LayerHistory` per run and layer of ``metrics``, in (run, layer) order."""
    if metrics.height == 0 or "load_share" not in metrics.columns:
        return []
    frame = metrics.filter(pl.col("load_share").list.len() > 0).sort("run", "layer", "step")
    out = []
    for (run, layer), block in frame.group_by("run", "layer", maintain_order=True):
        n_experts = int(block["n_experts"][0])
        load = block["load_share"].list.to_array(n_experts).to_numpy().astype(np.float64)
        steps = block["step"].to_numpy().astype(np.int64)
        matrix = _mass_matrix(block, load.shape)
        dead = np.asarray(kernels.dead_mask(load, matrix, dead_fraction), dtype=bool)
        out.append(
            LayerHistory(
                run=str(run),
                layer=int(layer),
                steps=steps,
                load=load,
                mass=matrix,
                dead=dead,
                dead_since=dead_since(dead, steps),
            )
        )
    return out


def _mass_matrix(block: pl.DataFrame, shape: tuple[int, ...]) -> np.ndarray | None:
    """P_i per step (rows) and expert, NaN where a step has no probabilities; None when no
    step has any (count-only or top-k-id logs)."""
    if "mass_share" not in block.columns or block["mass_share"].null_count() == block.height:
        return None
    matrix = np.full(shape, np.nan)
    for position, row in enumerate(block["mass_share"].to_list()):  # one row per step
        if row is not None and len(row) == shape[1]:
            matrix[position] = row
    return matrix


def shares_frame(history: Iterable[LayerHistory]) -> pl.DataFrame:
    """One row per run x layer x step x expert (:data:`SCHEMA`), e.g. for CSV.

    Examples
    --------
    >>> metrics = pl.DataFrame({"run": ["r", "r"], "step": [0, 1], "layer": [0, 0],
    ...     "n_experts": [2, 2], "load_share": [[0.5, 0.5], [1.0, 0.0]]})
    >>> shares_frame(histories(metrics)).select("step", "expert", "load_share", "dead")
    shape: (4, 4)
    ┌──────┬────────┬────────────┬───────┐
    │ step ┆ expert ┆ load_share ┆ dead  │
    │ ---  ┆ ---    ┆ ---        ┆ ---   │
    │ i64  ┆ i32    ┆ f64        ┆ bool  │
    ╞══════╪════════╪════════════╪═══════╡
    │ 0    ┆ 0      ┆ 0.5        ┆ false │
    │ 0    ┆ 1      ┆ 0.5        ┆ false │
    │ 1    ┆ 0      ┆ 1.0        ┆ false │
    │ 1    ┆ 1      ┆ 0.0        ┆ true  │
    └──────┴────────┴────────────┴───────┘
    """
    parts = []
    for h in history:
        n_steps, n_experts = h.load.shape
        mass = h.mass if h.mass is not None else np.full(h.load.shape, np.nan)
        parts.append(
            pl.DataFrame(
                {
                    "run": [h.run] * (n_steps * n_experts),
                    "layer": np.full(n_steps * n_experts, h.layer, dtype=np.int32),
                    "step": np.repeat(h.steps, n_experts),
                    "expert": np.tile(np.arange(n_experts, dtype=np.int32), n_steps),
                    "n_experts": np.full(n_steps * n_experts, n_experts, dtype=np.int32),
                    "load_share": h.load.ravel(),
                    "mass_share": mass.ravel(),
                    "dead": h.dead.ravel(),
                }
            ).with_columns(pl.col("mass_share").fill_nan(None))
        )
    if not parts:
        return pl.DataFrame(schema=SCHEMA)
    return pl.concat(parts).cast(SCHEMA)  # type: ignore[arg-type]


def dead_experts(history: Iterable[LayerHistory]) -> pl.DataFrame:
    """The experts dead at their layer's latest step, and since which step (:data:`DEAD_SCHEMA`).

    This is the one place that lists dead experts: findings, JSON and every report use it.

    Examples
    --------
    >>> metrics = pl.DataFrame({"run": ["r"] * 3, "step": [0, 1, 2], "layer": [0] * 3,
    ...     "n_experts": [2] * 3, "load_share": [[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]})
    >>> dead_experts(histories(metrics)).select("layer", "expert", "since_step").rows()
    [(0, 1, 1)]
    """
    rows = []
    for h in history:
        for expert in np.flatnonzero(h.dead_since >= 0).tolist():
            rows.append(
                (
                    h.run,
                    h.layer,
                    expert,
                    int(h.dead_since[expert]),
                    int(h.steps[-1]),
                    float(h.load[-1, expert]),
                )
            )
    return pl.DataFrame(rows, schema=DEAD_SCHEMA, orient="row")


def dead_at(
    metrics: pl.DataFrame, run: str, layer: int, step: int, dead_fraction: float
) -> list[dict[str, int]]:
    """The experts of one layer dead at ``step``, with the step each one died."""
    block = metrics.filter(
        (pl.col("run") == run) & (pl.col("layer") == layer) & (pl.col("step") <= step)
    )
    return [
        {"expert": expert, "since_step": since}
        for expert, since in dead_experts(histories(block, dead_fraction=dead_fraction))
        .select("expert", "since_step")
        .iter_rows()
    ]
