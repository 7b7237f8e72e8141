"""The ``analyze`` report: a header per run and one table row per layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routelog import __version__
from routelog.render.data import records

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from routelog.api import Analysis

NO_PROBABILITIES = {"counts": "tokens-per-expert counts", "top-k ids": "selected expert ids"}
"""Payload kinds that carry no probabilities, and where their load metrics come from."""

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], lo: float = 0.0, hi: float = 1.0) -> str:
    """One block character per value on a fixed [lo, hi] scale; missing values are spaces.

    A fixed scale keeps layers comparable: a line near the floor is low entropy, whatever
    the other layers do.

    Examples
    --------
    >>> sparkline([0.0, 0.5, 1.0, None])
    '▁▅█ '
    """
    out = []
    for value in values:
        if value is None:
            out.append(" ")
            continue
        frac = min(max((value - lo) / (hi - lo), 0.0), 1.0)
        out.append(SPARK[round(frac * (len(SPARK) - 1))])
    return "".join(out)


def analysis_document(analysis: Analysis) -> dict[str, Any]:
    """The JSON document of ``analyze --format json``."""
    return {
        "routelog_version": __version__,
        "runs": [run.summary() for run in analysis.runs],
        "metrics": records(analysis.metrics),
        "findings": [f.to_dict() for f in analysis.findings],
    }


def fmt(value: float | int | None, digits: int = 3) -> str:
    """A number for a table cell; missing values print as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def print_report(analysis: Analysis, console: Console) -> None:
    """Header and per-layer table for each run."""
    for run in analysis.runs:
        metrics = analysis.metrics.filter(analysis.metrics["run"] == run.name)
        console.print(_header(run.summary(), metrics))
        console.print(_layer_table(metrics))
        for line in _notes(run.summary()):
            console.print(line, style="dim")
        console.print()


def _header(summary: dict[str, Any], metrics: pl.DataFrame) -> str:
    steps = metrics["step"].unique().sort().to_list()
    experts = metrics["n_experts"].unique().sort().to_list()
    tokens = metrics.filter(metrics["step"] == steps[-1])["n_tokens"].drop_nulls()
    per_step = (
        f"{max(tokens.to_list()):,} tokens/layer at the latest step"
        if len(tokens)
        else "counts only"
    )
    top_k = summary["top_k"]
    span = (
        f"steps {steps[0]}–{steps[-1]} ({len(steps)} logged)"
        if len(steps) > 1
        else f"step {steps[0]} (1 logged)"
    )
    return (
        f"[bold]{summary['run']}[/bold]  {span} · "
        f"{metrics['layer'].n_unique()} layers · E={'/'.join(map(str, experts))} · "
        f"k={top_k if top_k != [] else '–'} · {per_step}"
    )


def _layer_table(metrics: pl.DataFrame) -> Any:
    import polars as pl
    from rich.table import Table

    latest = metrics.group_by("layer").agg(pl.all().sort_by("step").last()).sort("layer")
    trends = metrics.sort("step").group_by("layer").agg(pl.col("token_entropy_norm")).sort("layer")
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("H_token", justify="right")
    table.add_column("H_load", justify="right")
    table.add_column("H_assign", justify="right")
    table.add_column("max share", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("H_token over steps (0–1)")
    for row, trend in zip(latest.iter_rows(named=True), trends["token_entropy_norm"], strict=True):
        table.add_row(
            str(row["layer"]),
            fmt(row["token_entropy_norm"]),
            fmt(row["load_entropy_norm"]),
            fmt(row["assign_entropy_norm"]),
            fmt(row["max_load_share"]),
            f"{fmt(row['dead_experts'])}/{row['n_experts']}",
            sparkline(trend.to_list()),
        )
    table.caption = "entropies normalised by ln E, at the latest step; share and dead from top-k"
    table.caption_justify = "left"
    return table


def _notes(summary: dict[str, Any]) -> list[str]:
    notes = []
    if summary["masked_rows"]:
        notes.append(f"{summary['masked_rows']:,} masked rows excluded")
    if summary["skipped_rows"]:
        notes.append(f"{summary['skipped_rows']:,} bad rows skipped (--skip-bad-rows)")
    if summary["ignored_files"]:
        notes.append(
            f"{len(summary['ignored_files'])} files in the run directory are not logs (ignored)"
        )
    notes.extend(summary["warnings"])
    payloads = summary.get("payloads", [])
    without = [NO_PROBABILITIES[p] for p in payloads if p in NO_PROBABILITIES]
    if without:
        some = "some files hold " if len(without) < len(payloads) else ""
        notes.append(
            f"{some}{' and '.join(without)} only: H_token, H_load, mutual_info, aux_loss and "
            "top1_prob need router probabilities and are not computed (–)"
        )
    return notes
