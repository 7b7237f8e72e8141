"""The ``analyze`` report: per run a header, the findings, a per-layer table, a load heatmap.

Readable without colour: statuses are words (``ok``, ``warn``, ``fail``), active findings are
marked with ``*``, heatmap cells carry glyphs (``×`` for a dead expert) or numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routelog import __version__
from routelog.diagnose import TREND_NOTE
from routelog.render.data import records

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from routelog.api import Analysis
    from routelog.findings import Finding

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}
DEAD_GLYPH = "×"
WIDE = 120  # below this width, a layer's codes go on lines under the table

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


def print_report(
    analysis: Analysis, console: Console, *, plot: bool = False, values: bool = False
) -> None:
    """For each run: header, findings, per-layer table, load heatmap, notes (and plots)."""
    for run in analysis.runs:
        metrics = analysis.metrics.filter(analysis.metrics["run"] == run.name)
        findings = [f for f in analysis.findings if f.run == run.name]
        console.print(_header(run.summary(), metrics))
        console.print()
        for line in findings_lines(findings):
            console.print(line)
        console.print()
        wide = console.width >= WIDE
        console.print(_layer_table(metrics, findings, codes=wide))
        if not wide:
            for layer in sorted(metrics["layer"].unique().to_list()):
                status, codes = layer_status(findings, layer)
                if codes:
                    style = STATUS_STYLE[status]
                    console.print(f"layer {layer} [{style}]{status}[/{style}]: {', '.join(codes)}")
        console.print()
        console.print(_heatmap(metrics, analysis.options.dead_fraction, values=values))
        if plot:
            for chart in _charts(metrics, analysis, console):
                console.print()
                console.print(chart)
        notes = _notes(run.summary())
        if metrics["step"].n_unique() < 2:
            notes.insert(0, f"one logged step: {TREND_NOTE}")
        for line in notes:
            console.print(line, style="dim")
        console.print()


def layer_status(findings: list[Finding], layer: int) -> tuple[str, list[str]]:
    """A layer's status (worst severity of its active findings, else ``ok``) and its codes.

    Codes of findings that no longer hold at the latest step are shown in parentheses.
    """
    own = [f for f in findings if f.layer == layer]
    active = [f for f in own if f.active]
    status = "ok"
    if any(f.severity == "fail" for f in active):
        status = "fail"
    elif active:
        status = "warn"
    codes: list[str] = []
    for finding in own:
        code = finding.code if finding.active else f"({finding.code})"
        if code not in codes:
            codes.append(code)
    return status, codes


def _span(finding: Finding) -> str:
    if finding.first_step == finding.last_step:
        return f"step {finding.first_step}"
    return f"steps {finding.first_step}–{finding.last_step}"


def finding_groups(findings: list[Finding]) -> list[tuple[str, str, list[Finding]]]:
    """Findings grouped by (severity, code), fail first, in first-seen order within each."""
    groups: dict[tuple[str, str], list[Finding]] = {}
    for finding in sorted(findings, key=lambda f: (f.severity != "fail", f.layer or 0)):
        groups.setdefault((finding.severity, finding.code), []).append(finding)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != "fail", item[0][1]))
    return [(severity, code, group) for (severity, code), group in ordered]


def where(group: list[Finding]) -> str:
    """``layers 2*, 3* · steps 500–1100`` when the spans agree, else one span per layer."""
    spans = {(f.first_step, f.last_step) for f in group}
    marks = [f"{f.layer}{'*' if f.active else ''}" for f in group]
    noun = "layer" if len(group) == 1 else "layers"
    if len(spans) == 1:
        return f"{noun} {', '.join(marks)} · {_span(group[0])}"
    return ", ".join(f"layer {m} ({_span(f)})" for m, f in zip(marks, group, strict=True))


def findings_lines(findings: list[Finding]) -> list[Any]:
    """The findings panel as rich markup lines: one header, then two lines per group."""
    if not findings:
        return ["[green]no findings[/green]: every rule passed on every layer"]
    fails = sum(f.severity == "fail" for f in findings)
    warns = len(findings) - fails
    lines: list[Any] = [
        f"[bold]findings[/bold]: {fails} fail, {warns} warn (* = still holds at the latest step)"
    ]
    for severity, code, group in finding_groups(findings):
        style = STATUS_STYLE[severity]
        lines.append(
            f"  [{style}]{severity.upper():<4}[/{style}]  [bold]{code}[/bold]  {where(group)}"
        )
        lines.append(_indented(group[0].message))
    return lines


def _indented(message: str) -> Any:
    """A finding's message, wrapped under its header with a hanging indent."""
    from rich.padding import Padding
    from rich.text import Text

    return Padding(Text(message, style="dim"), (0, 0, 0, 8))


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


