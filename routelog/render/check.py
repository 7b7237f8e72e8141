"""``routelog check`` output: the summary, JSON, JUnit XML, GitHub annotations, the TOML
that ``--suggest`` prints.

Readable without colour: every rule says ``PASS`` or ``FAIL`` as a word.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from routelog.errors import printable
from routelog.render.markdown import inline
from routelog.render.text import fmt, plural

if TYPE_CHECKING:
    from rich.console import Console

    from routelog.check import CheckResult, RuleResult, RuleSummary, Suggestion

STATUS_STYLE = {"PASS": "green", "FAIL": "bold red"}
JUNIT_SUITE = "routelog check"
TITLE = "routelog check"


def check_document(result: CheckResult) -> dict[str, Any]:
    """``{"passed": bool, "rules": [{"rule", "metric", "run", "layer", "value", "threshold",
    "passed", "message"}]}``."""
    return result.to_dict()


def _status(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _num(value: float | None) -> str:
    """A rule's value or limit: whole numbers (counts) without decimals."""
    if value is not None and float(value).is_integer():
        return fmt(int(value))
    return fmt(value)


def _compared(worst: RuleResult) -> str:
    """``token_entropy_norm 0.031 < 0.200``: the value against its limit."""
    if worst.value is None:
        return ""
    if worst.threshold is None:
        return f"{worst.metric} {_num(worst.value)}"
    value, threshold = worst.value, worst.threshold
    op = "<" if value < threshold else ">" if value > threshold else "="
    return f"{worst.metric} {_num(value)} {op} {_num(threshold)}"


def layers_text(results: list[RuleResult]) -> str:
    """Every layer of ``results``, by run: ``collapse layers 0, 2, 3; aux-loss layer 1``."""
    by_run: dict[str, list[int]] = {}
    for result in results:
        by_run.setdefault(result.run, []).append(result.layer)
    parts = []
    for run, layers in by_run.items():
        noun = "layer" if len(layers) == 1 else "layers"
        parts.append(f"{run} {noun} {', '.join(map(str, sorted(set(layers))))}")
    return "; ".join(parts)


def _worst_text(summary: RuleSummary) -> str:
    """``fails: run layers 0, 3 · worst layer 3  load_entropy_norm 0.003 < 0.500``: every
    failing (else warned) layer, then the worst with its value against the limit."""
    worst = summary.worst
    if worst is None:
        return "no layer affected"
    compared = f"  {_compared(worst)}".rstrip()
    if not summary.affected and worst.earlier:  # the value is from then, not from now
        return f"earlier only: {worst.run} layer {worst.layer} at step {worst.step}{compared}"
    if not summary.affected:
        return f"worst: {worst.run} layer {worst.layer}{compared}"
    label = "fails" if not summary.passed else "warn"
    listed = layers_text(summary.affected)
    if len(summary.affected) == 1:
        return f"{label}: {listed}{compared}"
    return f"{label}: {listed} · worst layer {worst.layer}{compared}"


def final_line(result: CheckResult) -> str:
    """``PASS: 4 rules`` or ``FAIL: 1 of 4 rules failed (2 layer checks)``."""
    summaries = result.summaries()
    failed = [s for s in summaries if not s.passed]
    rules = plural(len(summaries), "rule")
    if not failed:
        return f"PASS: {rules} passed ({plural(len(result.rules), 'layer check')})"
    checks = len(result.failures)
    return (
        f"FAIL: {len(failed)} of {rules} failed "
        f"({plural(checks, 'layer check')} of {len(result.rules)})"
    )


def run_lines(result: CheckResult) -> list[str]:
    """One header line per checked run: its name and k (where it came from, or that it is
    assumed), then its run-level warnings."""
    from routelog.render.report import k_plain

    lines = []
    for run in result.runs:
        lines.append(f"{run['run']}  {k_plain(run)}")
    return lines


def print_check(result: CheckResult, console: Console) -> None:
    """A header line per run (its k); each rule with PASS or FAIL, failing layers and the
    worst layer; the failures' messages; notes; a last line with the verdict."""
    from rich.markup import escape

    from routelog.render.report import data_notes, k_markup

    for run in result.runs:
        console.print(f"[bold]{escape(run['run'])}[/bold]  {k_markup(run)}", soft_wrap=True)
        for note in data_notes(run):
            console.print(f"  {note}", style="dim", markup=False, soft_wrap=True)
    if result.runs:
        console.print()
    summaries = result.summaries()
    if not summaries:
        console.print("no rules to check")
    rule_width = max((len(s.rule) for s in summaries), default=0)
    count_width = max((len(_failed_count(s)) for s in summaries), default=0)
    for summary in summaries:
        status = _status(summary.passed)
        style = STATUS_STYLE[status]
        line = (
            f"{summary.rule:<{rule_width}}  {_failed_count(summary):>{count_width}}  "
            f"{_worst_text(summary)}"
        )
        console.print(f"[{style}]{status}[/{style}]  {escape(line)}", soft_wrap=True)
    if result.failures:
        console.print()
        for failure in result.failures:
            text = f"{failure.rule}: {failure.message}"
            console.print(f"  [bold red]FAIL[/bold red] {escape(text)}", soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {escape(note)}", style="dim", soft_wrap=True)
    status = _status(result.passed)
    console.print(escape(final_line(result)), style=STATUS_STYLE[status])


def _failed_count(summary: RuleSummary) -> str:
    return f"{summary.failed}/{plural(summary.total, 'layer')} failed"


# --- JUnit -----------------------------------------------------------------------------------


def junit_xml(result: CheckResult) -> bytes:
    """One testsuite; one testcase per rule and layer (``classname`` the rule, ``name`` the
    run and layer); a ``<failure message=...>`` for each failing one."""
    suite = ET.Element(
        "testsuite",
        name=JUNIT_SUITE,
        tests=str(len(result.rules)),
        failures=str(len(result.failures)),
        errors="0",
        skipped="0",
    )
    if result.runs:
        properties = ET.SubElement(suite, "properties")
        for run in result.runs:
            from routelog.render.report import k_plain

            for key, value in (
                ("top_k", _k_value(run["top_k"])),
                ("top_k_source", run["top_k_source"]),
                ("k", k_plain(run)),
            ):
                ET.SubElement(properties, "property", name=f"{run['run']}.{key}", value=str(value))
    for rule in result.rules:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"routelog.check.{rule.rule}",
            name=f"{rule.rule} [{rule.run} layer {rule.layer}]",
        )
        if not rule.passed:
            failure = ET.SubElement(case, "failure", message=rule.message, type=rule.rule)
            failure.text = rule.message
        else:
            out = ET.SubElement(case, "system-out")
            out.text = rule.message
    for element in suite.iter():  # names and messages: no character XML 1.0 forbids
        element.attrib = {key: _xml_text(value) for key, value in element.attrib.items()}
        element.text = _xml_text(element.text) if element.text else element.text
    suites = ET.Element("testsuites", name=JUNIT_SUITE)
    suites.append(suite)
    ET.indent(suites)
    document: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return document + b"\n"


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text: str) -> str:
    """``text`` with what XML 1.0 forbids (and DEL, C1) shown as escapes; tabs and line
    breaks are kept (XML allows them)."""
    return _NOT_XML.sub(_xml_escape, text)


