"""The ``compare`` report: one table row per layer and run, deltas marked by direction.

A change towards collapse (entropy down, max share or dead experts up) is red and marked
``✗``; a change away from it is green and marked ``✓``; so the table reads without colour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routelog import __version__
from routelog.compare import COMPARED
from routelog.kernels import TOWARDS_COLLAPSE
from routelog.render.data import records
from routelog.render.markdown import inline
from routelog.render.report import k_markup, with_k_columns
from routelog.render.text import fmt, signed

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from routelog.compare import Comparison

NEGLIGIBLE = 0.01
"""Deltas of normalised metrics smaller than this are shown without a direction mark."""

HEADERS = {
    "token_entropy_norm": "H_token",
    "load_entropy_norm": "H_load",
    "max_load_share": "max share",
    "dead_experts": "dead",
}

CAPTION = (
    "Δ = {by} - baseline: ✗ towards collapse, ✓ away from it; entropies normalised by ln E; "
    "JSD: expert load f vs the baseline (bits, 0–1)"
)
TOKEN_CAPTION = "; agree@1, overlap@k: the same tokens' top-1 and top-k choices"
TOKEN_COLUMNS = {"agreement_top1": "agree@1", "overlap_topk": "overlap@k"}
"""Shown only when some compared row has a value (the same tokens were routed in both)."""


def _after_deltas(comparison: Comparison) -> dict[str, str]:
    """The columns after the deltas, field -> header: JSD, and the token columns when some
    compared row has a value in them."""
    import polars as pl

    compared = comparison.table.filter(pl.col("run") != pl.col("baseline"))
    tokens = any(compared[name].null_count() < compared.height for name in TOKEN_COLUMNS)
    return {"jsd": "JSD", **(TOKEN_COLUMNS if tokens else {})}


def _caption(comparison: Comparison, after: dict[str, str]) -> str:
    tokens = TOKEN_CAPTION if set(TOKEN_COLUMNS) <= set(after) else ""
    return CAPTION.format(by=comparison.by) + tokens


def comparison_document(comparison: Comparison) -> dict[str, Any]:
    """The JSON document of ``compare --format json``."""
    return {
        "routelog_version": __version__,
        "by": comparison.by,
        "baseline": comparison.baseline,
        "align": comparison.align,
        "runs": [run.summary() for run in comparison.runs],
        "groups": [group.to_dict() for group in comparison.groups],
        "comparisons": records(comparison.table),
        "left_out": [item.to_dict() for item in comparison.left_out],
        "findings": [finding.to_dict() for finding in comparison.findings],
    }


def comparison_csv(comparison: Comparison) -> str:
    """``compare --format csv``: the table, with each row's ``top_k_assumed``."""
    from routelog.render.data import to_csv

    return to_csv(with_k_columns(comparison.table, comparison.runs, after="n_experts"))


def direction(metric: str, delta: float | int | None) -> int:
    """+1 towards collapse, -1 away from it, 0 for no (or a negligible) change.

    Examples
    --------
    >>> direction("token_entropy_norm", -0.2), direction("dead_experts", -1)
    (1, -1)
    """
    if delta is None:
        return 0
    limit = 0 if metric == "dead_experts" else NEGLIGIBLE
    signed = delta * TOWARDS_COLLAPSE[metric]
    return 1 if signed > limit else -1 if signed < -limit else 0


def delta_text(metric: str, delta: float | int | None) -> str:
    """A signed delta with its mark: ``-0.601 ✗``, ``+2 ✗``, ``+0.020 ✓``, ``+0.001``.

    Examples
    --------
    >>> delta_text("max_load_share", 0.356), delta_text("dead_experts", 0)
    ('+0.356 ✗', '+0')
    """
    if delta is None:
        return ""
    number = signed(delta)
    mark = {1: " ✗", -1: " ✓", 0: ""}[direction(metric, delta)]
    return number + mark


def _title(comparison: Comparison, *, markdown: bool = False) -> list[str]:
    """The header lines: rich markup, or Markdown (``markdown``) for :func:`to_markdown`."""
    from rich.markup import escape

    from routelog.render.markdown import inline
    from routelog.render.report import k_plain

    def name(text: str) -> str:
        return f"**{inline(text)}**" if markdown else f"[bold]{escape(text)}[/bold]"

    def k(summary: dict[str, Any]) -> str:
        if not markdown:
            return k_markup(summary)
        text = inline(k_plain(summary))
        return f"**{text}**" if summary.get("top_k_assumed") else text

    what = "dataset" if comparison.by == "dataset" else "run"
    lines = []
    summaries = {run.name: run.summary() for run in comparison.runs}
    if comparison.by == "dataset":
        summary = summaries[comparison.runs[0].name]
        lines.append(f"{name(comparison.runs[0].name)}: datasets compared · {k(summary)}")
    for group in comparison.groups:
        span = (
            f"steps {group.steps[0]}–{group.steps[-1]} ({len(group.steps)} logged)"
            if len(group.steps) > 1
            else f"step {group.steps[0]}"
        )
        role = "baseline" if group.name == comparison.baseline else what
        known = group.name in summaries
        shown_k = f" · {k(summaries[group.name])}" if known else ""
        lines.append(f"{role} {name(group.name)}  {span} · compared at step {group.step}{shown_k}")
    how = (
        "each at its latest logged step at or before the baseline's"
        if comparison.align == "nearest"
        else "the same step in every " + what
    )
    lines.append(f"aligned: {how}" if markdown else f"[dim]aligned: {how}[/dim]")
    return lines