def _layer_table(metrics: pl.DataFrame, findings: list[Finding], *, codes: bool) -> Any:
    import polars as pl
    from rich.table import Table

    latest = metrics.group_by("layer").agg(pl.all().sort_by("step").last()).sort("layer")
    trends = metrics.sort("step").group_by("layer").agg(pl.col("token_entropy_norm")).sort("layer")
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("H_token", justify="right", no_wrap=True)
    table.add_column("H_load", justify="right", no_wrap=True)
    table.add_column("H_assign", justify="right", no_wrap=True)
    table.add_column("max share", justify="right", no_wrap=True)
    table.add_column("dead", justify="right", no_wrap=True)
    # the router selected other experts than the top-k of its probabilities (bias, groups)
    mismatch = bool(metrics["selection_mismatch"].fill_null(0).max())
    if mismatch:
        table.add_column("mismatch", justify="right", no_wrap=True)
    table.add_column("H_token trend", no_wrap=True)
    table.add_column("status", no_wrap=True)
    if codes:
        table.add_column("codes")
    for row, trend in zip(latest.iter_rows(named=True), trends["token_entropy_norm"], strict=True):
        status, layer_codes = layer_status(findings, row["layer"])
        table.add_row(
            str(row["layer"]),
            fmt(row["token_entropy_norm"]),
            fmt(row["load_entropy_norm"]),
            fmt(row["assign_entropy_norm"]),
            fmt(row["max_load_share"]),
            f"{fmt(row['dead_experts'])}/{row['n_experts']}",
            *([fmt(row["selection_mismatch"])] if mismatch else []),
            sparkline(trend.to_list()),
            f"[{STATUS_STYLE[status]}]{status}[/{STATUS_STYLE[status]}]",
            *([", ".join(layer_codes)] if codes else []),
        )
    table.caption = (
        "entropies normalised by ln E, at the latest step; share and dead from top-k; "
        "trend: H_token over all logged steps on a 0–1 scale; (code) = held earlier only"
    )
    if mismatch:
        table.caption += (
            "; mismatch: share of tokens whose selected experts are not the top-k of their "
            "probabilities"
        )
    table.caption_justify = "left"
    return table


def _notes(summary: dict[str, Any]) -> list[str]:
    notes = []
    if summary.get("top_k_assumed"):
        notes.append(
            f"k={summary['top_k']} assumed: the data does not state its top-k; dead experts, "
            "max share and assignment entropy depend on k (give --top-k or top_k in the config)"
        )
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


def _heatmap(metrics: pl.DataFrame, dead_fraction: float, *, values: bool) -> Any:
    """Layer x expert load share f_i at the latest step: dead and dominant experts stand out."""
    import polars as pl
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    latest = (
        metrics.filter(pl.col("step") == pl.col("step").max().over("layer"))
        .sort("layer")
        .select("layer", "step", "n_experts", "top_k", "load_share")
    )
    width = int(latest["n_experts"].max() or 0)  # type: ignore[arg-type]
    cell = 6 if values else 3
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 0))
    table.add_column("expert ", justify="right", no_wrap=True)
    for expert in range(width):
        table.add_column(str(expert), justify="center", width=cell, no_wrap=True)
    for row in latest.iter_rows(named=True):
        shares = row["load_share"] or []
        cells = [
            _share_cell(share, row["n_experts"], row["top_k"], dead_fraction, values)
            for share in shares
        ]
        table.add_row(f"layer {row['layer']} ", *cells, *[""] * (width - len(cells)))
    caption = (
        f"{DEAD_GLYPH} dead (< {dead_fraction:g} of the fair share 1/E); blocks scale from 0 "
        "to 1/k (every token); bold yellow = more than twice the fair share"
        + ("" if values else "; --values prints the numbers")
    )
    return Group(
        Text("load share f_i per expert at the latest step", style="bold"),
        table,
        Text(caption, style="dim"),
    )


def _share_cell(share: float, n_experts: int, top_k: int | None, dead: float, values: bool) -> str:
    """One heatmap cell: a block scaled 0..1/k (or the number), coloured by meaning."""
    fair = 1.0 / n_experts
    ceiling = 1.0 / (top_k or 1)
    if share < dead * fair:
        style, glyph = "bold red", DEAD_GLYPH
    else:
        index = min(int(share / ceiling * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)
        style = "bold yellow" if share > 2 * fair else "green"
        glyph = SPARK[index]
    text = f"{share:.2f}".center(6) if values else f" {glyph} "
    if values and share < dead * fair:
        text = f"{DEAD_GLYPH}{share:.2f}".center(6)
    return f"[{style}]{text}[/{style}]"


def _charts(metrics: pl.DataFrame, analysis: Analysis, console: Console) -> list[Any]:
    """Token and load entropy over steps, one line per layer, with the thresholds drawn."""
    from rich.text import Text

    from routelog.render.plot import Series, line_chart

    t = analysis.config.thresholds
    color = console.color_system is not None
    charts = []
    for column, title, thresholds in (
        (
            "token_entropy_norm",
            "token entropy (normalised) over steps",
            [("rigidity", t.rigidity_warn), ("rigidity fail", t.rigidity_fail)],
        ),
        (
            "load_entropy_norm",
            "load entropy (normalised) over steps",
            [("collapse", t.collapse_entropy)],
        ),
    ):
        series = [
            Series(
                f"layer {layer}", block["step"].to_list(), block[column].to_list(), str(layer)[-1]
            )
            for (layer,), block in metrics.sort("step").group_by("layer", maintain_order=True)
        ]
        series.sort(key=lambda s: int(s.label.split()[1]))
        text = line_chart(
            series, title=title, width=console.width, thresholds=thresholds, color=color
        )
        charts.append(Text.from_ansi(text) if color else Text(text))
    return charts
