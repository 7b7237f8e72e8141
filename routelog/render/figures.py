"""``routelog plot``: publication-quality figures with matplotlib (the ``plot`` extra).

Two kinds of panel per layer: entropy over steps (token, load and assignment entropy,
normalised, with the rigidity and collapse thresholds) and expert load over steps (an
expert x step heatmap of the share relative to the fair share 1/E). Colours, the heatmap
scale and the thresholds are those of the HTML report (:mod:`routelog.render.palette`), so a
figure in a paper and the report of the same run read the same way.

Only ``matplotlib.figure.Figure`` is used (no pyplot, no global state, no GUI backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routelog.errors import UsageError
from routelog.extras import require
from routelog.render import palette

if TYPE_CHECKING:
    import polars as pl

    from routelog.api import Analysis
    from routelog.experts import LayerHistory

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
KINDS = ("both", "entropy", "experts")
PANEL = (3.4, 2.4)  # inches per panel: a two-column paper figure holds two across


def figure_format(path: Path) -> str:
    """The image format from the file's suffix (png, svg or pdf)."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: routelog plot writes .png, .svg or .pdf, not {path.suffix!r}")
    return fmt


def matplotlib_figure() -> Any:
    """matplotlib's Figure class, or a one-line error naming the extra to install."""
    require("matplotlib", "plot", "routelog plot")
    from matplotlib.figure import Figure

    return Figure


def draw(
    analysis: Analysis,
    *,
    kind: str = "both",
    layers: list[int] | None = None,
    run: str | None = None,
) -> Any:
    """One figure of ``kind`` panels for ``layers`` (default: every layer) of one run.

    ``both``: one row per layer, entropy left and expert load right; ``entropy`` or
    ``experts``: a grid of that panel, one per layer.
    """
    figure_class = matplotlib_figure()
    name = run or analysis.runs[0].name
    metrics = analysis.metrics.filter(analysis.metrics["run"] == name)
    history = {h.layer: h for h in analysis.expert_histories() if h.run == name}
    present = sorted(set(metrics["layer"].to_list()))
    chosen = present if layers is None else [layer for layer in layers if layer in present]
    if not chosen:
        raise UsageError(f"no such layer in run {name}: it has {', '.join(map(str, present))}")
    if kind == "both":
        rows, cols = len(chosen), 2
        panels = [(layer, k) for layer in chosen for k in ("entropy", "experts")]
    else:
        cols = min(len(chosen), 4)
        rows = math.ceil(len(chosen) / cols)
        panels = [(layer, kind) for layer in chosen]
    fig = figure_class(figsize=(PANEL[0] * cols, PANEL[1] * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    thresholds = analysis.config.thresholds
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_axis_off()
            continue
        layer, panel = panels[index]
        if panel == "entropy":
            _entropy_panel(ax, metrics.filter(metrics["layer"] == layer), layer, thresholds)
        else:
            _experts_panel(ax, history[layer])
    fig.suptitle(f"routing of {name}", fontsize=11)
    _legend(fig, axes, kinds={k for _, k in panels})
    return fig


def _legend(fig: Any, axes: Any, kinds: set[str]) -> None:
    """One legend under the panels: entropy lines and thresholds, and the heatmap's key."""
    from matplotlib.patches import Patch

    handles: list[Any] = []
    if "entropy" in kinds:
        handles, _ = next(a for a in axes.flat if a.lines).get_legend_handles_labels()
    if "experts" in kinds:
        handles += [
            Patch(color=palette.hex_rgb_float(palette.lut()[2 + 63]), label="expert at fair share"),
            Patch(
                color=palette.hex_rgb_float(palette.WARN), label=f"> {palette.HOT_RATIO:g}x fair"
            ),
            Patch(color=palette.hex_rgb_float(palette.FAIL), label="dead"),
        ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 5),
        fontsize=7,
        frameon=False,
    )


def _entropy_panel(ax: Any, block: pl.DataFrame, layer: int, thresholds: Any) -> None:
    block = block.sort("step")
    steps = block["step"].to_list()
    for index, (column, label) in enumerate(
        (
            ("token_entropy_norm", "token"),
            ("load_entropy_norm", "load"),
            ("assign_entropy_norm", "assignment"),
        )
    ):
        values = block[column].to_list()
        points = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
        if points:
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=palette.layer_color(index),
                linewidth=1.4,
                label=label,
            )
    for label, value in (
        ("rigidity warn", thresholds.rigidity_warn),
        ("rigidity fail", thresholds.rigidity_fail),
        ("collapse", thresholds.collapse_entropy),
    ):
        ax.axhline(
            value,
            color=palette.threshold_color(label),
            linestyle=(0, (4, 3)),
            linewidth=0.9,
            label=f"{label} {value:g}",
        )
    ax.set_ylim(0, 1.02)
    ax.set_title(f"layer {layer}: entropy (normalised)", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(color=palette.GRID, linewidth=0.6)


def _experts_panel(ax: Any, h: LayerHistory) -> None:
    import numpy as np

    steps = h.steps.tolist()
    n_experts = h.n_experts
    colors = np.array([palette.hex_rgb(c) for c in palette.lut()], dtype=np.uint8)
    image = colors[palette.cell_codes((h.load * n_experts).T, h.dead.T)]
    ax.imshow(
        image,
        aspect="auto",
        interpolation="nearest",
        origin="lower",
        extent=(-0.5, len(steps) - 0.5, -0.5, n_experts - 0.5),
    )
    ticks = sorted({0, len(steps) // 2, len(steps) - 1})
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_title(f"layer {h.layer}: load per expert (x fair share)", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("expert", fontsize=8)
    ax.tick_params(labelsize=7)


def save(fig: Any, path: Path, *, dpi: int = 200) -> None:
    """Write ``fig`` to ``path`` in the format of its suffix."""
    fmt = figure_format(path)
    try:
        fig.savefig(path, format=fmt, dpi=dpi, metadata={"Creator": "routelog"})
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the figure: {exc.strerror}") from None


def per_layer_path(path: Path, layer: int) -> Path:
    """``fig.png`` -> ``fig_layer03.png``: one file per layer with ``--per-layer``."""
    return path.with_name(f"{path.stem}_layer{layer:02d}{path.suffix}")
