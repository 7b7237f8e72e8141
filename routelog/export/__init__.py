"""Export: routing metrics and findings to where training is watched (TensorBoard, W&B).

Each destination is a room of its own (``tensorboard.py``, ``wandb.py``), imported only by
``routelog export`` and behind :func:`routelog.extras.require`. What they write is the same:
:func:`scalars` (every metric of every layer at its step, tagged
``routing/layer_03/token_entropy_norm``) and :func:`findings_markdown`. Both export
incrementally: only steps after the last one exported (remembered per destination) are
written, so ``routelog export`` can run after each ``watch`` round or from cron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

    from routelog.findings import Finding

PREFIX = "routing"
SKIP = {"run", "step", "layer", "load_share", "n_experts", "top_k"}
"""Columns of the metrics frame that are not exported as scalars (keys, lists, constants)."""


def tag(layer: int, metric: str) -> str:
    """``routing/layer_03/token_entropy_norm``.

    Examples
    --------
    >>> tag(3, "token_entropy_norm")
    'routing/layer_03/token_entropy_norm'
    """
    return f"{PREFIX}/layer_{layer:02d}/{metric}"


@dataclass(frozen=True)
class Exported:
    """What one export wrote: new steps, scalars, their span, and where (file or run id)."""

    steps: int
    scalars: int
    first_step: int | None
    last_step: int | None
    where: str | None

    def describe(self) -> str:
        """``12 new steps (steps 0–1100), 672 scalars`` or ``up to date, no new step``."""
        if not self.steps:
            return "up to date, no new step"
        if self.steps == 1:
            return f"1 new step (step {self.first_step}), {self.scalars:,} scalars"
        return (
            f"{self.steps} new steps (steps {self.first_step}–{self.last_step}), "
            f"{self.scalars:,} scalars"
        )


@dataclass(frozen=True)
class Scalars:
    """Scalars to write: ``steps[i]`` with ``values[i]``, a mapping tag -> value."""

    steps: list[int]
    values: list[dict[str, float]]


def scalars(metrics: pl.DataFrame, after: int | None = None) -> Scalars:
    """Every numeric metric of every layer, per step, for steps after ``after``; nulls are
    left out (a metric that needs probabilities on count-only data, say)."""
    import polars as pl

    frame = metrics if after is None else metrics.filter(pl.col("step") > after)
    names = [
        name for name, dtype in frame.schema.items() if name not in SKIP and dtype.is_numeric()
    ]
    steps: list[int] = []
    values: list[dict[str, float]] = []
    for (step,), block in frame.sort("step", "layer").group_by("step", maintain_order=True):
        row: dict[str, float] = {}
        for record in block.select("layer", *names).iter_rows(named=True):
            for name in names:
                value = record[name]
                if value is not None and value == value:
                    row[tag(record["layer"], name)] = float(value)
        steps.append(int(step))
        values.append(row)
    return Scalars(steps, values)


def findings_markdown(findings: list[Finding]) -> str:
    """The findings as a Markdown list (TensorBoard's text plugin and W&B render it)."""
    if not findings:
        return "no findings on any layer"
    from routelog.render.markdown import inline
    from routelog.render.report import finding_span

    return "\n".join(
        f"- **{f.status.upper()}** `{f.code}` layer {f.layer} "
        f"({finding_span(f, ', still holds')}): {inline(f.message)}"
        for f in findings
    )
