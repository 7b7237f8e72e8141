"""``--format html``: one self-contained report file that opens offline.

Line charts are static SVG generated here (a few hundred points per layer: small, sharp at
any zoom, printable, no library). Heatmaps are ``<canvas>`` elements drawn by a few lines of
inline JavaScript from one byte per cell (base64 in an embedded JSON block): a 64 layers x
256 experts x 100 steps run is 1.6 million cells, which as SVG rectangles would be hundreds
of megabytes, and as bytes is about 2 MB. Hovering a chart or a heatmap cell shows its
values. Nothing is fetched: no external script, style, font or image; the page makes no
network request of any kind.

Heatmap cells are coded as one byte (:func:`routelog.render.palette.cell_codes`): 0 no data,
1 dead expert, 2..255 the share relative to the fair share 1/E, linear from 0 to 4x; colours
come from :mod:`routelog.render.palette`, the same as the matplotlib figures.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from routelog import __version__
from routelog.errors import printable
from routelog.render import palette

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from routelog.api import Analysis
    from routelog.check import CheckResult
    from routelog.compare import Comparison
    from routelog.experts import LayerHistory
    from routelog.findings import Finding

CHART_W, CHART_H = 320, 170
PAD_L, PAD_R, PAD_T, PAD_B = 34, 8, 8, 22


@dataclass
class _Page:
    """The parts of a report page, assembled into one file by :meth:`render`."""

    title: str
    body: list[str] = field(default_factory=list)
    heatmaps: list[dict[str, Any]] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)

    def render(self) -> str:
        data = {
            "lut": palette.lut(),
            "heatmaps": self.heatmaps,
            "charts": self.charts,
        }
        payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
        # No "<" inside the script element: "</script" would end it, "<!--" change how it
        # parses. In JSON a "<" is only ever inside a string, where \u003c says the same.
        payload = payload.replace("<", "\\u003c")
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{_e(self.title)}</h1>\n"
            f'<p class="muted">routelog {_e(__version__)} · hover a chart or a heatmap cell '
            "for its values; click a heatmap to enlarge it</p>\n"
            + "\n".join(self.body)
            + '\n<div id="tip" role="tooltip"></div>\n'
            f'<script type="application/json" id="routelog-data">{payload}</script>\n'
            f"<script>{_JS}</script>\n</body>\n</html>\n"
        )


def _e(text: object) -> str:
    """Text for HTML: control characters shown as escapes, then HTML-escaped."""
    return html.escape(printable(str(text)), quote=True)


def _num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def encode_cells(ratio: np.ndarray, dead: np.ndarray) -> str:
    """Cells as base64 bytes (:func:`routelog.render.palette.cell_codes`)."""
    return base64.b64encode(palette.cell_codes(ratio, dead).tobytes()).decode("ascii")


# --- pieces ----------------------------------------------------------------------------------


def _findings_html(findings: Sequence[Finding]) -> str:
    """Findings grouped by severity and rule (as in the terminal report), each group a
    ``<details>`` with one line per layer; small groups open, large ones folded."""
    from routelog.render.report import finding_groups, finding_span, headline, where

    if not findings:
        return '<p class="ok">no findings on any layer</p>'
    groups = []
    for severity, code, group in finding_groups(list(findings)):
        items = [
            f'<li class="finding {f.severity}"><span class="muted">{_e(f.run)} · layer '
            f"{_e(f.layer)} · {finding_span(f, ' · still holds')}</span><br>{_e(f.message)}</li>"
            for f in group
        ]
        is_open = " open" if len(group) <= 3 else ""
        groups.append(
            f'<details class="group {severity}"{is_open}><summary><span class="sev">'
            f"{severity.upper()}</span> <b>{_e(code)}</b> "
            f'<span class="muted">{_e(where(group))} ({len(group)})</span></summary>'
            f'<ul class="findings">{"".join(items)}</ul></details>'
        )
    head = (
        f'<p>{headline(list(findings))} · <span class="muted">'
        "(* = still holds at the latest step; click a rule to fold or unfold it)</span></p>"
    )
    return head + "".join(groups)


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _layer_rows(metrics: pl.DataFrame, findings: Sequence[Finding]) -> list[list[str]]:
    import polars as pl

    from routelog.render.report import layer_status

    latest = metrics.group_by("layer").agg(pl.all().sort_by("step").last()).sort("layer")
    rows = []
    for row in latest.iter_rows(named=True):
        status, codes = layer_status(list(findings), row["layer"])
        rows.append(
            [
                str(row["layer"]),
                _num(row["token_entropy_norm"]),
                _num(row["load_entropy_norm"]),
                _num(row["assign_entropy_norm"]),
                _num(row["max_load_share"]),
                f"{_num(row['dead_experts'])}/{row['n_experts']}",
                f'<span class="status {status}">{status}</span>',
                _e(", ".join(codes)),
            ]
        )
    return rows


LAYER_HEADERS = ["layer", "H_token", "H_load", "H_assign", "max share", "dead", "status", "codes"]


def line_chart(
    page: _Page,
    title: str,
    series: Sequence[tuple[str, str, Sequence[float], Sequence[float | None]]],
    thresholds: Sequence[tuple[str, float]] = (),
    ylim: tuple[float, float] = (0.0, 1.0),
) -> str:
    """An SVG line chart; ``series`` are ``(label, colour, x, y)``. Hover data go to ``page``."""
    xs = [float(x) for _, _, sx, _ in series for x in sx]
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = hi - lo or 1.0
    y0, y1 = ylim
    width, height = CHART_W - PAD_L - PAD_R, CHART_H - PAD_T - PAD_B

    def px(x: float) -> float:
        return PAD_L + (x - lo) / span * width

    def py(y: float) -> float:
        return PAD_T + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * height

    parts = [
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{width}" height="{height}" class="frame"/>',
    ]
    for tick in (y0, (y0 + y1) / 2, y1):
        parts.append(
            f'<line x1="{PAD_L}" x2="{PAD_L + width}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
            f'class="grid"/><text x="{PAD_L - 4}" y="{py(tick) + 3:.1f}" class="ytick">'
            f"{tick:g}</text>"
        )
    parts.append(
        f'<text x="{PAD_L}" y="{CHART_H - 6}" class="xtick">{lo:g}</text>'
        f'<text x="{PAD_L + width}" y="{CHART_H - 6}" class="xtick end">{hi:g}</text>'
    )
    for label, value in thresholds:
        color = palette.threshold_color(label)
        parts.append(
            f'<line x1="{PAD_L}" x2="{PAD_L + width}" y1="{py(value):.1f}" '
            f'y2="{py(value):.1f}" stroke="{color}" class="threshold">'
            f"<title>{_e(label)} {value:g}</title></line>"
        )
    hover = []
    for label, color, sx, sy in series:
        points = [(float(x), float(y)) for x, y in zip(sx, sy, strict=True) if y is not None]
        hover.append(
            {
                "label": label,
                "color": color,
                "x": [p[0] for p in points],
                "y": [round(p[1], 4) for p in points],
            }
        )
        if not points:
            continue
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" class="series">'
            f"<title>{_e(label)}</title></polyline>"
        )
    index = len(page.charts)
    page.charts.append({"x0": lo, "x1": hi, "left": PAD_L, "width": width, "series": hover})
    legend = " ".join(
        f'<span class="key"><i style="background:{c}"></i>{_e(lbl)}</span>'
        for lbl, c, _, _ in series
    ) + "".join(
        f'<span class="key"><i class="dash" style="border-color:'
        f'{palette.threshold_color(lbl)}"></i>{_e(lbl)} {v:g}</span>'
        for lbl, v in thresholds
    )
    return (
        f'<figure class="chart"><figcaption>{_e(title)}</figcaption>'
        f'<svg viewBox="0 0 {CHART_W} {CHART_H}" data-chart="{index}" role="img" '
        f'aria-label="{_e(title)}">{"".join(parts)}</svg>'
        f'<div class="legend">{legend}</div></figure>'
    )


def heatmap(
    page: _Page,
    title: str,
    ratio: np.ndarray,
    dead: np.ndarray,
    *,
    rows: tuple[str, Sequence[object]],
    cols: tuple[str, Sequence[object]],
    fair: Sequence[float],
    caption: str = "",
) -> str:
    """A canvas heatmap of ``ratio`` (rows x cols, share / fair share; NaN = no data).

    ``rows``/``cols`` are ``(name, labels)``; ``fair`` is 1/E per row (hover shows shares).
    """
    index = len(page.heatmaps)
    n_rows, n_cols = ratio.shape
    page.heatmaps.append(
        {
            "rows": n_rows,
            "cols": n_cols,
            "rowName": rows[0],
            "colName": cols[0],
            "rowLabels": [str(r) for r in rows[1]],
            "colLabels": [str(c) for c in cols[1]],
            "fair": [round(f, 8) for f in fair],
            "top": palette.CODE_TOP,
            "cells": encode_cells(ratio, dead),
        }
    )
    note = f'<p class="caption">{_e(caption)}</p>' if caption else ""
    return (
        f'<figure class="heat"><figcaption>{_e(title)}</figcaption>'
        f'<div class="axis">{_e(rows[0])} {_e(_ends(rows[1]))} ↓ · '
        f"{_e(cols[0])} {_e(_ends(cols[1]))} → ({n_rows} x {n_cols})</div>"
        f'<canvas data-heat="{index}" width="{n_cols}" height="{n_rows}" '
        f'aria-label="{_e(title)}"></canvas>{note}</figure>'
    )


def _ends(labels: Sequence[object]) -> str:
    """``0–1100``: the first and last label of an axis."""
    return f"{labels[0]}–{labels[-1]}" if len(labels) > 1 else str(labels[0])


HEAT_CAPTION = (
    "colour: share relative to the fair share 1/E, white (0) to dark blue (2x); "
    "orange above 2x; red: dead expert (count share below dead_fraction / E)"
)


# --- sections --------------------------------------------------------------------------------


def _entropy_charts(
    page: _Page,
    metrics: pl.DataFrame,
    analysis_config: Any,
    by_run: bool = False,
    runs: list[str] | None = None,
) -> str:
    """Token and load entropy over steps, one chart per layer (one line per run if by_run)."""
    t = analysis_config.thresholds
    thresholds = [
        ("rigidity warn", t.rigidity_warn),
        ("rigidity fail", t.rigidity_fail),
        ("collapse", t.collapse_entropy),
    ]
    charts = []
    for (layer,), block in metrics.sort("layer", "step").group_by("layer", maintain_order=True):
        series = []
        if by_run:
            names = runs or sorted(set(metrics["run"].to_list()))
            for (run,), rb in sorted(
                block.group_by("run"), key=lambda item: names.index(str(item[0][0]))
            ):
                series.append(
                    (
                        f"{run} H_token",
                        palette.layer_color(names.index(str(run))),
                        rb["step"].to_list(),
                        rb["token_entropy_norm"].to_list(),
                    )
                )
        else:
            series = [
                (
                    "H_token",
                    palette.layer_color(0),
                    block["step"].to_list(),
                    block["token_entropy_norm"].to_list(),
                ),
                (
                    "H_load",
                    palette.layer_color(1),
                    block["step"].to_list(),
                    block["load_entropy_norm"].to_list(),
                ),
                (
                    "H_assign",
                    palette.layer_color(2),
                    block["step"].to_list(),
                    block["assign_entropy_norm"].to_list(),
                ),
            ]
        charts.append(line_chart(page, f"layer {layer}", series, thresholds))
    return f'<div class="grid">{"".join(charts)}</div>'


def _latest_heatmap(page: _Page, history: list[LayerHistory]) -> str:
    """Layer x expert load share at each layer's latest step."""
    import numpy as np

    width = max(h.n_experts for h in history)
    ratio = np.full((len(history), width), np.nan)
    dead = np.zeros((len(history), width), dtype=bool)
    for row, h in enumerate(history):
        ratio[row, : h.n_experts] = h.load[-1] * h.n_experts
        dead[row, : h.n_experts] = h.dead[-1]
    return heatmap(
        page,
        "load share per layer and expert at the latest step",
        ratio,
        dead,
        rows=("layer", [h.layer for h in history]),
        cols=("expert", list(range(width))),
        fair=[1.0 / h.n_experts for h in history],
        caption=HEAT_CAPTION,
    )


