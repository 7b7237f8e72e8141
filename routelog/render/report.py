"""The ``analyze`` report: per run a header, the findings, a per-layer table, a load heatmap.

Readable without colour: statuses are words (``ok``, ``warn``, ``fail``), active findings are
marked with ``*``, heatmap cells carry glyphs (``×`` for a dead expert) or numbers.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routelog import __version__
from routelog.diagnose import TREND_NOTE
from routelog.experts import dead_experts
from routelog.render.data import records
from routelog.render.text import fmt, plural

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from routelog.api import Analysis, Run
    from routelog.findings import Finding

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "earlier": "dim"}
STATUS_ORDER = ("fail", "warn", "earlier")
WIDE = 120  # below this width, a layer's codes go on lines under the table
HEATMAP_TITLE = "load share f_i per expert at the latest step"
MASS_TITLE = "probability mass share P_i per expert at the latest step"

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


def k_plain(summary: dict[str, Any]) -> str:
    """A run's k and where it came from, in words: ``k=2 (num_experts_per_tok in
    runs/config.json)``, ``k=2 (--top-k)``, ``k=2`` (the data's own), or the assumption."""
    from routelog.options import ASSUMED_K_TEXT

    source = summary.get("top_k_source")
    top_k = summary["top_k"]
    k = f"k={top_k if top_k is not None else '–'}"
    if isinstance(top_k, list):
        k = f"k={'/'.join(map(str, top_k))}"
    if summary.get("top_k_assumed"):
        return ASSUMED_K_TEXT
    if source == "option":
        return f"{k} (--top-k)"
    file = summary.get("top_k_file")
    if file and source in ("run_config", "model_config", "config"):
        key = "num_experts_per_tok" if source == "model_config" else "top_k"
        return f"{k} ({key} in {_short_path(file)})"
    return k


def k_markup(summary: dict[str, Any]) -> str:
    """:func:`k_plain` as rich markup: an assumed k is yellow."""
    from rich.markup import escape

    text = escape(k_plain(summary))
    return f"[yellow]{text}[/yellow]" if summary.get("top_k_assumed") else text


def _short_path(path: str) -> str:
    """A path relative to the current directory when that is shorter (a URL as it is)."""
    import os.path

    from routelog.storage import is_url

    if is_url(path):
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:  # pragma: no cover (another drive on Windows)
        return path
    return relative if len(relative) < len(path) else path


def with_k_columns(frame: pl.DataFrame, runs: list[Run], *, after: str) -> pl.DataFrame:
    """``frame`` with ``top_k_assumed`` (per row, by its ``run``) after the column ``after``:
    CSV has no header block, so the assumption travels in a column."""
    import polars as pl

    assumed = {run.name: run.top_k_assumed for run in runs}
    column = pl.col("run").replace_strict(assumed, default=False, return_dtype=pl.Boolean)
    out = frame.with_columns(column.alias("top_k_assumed"))
    names = list(frame.columns)
    names.insert(names.index(after) + 1 if after in names else len(names), "top_k_assumed")
    return out.select(names)


def metrics_csv(analysis: Analysis) -> str:
    """``analyze --format csv``: the metrics, with ``top_k_assumed`` after ``top_k``."""
    from routelog.render.data import to_csv

    return to_csv(with_k_columns(analysis.metrics, analysis.runs, after="top_k"))


def analysis_document(analysis: Analysis) -> dict[str, Any]:
    """The JSON document of ``analyze --format json``: also ``summary`` (findings counted by
    status, as the headline) and ``layers`` (each layer's status and codes, as the table)."""
    layers = []
    for run in analysis.runs:
        own = [f for f in analysis.findings if f.run == run.name]
        metrics = analysis.metrics.filter(analysis.metrics["run"] == run.name)
        for layer in sorted(metrics["layer"].unique().to_list()):
            status, codes = layer_status(own, layer)
            layers.append({"run": run.name, "layer": layer, "status": status, "codes": codes})
    return {
        "routelog_version": __version__,
        "runs": [run.summary() for run in analysis.runs],
        "summary": finding_counts(analysis.findings),
        "layers": layers,
        "metrics": records(analysis.metrics),
        "findings": [f.to_dict() for f in analysis.findings],
        "dead_experts": records(dead_experts(analysis.expert_histories())),
        "notes": analysis.notes,
    }


def report_text(
    analysis: Analysis, *, width: int, color: bool, plot: bool = False, values: bool = False
) -> str:
    """The terminal report as a string, ``width`` columns wide, with ANSI colours if ``color``
    (whatever ``NO_COLOR`` or the terminal say: the caller asked)."""
    from routelog.render import Color, make_console

    buffer = io.StringIO()
    console = make_console(buffer, width=width, color=Color.always if color else Color.never)
    print_report(analysis, console, plot=plot, values=values)
    return buffer.getvalue()


def print_report(
    analysis: Analysis, console: Console, *, plot: bool = False, values: bool = False
) -> None:
    """For each run: header, warnings, findings, per-layer table, load heatmap, notes (and
    plots).

    Runs are separated by a blank line; the report ends on its last line of text.
    """
    from rich.markup import escape

    for number, run in enumerate(analysis.runs):
        if number:
            console.print()
        metrics = analysis.metrics.filter(analysis.metrics["run"] == run.name)
        findings = [f for f in analysis.findings if f.run == run.name]
        console.print(_header(run.summary(), metrics))
        for warning in run.warnings:
            console.print(f"[bold yellow]warning[/bold yellow]: {escape(warning)}")
        console.print()
        for line in findings_lines(findings, console.width):
            console.print(line)
        console.print()
        lines, kept = _layer_table(metrics, findings, codes=console.width >= WIDE, console=console)
        for line in lines:
            console.print(line, soft_wrap=True)
        console.print(_caption(metrics, kept), style="dim")
        if "codes" not in kept:
            for layer in sorted(metrics["layer"].unique().to_list()):
                status, codes = layer_status(findings, layer)
                if codes:
                    style = STATUS_STYLE[status]
                    console.print(f"layer {layer} [{style}]{status}[/{style}]: {', '.join(codes)}")
        console.print()
        for line in _heatmap(metrics, analysis.options.dead_fraction, console, values=values):
            console.print(line, soft_wrap=True)
        if plot:
            for chart in _charts(metrics, analysis, console):
                console.print()
                console.print(chart, soft_wrap=True)
        notes = [n for n in _notes(run.summary()) if n not in run.warnings]
        notes.extend(analysis.notes)
        if metrics["step"].n_unique() < 2:
            notes.insert(0, f"one logged step: {TREND_NOTE}")
        for line in notes:
            console.print(line, style="dim")


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


def finding_span(finding: Finding, holds: str = "") -> str:
    """``step 500`` or ``steps 500–1100``: the steps a finding held (every output says it
    so), then ``holds`` if it still holds at the latest step."""
    still = holds if finding.active else ""
    if finding.first_step == finding.last_step:
        return f"step {finding.first_step}{still}"
    return f"steps {finding.first_step}–{finding.last_step}{still}"


def finding_groups(findings: list[Finding]) -> list[tuple[str, str, list[Finding]]]:
    """Findings grouped by (severity, code), each group labelled by the one status rule
    (:attr:`Finding.status`): ``fail`` or ``warn`` while one of its findings holds at the
    latest step, ``earlier`` when all ended before it. Fail first, then warn, then earlier;
    in first-seen order within each."""
    groups: dict[tuple[str, str], list[Finding]] = {}
    for finding in sorted(findings, key=lambda f: (f.severity != "fail", f.layer or 0)):
        groups.setdefault((finding.severity, finding.code), []).append(finding)
    labelled = [
        (severity if any(f.active for f in group) else "earlier", code, group)
        for (severity, code), group in groups.items()
    ]
    return sorted(labelled, key=lambda item: (STATUS_ORDER.index(item[0]), item[1]))


def where(group: list[Finding]) -> str:
    """``layers 2*, 3* · steps 500–1100`` when the spans agree, else one span per layer."""
    spans = {(f.first_step, f.last_step) for f in group}
    marks = [f"{f.layer}{'*' if f.active else ''}" for f in group]
    noun = "layer" if len(group) == 1 else "layers"  # the count is the list that follows
    if len(spans) == 1:
        return f"{noun} {', '.join(marks)} · {finding_span(group[0])}"
    return ", ".join(f"layer {m} ({finding_span(f)})" for m, f in zip(marks, group, strict=True))


def finding_counts(findings: list[Finding]) -> dict[str, int]:
    """Findings by :attr:`Finding.status`: ``fail`` and ``warn`` hold at the latest step,
    ``earlier`` ended before it (the headline, the status column and the JSON agree)."""
    counts = {"fail": 0, "warn": 0, "earlier": 0}
    for finding in findings:
        counts[finding.status] += 1
    return counts


def headline(findings: list[Finding]) -> str:
    """``2 fail, 8 warn, 3 earlier only``: fail and warn count the findings that hold at the
    latest step (the layer statuses), ``earlier only`` those that ended before it."""
    counts = finding_counts(findings)
    text = f"{counts['fail']} fail, {counts['warn']} warn"
    if counts["earlier"]:
        text += f", {counts['earlier']} earlier only"
    return text


def findings_lines(findings: list[Finding], width: int = 120) -> list[Any]:
    """The findings panel as rich markup lines: one header, then per group its heading
    (wrapped under itself, indented like the message, when longer than ``width``) and the
    sentence of the group's worst layer."""
    import textwrap

    from rich.markup import escape

    from routelog.findings import worst

    if not findings:
        return ["[green]no findings[/green] on any layer"]
    lines: list[Any] = [
        f"[bold]findings[/bold]: {headline(findings)} (* = still holds at the latest step)"
    ]
    groups = finding_groups(findings)
    label = max(len(status) for status, _, _ in groups)  # 4, or 7 with an earlier group
    indent = 2 + label + 2
    for status, code, group in groups:
        style = STATUS_STYLE[status]
        head = f"  {status.upper():<{label}}  {escape(code)}  "
        places = where(group)
        first = (textwrap.wrap(places, max(width - len(head), 20)) or [""])[0]
        rest = textwrap.wrap(places[len(first) :].strip(), max(width - indent, 20))
        lines.append(
            f"  [{style}]{status.upper():<{label}}[/{style}]  [bold]{escape(code)}[/bold]  "
            f"{escape(first)}"
        )
        lines.extend(" " * indent + escape(more) for more in rest)
        lines.append(_indented(worst(group).message, indent))
    return lines


def _indented(message: str, indent: int = 8) -> Any:
    """A finding's message, wrapped under its header with a hanging indent."""
    from rich.padding import Padding
    from rich.text import Text

    return Padding(Text(message, style="dim"), (0, 0, 0, indent))


def _header(summary: dict[str, Any], metrics: pl.DataFrame) -> str:
    steps = metrics["step"].unique().sort().to_list()
    experts = metrics["n_experts"].unique().sort().to_list()
    tokens = metrics.filter(metrics["step"] == steps[-1])["n_tokens"].drop_nulls()
    per_step = (
        f"{plural(max(tokens.to_list()), 'token')}/layer at the latest step"
        if len(tokens)
        else "counts only"
    )
    span = (
        f"steps {steps[0]}–{steps[-1]} ({len(steps)} logged)"
        if len(steps) > 1
        else f"step {steps[0]} (1 logged)"
    )
    from rich.markup import escape

    return (
        f"[bold]{escape(summary['run'])}[/bold]  {span} · "
        f"{plural(metrics['layer'].n_unique(), 'layer')} · E={'/'.join(map(str, experts))} · "
        f"{k_markup(summary)} · {per_step}"
    )


MISMATCH_NOTE = (
    "mismatch: share of tokens whose selected experts are not the top-k of their probabilities"
)


def _caption(metrics: pl.DataFrame, kept: list[str]) -> str:
    """What the table's columns mean, for the columns it has (counts: no mass, no trend)."""
    probabilities = _has_probabilities(metrics)
    parts = [
        "entropies normalised by ln E, at the latest step",
        "max share from top-k slots, dead by tokens" + (" or mass" if probabilities else ""),
    ]
    if "trend" in kept:
        parts.append("trend: H_token over all logged steps on a 0–1 scale")
    elif probabilities:
        parts.append("the trend column is left out at this width (--width)")
    parts.append("(code) = held earlier only")
    if "mismatch" in kept:
        parts.append(MISMATCH_NOTE)
    return "; ".join(parts)


def _has_probabilities(metrics: pl.DataFrame) -> bool:
    """Whether any row has router probabilities (token entropy): not count-only data."""
    return metrics["token_entropy_norm"].null_count() < metrics.height


def _layer_table(
    metrics: pl.DataFrame, findings: list[Finding], *, codes: bool, console: Console
) -> tuple[list[Any], list[str]]:
    """The per-layer table's lines and the headers kept: at a narrow width the codes and
    then the trend sparkline are left out before any number could be cut."""
    import polars as pl
    from rich.text import Text

    from routelog.render.text import Column, grid

    latest = metrics.group_by("layer").agg(pl.all().sort_by("step").last()).sort("layer")
    trends = metrics.sort("step").group_by("layer").agg(pl.col("token_entropy_norm")).sort("layer")
    # the router selected other experts than the top-k of its probabilities (bias, groups)
    mismatch = bool(metrics["selection_mismatch"].fill_null(0).max())
    trend_column = _has_probabilities(metrics)  # count-only data has no token entropy to draw
    columns = [
        Column("layer", "right", key=True),
        Column("H_token", "right"),
        Column("H_load", "right"),
        Column("H_assign", "right"),
        Column("max share", "right"),
        Column("dead", "right"),
        *([Column("mismatch", "right")] if mismatch else []),
        *([Column("trend", drop=1)] if trend_column else []),
        Column("status"),
        *([Column("codes", drop=2)] if codes else []),
    ]
    rows: list[list[str | Text]] = []
    for row, trend in zip(latest.iter_rows(named=True), trends["token_entropy_norm"], strict=True):
        status, layer_codes = layer_status(findings, row["layer"])
        rows.append(
            [
                str(row["layer"]),
                fmt(row["token_entropy_norm"]),
                fmt(row["load_entropy_norm"]),
                fmt(row["assign_entropy_norm"]),
                fmt(row["max_load_share"]),
                f"{fmt(row['dead_experts'])}/{row['n_experts']}",
                *([fmt(row["selection_mismatch"])] if mismatch else []),
                *([sparkline(trend.to_list())] if trend_column else []),
                Text(status, style=STATUS_STYLE[status]),
                *([", ".join(layer_codes)] if codes else []),
            ]
        )
    return grid(columns, rows, width=console.width)


def _notes(summary: dict[str, Any]) -> list[str]:
    notes = []
    if summary.get("top_k_assumed"):
        notes.append(
            f"k={summary['top_k']} assumed: the data does not state its top-k; dead experts, "
            "max share and assignment entropy depend on k (give --top-k or top_k in the config)"
        )
    return notes + data_notes(summary)


def data_notes(summary: dict[str, Any]) -> list[str]:
    """What reading a run left out or met beside it, from its summary: masked and skipped
    rows, files that are not logs, sidecar files, warnings, payloads without probabilities.
    Every text report of the run says them (analyze, compare, check, experts)."""
    notes = []
    if summary["masked_rows"]:
        notes.append(f"{plural(summary['masked_rows'], 'masked row')} excluded")
    if summary["skipped_rows"]:
        notes.append(f"{plural(summary['skipped_rows'], 'bad row')} skipped (--skip-bad-rows)")
    if summary["ignored_files"]:
        count = len(summary["ignored_files"])
        notes.append(
            f"{plural(count, 'file')} in the run directory "
            f"{'is not a log' if count == 1 else 'are not logs'} (ignored)"
        )
    if summary.get("sidecar_files"):
        names = sorted({Path(f).name for f in summary["sidecar_files"]})
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        notes.append(f"sidecar files beside the logs: {shown}")
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


def _heatmap(
    metrics: pl.DataFrame, dead_fraction: float, console: Console, *, values: bool
) -> list[Any]:
    """Layer x expert share at the latest step: dead and dominant experts stand out.

    The share is the probability mass share P_i where the layer has probabilities (what the
    router gives each expert, whatever k), else the load share f_i (top-k slots); dead cells
    are :func:`routelog.kernels.dead_mask`'s, the one definition of a dead expert.
    """
    import polars as pl

    from routelog.kernels import dead_mask
    from routelog.render.heatmap import HeatRow, describe_dead, heatmap

    latest = (
        metrics.filter(pl.col("step") == pl.col("step").max().over("layer"))
        .sort("layer")
        .select("layer", "n_experts", "load_share", "mass_share")
    )
    by_mass = latest["mass_share"].null_count() < latest.height
    rows = []
    for row in latest.iter_rows(named=True):
        counts = row["load_share"]
        mass = row["mass_share"]
        dead = dead_mask(counts, mass, dead_fraction).tolist() if counts else []
        rows.append(HeatRow(f"layer {row['layer']}", mass if mass is not None else counts, dead))
    return heatmap(
        rows,
        n_experts=int(latest["n_experts"].max() or 0),  # type: ignore[arg-type]
        width=console.width,
        title=MASS_TITLE if by_mass else HEATMAP_TITLE,
        dead_rule=describe_dead(dead_fraction, mass=by_mass),
        note="" if values else "--values prints the shares",
        values=values,
    )


def _charts(metrics: pl.DataFrame, analysis: Analysis, console: Console) -> list[Any]:
    """Token and load entropy over steps, one line per layer, with the thresholds drawn."""
    from rich.text import Text

    from routelog.render.plot import MARKERS, Series, line_chart, marker_for, panels

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
        blocks = metrics.sort("step").group_by("layer", maintain_order=True)
        series = sorted(
            (
                Series(f"layer {layer}", block["step"].to_list(), block[column].to_list())
                for (layer,), block in blocks
            ),
            key=lambda s: int(s.label.split()[1]),
        )
        layers = [int(s.label.split()[1]) for s in series]
        # A layer's marker is its number (0-9, then a-z) when every layer has one; else
        # its position. Either way every marker in a panel is distinct.
        own = max(layers, default=0) < len(MARKERS)
        series = [
            Series(s.label, s.x, s.y, marker_for(layer if own else index))
            for index, (s, layer) in enumerate(zip(series, layers, strict=True))
        ]
        groups = panels(len(series))
        for group in groups:
            part = series[group.start : group.stop]
            name = title
            if len(groups) > 1:
                name += f" (layers {layers[group.start]}–{layers[group.stop - 1]})"
            text = line_chart(
                part, title=name, width=console.width, thresholds=thresholds, color=color
            )
            charts.append(Text.from_ansi(text) if color else Text(text))
    return charts