def print_comparison(comparison: Comparison, console: Console, *, plot: bool = False) -> None:
    """Header, side-by-side table, what was left out, findings, and (``plot``) charts."""
    from rich.markup import escape

    from routelog.render.report import data_notes

    for title in _title(comparison):
        console.print(title)
    for run in comparison.runs:
        for warning in run.warnings:
            console.print(
                f"[bold yellow]warning[/bold yellow]: {escape(run.name)}: {escape(warning)}"
            )
    after = _after_deltas(comparison)
    for line in _table(comparison, after, console.width):
        console.print(line, soft_wrap=True)
    console.print(_caption(comparison, after), style="dim")
    for item in comparison.left_out:
        where = "every layer" if item.layer is None else f"layer {item.layer}"
        text = f"left out: {item.run} {where} ({item.what}): {item.reason}"
        console.print(text, style="dim", markup=False)
    for finding in comparison.findings:
        text = f"{finding.code}: {finding.message}"
        console.print(f"[yellow]{finding.severity}[/yellow] {escape(text)}")
    for run in comparison.runs:
        for note in data_notes(run.summary()):
            if note not in run.warnings:  # printed above
                console.print(f"{run.name}: {note}", style="dim", markup=False)
    if plot:
        for chart in charts(comparison, console):
            console.print()
            console.print(chart)


def charts(comparison: Comparison, console: Console) -> list[Text]:
    """Per compared layer: each group's token entropy over steps, overlaid (marker = group)."""
    import polars as pl
    from rich.text import Text

    from routelog.render.plot import Series, line_chart

    color = console.color_system is not None
    names = [group.name for group in comparison.groups]
    out = []
    for layer in comparison.table["layer"].unique().sort().to_list():
        rows = comparison.metrics.filter(pl.col("layer") == layer).sort("step")
        series = [
            Series(
                name,
                rows.filter(pl.col("run") == name)["step"].to_list(),
                rows.filter(pl.col("run") == name)["token_entropy_norm"].to_list(),
            )
            for name in names
        ]
        title = f"layer {layer}: token entropy (normalised) over steps"
        text = line_chart(series, title=title, width=console.width, color=color)
        out.append(Text.from_ansi(text) if color else Text(text))
    return out


def _cells(comparison: Comparison, after: dict[str, str]) -> list[list[tuple[str, int]]]:
    """Each row's cells as (text, direction): layer, run, a value and its delta per compared
    metric, then the ``after`` columns (:func:`_after_deltas`)."""
    out = []
    for row in comparison.table.iter_rows(named=True):
        cells: list[tuple[str, int]] = [(str(row["layer"]), 0), (row["run"], 0)]
        for metric in COMPARED:
            value = row[metric]
            shown = f"{fmt(value)}/{row['n_experts']}" if metric == "dead_experts" else fmt(value)
            delta = row[f"delta_{metric}"]
            cells.append((shown, 0))
            cells.append((delta_text(metric, delta), direction(metric, delta)))
        base = row["run"] == row["baseline"]
        for name in after:
            cells.append(("" if base else fmt(row[name]), 0))
        out.append(cells)
    return out


def _table(comparison: Comparison, after: dict[str, str], width: int) -> list[Text]:
    """Value and delta share a cell (``0.107 -0.601 ✗``); a table wider than ``width``
    wraps into sections that repeat the layer and run columns, so no number is cut."""
    from rich.text import Text

    from routelog.render.text import Column, grid

    columns = [
        Column("layer", "right", key=True),
        Column(comparison.by, key=True),
        *(Column(HEADERS[metric]) for metric in COMPARED),
        *(Column(name, "right") for name in after.values()),
    ]
    rows: list[list[Text | str]] = []
    previous = None
    for cells in _cells(comparison, after):
        layer = cells[0][0]
        row: list[Text | str] = ["" if layer == previous else layer, cells[1][0]]
        previous = layer
        for index in range(len(COMPARED)):
            (value, _), (delta, sign) = cells[2 + 2 * index], cells[3 + 2 * index]
            text = Text(value)
            if delta:
                text.append(" " + delta, style={1: "red", -1: "green", 0: ""}[sign])
            row.append(text)
        row.extend(text for text, _ in cells[2 + 2 * len(COMPARED) :])
        rows.append(row)
    lines, _ = grid(columns, rows, width=width, gap=2)
    return lines


def to_markdown(comparison: Comparison) -> str:
    """A GitHub-flavoured Markdown report (for a pull request)."""
    lines = [line + "  " for line in _title(comparison, markdown=True)]
    lines.append("")
    after = _after_deltas(comparison)
    deltas = [name for metric in COMPARED for name in (HEADERS[metric], "Δ")]
    lines.append("| " + " | ".join(["layer", comparison.by, *deltas, *after.values()]) + " |")
    lines.append("|---:|---|" + "---:|" * (len(deltas) + len(after)))
    for cells in _cells(comparison, after):
        lines.append("| " + " | ".join(inline(text) for text, _ in cells) + " |")
    lines.append("")
    lines.append(_caption(comparison, after) + ".")
    if comparison.left_out:
        lines.append("")
        lines.append("Left out:")
        lines.append("")
        for item in comparison.left_out:
            where = "every layer" if item.layer is None else f"layer {item.layer}"
            lines.append(f"- {inline(item.run)} {where} ({item.what}): {inline(item.reason)}")
    if comparison.findings:
        lines.append("")
        lines.append("Findings:")
        lines.append("")
        for finding in comparison.findings:
            lines.append(f"- **{finding.severity}** `{finding.code}`: {inline(finding.message)}")
    return "\n".join(lines) + "\n"