def _expert_heatmaps(page: _Page, history: list[LayerHistory]) -> str:
    """Each layer's expert x step heatmap of the load share."""
    import numpy as np

    figures = []
    for h in history:
        dead_now = np.flatnonzero(h.dead_since >= 0)
        names = ", ".join(f"{e} (since {h.dead_since[e]})" for e in dead_now.tolist())
        caption = (
            f"dead at the latest step: {names}" if names else "no dead expert at the latest step"
        )
        figures.append(
            heatmap(
                page,
                f"layer {h.layer}: load share of each expert over steps",
                (h.load * h.n_experts).T,
                h.dead.T,
                rows=("expert", list(range(h.n_experts))),
                cols=("step", h.steps.tolist()),
                fair=[1.0 / h.n_experts] * h.n_experts,
                caption=caption,
            )
        )
    return f'<div class="heats">{"".join(figures)}</div>'


def _analysis_sections(page: _Page, analysis: Analysis) -> None:
    every = analysis.expert_histories()
    for run in analysis.runs:
        metrics = analysis.metrics.filter(analysis.metrics["run"] == run.name)
        history = [h for h in every if h.run == run.name]
        findings = [f for f in analysis.findings if f.run == run.name]
        steps = metrics["step"].unique().sort().to_list()
        page.body.append(
            f'<section class="run"><h2>{_e(run.name)}</h2><p class="muted">{_e(run.path)} · '
            f"steps {steps[0]}–{steps[-1]} ({len(steps)} logged) · "
            f"{metrics['layer'].n_unique()} layers · E="
            f"{'/'.join(map(str, metrics['n_experts'].unique().sort().to_list()))}</p>"
            f"<h3>findings</h3>{_findings_html(findings)}"
            f"<h3>layers at the latest step</h3>"
            + _table_html(LAYER_HEADERS, _layer_rows(metrics, findings), "layers")
            + '<p class="caption">entropies normalised by ln E; share and dead from top-k</p>'
            "<h3>entropy over steps</h3>"
            + _entropy_charts(page, metrics, analysis.config)
            + "<h3>load per expert</h3>"
            + _latest_heatmap(page, history)
            + "<h3>each expert over steps</h3>"
            + _expert_heatmaps(page, history)
            + "</section>"
        )