def _xml_escape(found: re.Match[str]) -> str:
    char = found.group()
    shown = printable(char)
    return shown if shown != char else f"\\u{ord(char):04x}"  # U+FFFE, U+FFFF


# --- GitHub Actions --------------------------------------------------------------------------


def escape_data(text: str) -> str:
    """A workflow command's message: ``%``, carriage return and newline are escaped (so a
    name's newline cannot start a workflow command of its own), then any other control
    character shown as an escape (:func:`routelog.errors.printable`)."""
    return printable(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def escape_property(text: str) -> str:
    """A workflow command's property value: also ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(result: CheckResult) -> str:
    """One ``::error title=...::message`` line per failing rule and layer."""
    lines = []
    for failure in result.failures:
        title = f"{TITLE}: {failure.rule} ({failure.run} layer {failure.layer})"
        lines.append(f"::error title={escape_property(title)}::{escape_data(failure.message)}")
    return "".join(f"{line}\n" for line in lines)


def markdown_summary(result: CheckResult) -> str:
    """The step summary (``GITHUB_STEP_SUMMARY``) and ``--format markdown``: verdict, a
    table of rules, the failures."""
    lines = [f"## {TITLE}: {_status(result.passed)}", ""]
    for line in run_lines(result):
        lines.append(f"{inline(line)}  ")
    if result.runs:
        lines.append("")
    lines += ["| status | rule | failed layers | worst layer |", "|---|---|---|---|"]
    for summary in result.summaries():
        status = _status(summary.passed)
        mark = f"**{status}**" if not summary.passed else status
        lines.append(
            f"| {mark} | `{summary.rule}` | {summary.failed}/{summary.total} | "
            f"{inline(_worst_text(summary))} |"
        )
    if result.failures:
        lines += ["", "### Failures", ""]
        lines += [f"- `{f.rule}`: {inline(f.message)}" for f in result.failures]
    if result.notes:
        lines += ["", *[f"> {inline(note)}" for note in result.notes]]
    lines += ["", final_line(result), ""]
    return "\n".join(lines)


# --- --suggest -------------------------------------------------------------------------------


def _k_value(top_k: int | list[int] | None) -> str:
    """A run's ``top_k`` as a property value: ``2``, ``2/8`` (files differ), or empty."""
    if top_k is None:
        return ""
    return "/".join(map(str, top_k)) if isinstance(top_k, list) else str(top_k)


def suggestion_toml(
    suggestions: list[Suggestion],
    *,
    run: str,
    step: int,
    top_k: list[int],
    window: int | None,
) -> str:
    """A ``[tool.routelog.check]`` table, each threshold with what was observed."""
    from routelog.check import MARGIN_ABS, MARGIN_REL

    at = f"latest step {step}" if window is None else f"mean of the last {window} logged steps"
    k = ", ".join(map(str, top_k))
    lines = [
        f"# routelog check thresholds suggested from the healthy run {run!r} ({at}).",
        f"# Margin: min_ thresholds = lowest value over layers - max({MARGIN_ABS:g}, "
        f"{MARGIN_REL:.0%} of it), floored at 0;",
        f"# max_ thresholds = highest value + max({MARGIN_ABS:g}, {MARGIN_REL:.0%} of it), "
        "capped at the metric's maximum;",
        "# max_dead_experts = the highest count (no margin). Rounded outwards to 3 decimals.",
        (
            f"# Measured with k = {k}: check with the same --top-k (or top_k in [tool.routelog])."
            if top_k
            else "# Measured on per-expert counts, which need no k."
        ),
        "# Fail findings (collapse, rigidity) fail the check too; list codes in fail_on to",
        "# fail on warnings, and add [tool.routelog.check.max_regression] for --baseline.",
        "[tool.routelog.check]",
    ]
    for s in suggestions:
        value = f"{s.value:.0f}" if s.key == "max_dead_experts" else f"{s.value:.3f}"
        lines.append(f"{s.key} = {value}  # observed {_num(s.observed)} (layer {s.layer})")
    return "\n".join(lines) + "\n"
