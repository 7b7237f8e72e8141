"""``analyze --format markdown``: findings and the per-layer table, for an issue or a PR."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import polars as pl

from routelog.errors import printable
from routelog.findings import worst
from routelog.render.report import finding_groups, headline, k_plain, layer_status, where
from routelog.render.text import fmt, plural

if TYPE_CHECKING:
    from routelog.api import Analysis


_SYNTAX = re.compile(r"([\\`*\[\]|]|<(?=[A-Za-z/!?]))")  # "<" only where a tag could start


def inline(text: str) -> str:
    r"""Text from the data (run and file names, messages) made inert in Markdown: control
    characters escaped (one line), and the characters that would start Markdown or HTML
    (``\ ` * [ ] |``, a ``<`` before a tag name) backslash-escaped; it renders as the
    text it is.

    Examples
    --------
    >>> inline("a|b*<script>\n"), inline("0.1 < 0.2")
    ('a\\|b\\*\\<script>\\\\n', '0.1 < 0.2')
    """
    return _SYNTAX.sub(r"\\\1", printable(text))


def analysis_markdown(analysis: Analysis) -> str:
    """One section per run: a findings table, then the per-layer table at the latest step."""
    out: list[str] = []
    for run in analysis.runs:
        metrics = analysis.metrics.filter(pl.col("run") == run.name)
        findings = [f for f in analysis.findings if f.run == run.name]
        steps = metrics["step"].unique().sort().to_list()
        summary = run.summary()
        k = inline(k_plain(summary))
        out += [
            f"### routelog: {inline(run.name)}",
            "",
            f"Steps {steps[0]}–{steps[-1]} ({len(steps)} logged), "
            f"{plural(metrics['layer'].n_unique(), 'layer')}, "
            + (f"**{k}**" if summary["top_k_assumed"] else k)
            + ".",
            "",
        ]
        if findings:
            out += [f"Findings: {headline(findings)}.", ""]
            out += ["| status | finding | where (* = still holds) | what to look at |"]
            out += ["|---|---|---|---|"]
            for severity, code, group in finding_groups(findings):
                out.append(
                    f"| **{severity}** | `{code}` | {inline(where(group))} | "
                    f"{inline(worst(group).message)} |"
                )
        else:
            out.append("No findings on any layer.")
        if len(steps) < 2:
            out += ["", "Only one logged step: trends need at least two steps."]
        out += [
            "",
            "| layer | H_token | H_load | H_assign | max share | dead | status | codes |",
            "|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        latest = metrics.group_by("layer").agg(pl.all().sort_by("step").last()).sort("layer")
        for row in latest.iter_rows(named=True):
            status, codes = layer_status(findings, row["layer"])
            out.append(
                f"| {row['layer']} | {fmt(row['token_entropy_norm'])} | "
                f"{fmt(row['load_entropy_norm'])} | {fmt(row['assign_entropy_norm'])} | "
                f"{fmt(row['max_load_share'])} | {fmt(row['dead_experts'])}/{row['n_experts']} | "
                f"{status} | {inline(', '.join(codes))} |"
            )
        out.append("")
    return "\n".join(out)