def analysis_html(analysis: Analysis) -> str:
    """The report of ``analyze --format html``."""
    names = ", ".join(r.name for r in analysis.runs)
    page = _Page(f"routelog report: {names}")
    _analysis_sections(page, analysis)
    return page.render()


def check_html(result: CheckResult, analysis: Analysis) -> str:
    """The report of ``check --format html``: the verdict, every rule, then the analysis."""
    from routelog.render.check import final_line

    page = _Page(f"routelog check: {', '.join(r.name for r in analysis.runs)}")
    verdict = "ok" if result.passed else "fail"
    rows = [
        [
            f'<span class="status {"ok" if r.passed else "fail"}">'
            f"{'PASS' if r.passed else 'FAIL'}</span>",
            _e(r.rule),
            _e(r.run),
            _e(r.layer),
            _e(r.metric or ""),
            _num(r.value),
            _num(r.threshold),
            _e(r.message),
        ]
        for r in result.rules
    ]
    page.body.append(
        f'<p class="verdict {verdict}">{_e(final_line(result))}</p>'
        + _table_html(
            ["result", "rule", "run", "layer", "metric", "value", "limit", "message"],
            rows,
            "rules",
        )
    )
    _analysis_sections(page, analysis)
    return page.render()


def comparison_html(comparison: Comparison, config: Any, dead_fraction: float = 0.1) -> str:
    """The report of ``compare --format html``: the table, entropy per layer with one line per
    run, then each run's load heatmaps (latest step, and each expert over steps)."""
    import polars as pl

    from routelog.experts import histories

    page = _Page(f"routelog compare: {', '.join(g.name for g in comparison.groups)}")
    scalar = [
        name
        for name, dtype in comparison.table.schema.items()
        if not isinstance(dtype, pl.List | pl.Array)
    ]
    rows = [
        [_num(v) if isinstance(v, float) or v is None else _e(v) for v in row]
        for row in comparison.table.select(scalar).iter_rows()
    ]
    groups = "; ".join(
        f"{g.name}: step {g.step} of {g.steps[0]}–{g.steps[-1]}" for g in comparison.groups
    )
    page.body.append(
        f'<p class="muted">baseline {_e(comparison.baseline)} · compared steps: {_e(groups)}</p>'
        f"<h3>findings</h3>{_findings_html(comparison.findings)}"
        f"<h3>layers</h3>{_table_html(scalar, rows, 'layers')}"
        "<h3>token entropy over steps</h3>"
        + _entropy_charts(
            page, comparison.metrics, config, by_run=True, runs=[g.name for g in comparison.groups]
        )
    )
    every = histories(comparison.metrics, dead_fraction=dead_fraction)
    for group in comparison.groups:
        history = [h for h in every if h.run == group.name]
        if history:
            page.body.append(
                f"<h3>{_e(group.name)}: load per expert</h3>"
                + _latest_heatmap(page, history)
                + _expert_heatmaps(page, history)
            )
    return page.render()


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1f2937;margin:24px;
max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:19px;border-bottom:1px solid #e5e7eb}
h3{font-size:15px;margin:22px 0 8px}
.muted,.caption{color:#6b7280}.caption{font-size:12px;margin:4px 0}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:2px 10px;text-align:right;border-bottom:1px solid #f0f0f0}
th{font-weight:600}td:last-child,th:last-child{text-align:left}
.status,.sev{font-weight:600}.ok{color:#2e7d32}.warn .sev,.status.warn{color:#b26a00}
.fail .sev,.status.fail,.verdict.fail{color:#c62828}.status.ok,.verdict.ok{color:#2e7d32}
.verdict{font-size:17px;font-weight:600}
.group{margin:4px 0}.group summary{cursor:pointer}.group.fail .sev{color:#c62828}
.group.warn .sev{color:#b26a00}.group.earlier .sev{color:#777}
.findings{list-style:none;padding:0 0 0 18px;margin:2px 0}
.finding{margin:6px 0;padding-left:8px;
border-left:3px solid #e69f00}.finding.fail{border-left-color:#c62828}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.chart{margin:0;width:330px}.chart svg{width:100%;height:auto;background:#fff}
figcaption{font-weight:600;font-size:13px}
.frame{fill:none;stroke:#d1d5db}.grid line,.grid{stroke:#e5e7eb}
.ytick,.xtick{font-size:9px;fill:#6b7280;text-anchor:end}.xtick{text-anchor:start}
.xtick.end{text-anchor:end}.series{stroke-width:1.6}.threshold{stroke-dasharray:4 3}
.legend{font-size:11px;color:#4b5563}.key{margin-right:8px;white-space:nowrap}
.key i{display:inline-block;width:12px;height:3px;margin-right:3px;vertical-align:middle}
.key i.dash{height:0;border-top:2px dashed}
.heats{display:flex;flex-wrap:wrap;gap:14px}.heat{margin:0;flex:0 0 auto}
.heats .heat canvas{width:400px}.heats .heat.big{flex-basis:100%}
.heat canvas{image-rendering:pixelated;width:min(100%,520px);height:auto;
max-height:420px;border:1px solid #d1d5db;cursor:zoom-in;display:block}
.heat.big canvas,.heats .heat.big canvas{width:min(100%,1300px);max-height:none;cursor:zoom-out}
.axis{font-size:11px;color:#6b7280}
#tip{position:fixed;pointer-events:none;background:#111827;color:#fff;font-size:12px;
padding:3px 7px;border-radius:3px;display:none;white-space:pre}
"""

_JS = """
(function(){
'use strict';
var data=JSON.parse(document.getElementById('routelog-data').textContent);
var tip=document.getElementById('tip');
function show(ev,text){tip.textContent=text;tip.style.display='block';
tip.style.left=(ev.clientX+12)+'px';tip.style.top=(ev.clientY+12)+'px';}
function hide(){tip.style.display='none';}
function rgb(hex){return [parseInt(hex.slice(1,3),16),parseInt(hex.slice(3,5),16),
parseInt(hex.slice(5,7),16)];}
var lut=data.lut.map(rgb);
function decode(b64){var s=atob(b64),out=new Uint8Array(s.length);
for(var i=0;i<s.length;i++){out[i]=s.charCodeAt(i);}return out;}
document.querySelectorAll('canvas[data-heat]').forEach(function(canvas){
var h=data.heatmaps[+canvas.dataset.heat],cells=decode(h.cells);
if(cells.length!==h.rows*h.cols){throw new Error('heatmap '+canvas.dataset.heat+
': '+cells.length+' cells, expected '+h.rows*h.cols);}
var ctx=canvas.getContext('2d'),img=ctx.createImageData(h.cols,h.rows);
for(var i=0;i<cells.length;i++){var c=lut[cells[i]];img.data[4*i]=c[0];
img.data[4*i+1]=c[1];img.data[4*i+2]=c[2];img.data[4*i+3]=255;}
ctx.putImageData(img,0,0);canvas.dataset.drawn='1';
canvas.addEventListener('mousemove',function(ev){var r=canvas.getBoundingClientRect();
var col=Math.min(h.cols-1,Math.floor((ev.clientX-r.left)/r.width*h.cols));
var row=Math.min(h.rows-1,Math.floor((ev.clientY-r.top)/r.height*h.rows));
var code=cells[row*h.cols+col],what;
if(code===0){what='no data';}else if(code===1){what='dead';}else{
var ratio=(code-2)/253*h.top;what='share \\u2248 '+(ratio*h.fair[row]).toFixed(4)+
' ('+(code===255?'\\u2265 ':'')+ratio.toFixed(2)+'x fair)';}
show(ev,h.rowName+' '+h.rowLabels[row]+' \\u00b7 '+h.colName+' '+h.colLabels[col]+
'\\n'+what);});
canvas.addEventListener('mouseleave',hide);
canvas.addEventListener('click',function(){canvas.parentNode.classList.toggle('big');});
});
document.querySelectorAll('svg[data-chart]').forEach(function(svg){
var c=data.charts[+svg.dataset.chart];
svg.addEventListener('mousemove',function(ev){var r=svg.getBoundingClientRect();
var vx=(ev.clientX-r.left)/r.width*svg.viewBox.baseVal.width;
var x=c.x0+(vx-c.left)/c.width*(c.x1-c.x0),lines=[];
c.series.forEach(function(s){if(!s.x.length){return;}var best=0;
for(var i=1;i<s.x.length;i++){if(Math.abs(s.x[i]-x)<Math.abs(s.x[best]-x)){best=i;}}
lines.push(s.label+' '+s.y[best].toFixed(3)+' at step '+s.x[best]);});
show(ev,lines.join('\\n'));});
svg.addEventListener('mouseleave',hide);svg.dataset.ready='1';
});
document.body.dataset.ready='1';
})();
"""
