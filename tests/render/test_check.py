"""check output: the summary, JUnit XML, GitHub annotations and step summary, escaping."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.check import CheckResult, RuleResult
from routelog.cli import app
from routelog.render import make_console
from routelog.render.check import (
    escape_data,
    escape_property,
    final_line,
    github_annotations,
    junit_xml,
    markdown_summary,
    print_check,
)
from tests.conftest import SAMPLES

runner = CliRunner()
COLLAPSE = str(SAMPLES / "collapse")
THRESHOLD = ["--top-k", "2", "--min", "token_entropy_norm=0.2", "--max", "dead_experts=0"]


def rule(rule: str, layer: int, passed: bool, message: str = "m", run: str = "r") -> RuleResult:
    return RuleResult(rule, "token_entropy_norm", run, layer, 0.1, 0.2, passed, message, 10, 0.0)


def test_junit_has_one_case_per_rule_and_layer(tmp_path: Path) -> None:
    path = tmp_path / "check.xml"
    result = runner.invoke(app, ["check", COLLAPSE, *THRESHOLD, "--junit", str(path)])
    assert result.exit_code == 1, result.output
    root = ET.parse(path).getroot()
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    # collapse, rigidity, min_token_entropy_norm, max_dead_experts on 4 layers each
    assert len(cases) == 16
    assert suite.get("tests") == "16"
    names = {(c.get("classname"), c.get("name")) for c in cases}
    assert len(names) == 16
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == {
        f"{r} [collapse layer {layer}]"
        for r in ("collapse", "min_token_entropy_norm", "max_dead_experts")
        for layer in (2, 3)
    }
    assert suite.get("failures") == "6"
    for case in cases:
        failure = case.find("failure")
        if failure is not None:
            assert failure.get("message")
            assert "layer" in failure.get("message", "").lower()


def test_junit_escapes_markup() -> None:
    result = CheckResult([rule("min_x", 0, False, 'a <b> & "c"\nline')])
    root = ET.fromstring(junit_xml(result))
    failure = root.find("testsuite/testcase/failure")
    assert failure is not None
    assert failure.get("message") == 'a <b> & "c"\nline'


@pytest.mark.parametrize(
    ("text", "data", "prop"),
    [
        ("plain", "plain", "plain"),
        ("100%", "100%25", "100%25"),
        ("a\nb\r\nc", "a%0Ab%0D%0Ac", "a%0Ab%0D%0Ac"),
        ("key: a, b", "key: a, b", "key%3A a%2C b"),
        ("%0A", "%250A", "%250A"),
    ],
)
def test_workflow_command_escaping(text: str, data: str, prop: str) -> None:
    assert escape_data(text) == data
    assert escape_property(text) == prop


def test_annotations_one_error_per_failing_layer() -> None:
    result = CheckResult(
        [rule("collapse", 0, True), rule("collapse", 1, False, "50% dead:\nsee, now")]
    )
    text = github_annotations(result)
    assert text == (
        "::error title=routelog check%3A collapse (r layer 1)::50%25 dead:%0Asee, now\n"
    )
    assert github_annotations(CheckResult([rule("collapse", 0, True)])) == ""


def test_github_annotations_and_step_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = runner.invoke(app, ["check", COLLAPSE, *THRESHOLD, "--github"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("::error ")]
    assert len(errors) == 6
    assert errors[0].startswith("::error title=routelog check%3A collapse (collapse layer 2)::")
    assert "::run collapse: Layer 2 routes to a few experts only" in errors[0]
    text = summary.read_text()
    assert text.startswith("earlier step\n## routelog check: FAIL\n")
    assert "| **FAIL** | `collapse` | 2/4 |" in text
    # rigidity passes (warn only), but its warned layers are listed, not "no layer affected"
    assert (
        "| PASS | `rigidity` | 0/4 | warn: collapse layers 2, 3 · worst layer 3  "
        "token_entropy_norm 0.092 < 0.150 |"
    ) in text
    assert "- `max_dead_experts`: run collapse layer 3: dead_experts 6 at step 1100" in text
    assert text.rstrip().endswith("FAIL: 3 of 4 rules failed (6 layer checks of 16)")


def test_a_passing_run_has_no_annotations() -> None:
    result = runner.invoke(app, ["check", str(SAMPLES / "healthy"), "-k", "2", "--github"])
    assert result.exit_code == 0, result.output
    assert "::error" not in result.output
    assert result.output.rstrip().endswith("PASS: 2 rules passed (8 layer checks)")


def test_summary_reads_without_colour() -> None:
    result = CheckResult(
        [
            rule("min_token_entropy_norm", 0, True),
            rule("min_token_entropy_norm", 1, False, "layer 1 too low"),
            RuleResult("collapse", None, "r", 0, None, None, True, "no collapse finding"),
        ]
    )
    stream = io.StringIO()
    print_check(result, make_console(stream, width=100))
    lines = stream.getvalue().splitlines()
    assert lines[0] == (
        "FAIL  min_token_entropy_norm  1/2 layers failed  "
        "fails: r layer 1  token_entropy_norm 0.100 < 0.200"
    )
    assert lines[1] == "PASS  collapse                 0/1 layer failed  no layer affected"
    assert "  FAIL min_token_entropy_norm: layer 1 too low" in lines
    assert lines[-1] == "FAIL: 1 of 2 rules failed (1 layer check of 3)"
    assert all(line == line.rstrip() for line in lines)


def test_worst_passing_layer_is_the_closest_to_its_limit() -> None:
    near = RuleResult("max_max_vio", "max_vio", "r", 2, 0.9, 1.0, True, "", 5, 0.1)
    far = RuleResult("max_max_vio", "max_vio", "r", 1, 0.2, 1.0, True, "", 5, 0.8)
    (summary,) = CheckResult([far, near]).summaries()
    assert summary.worst is near
    assert final_line(CheckResult([far, near])) == "PASS: 1 rule passed (2 layer checks)"


def test_markdown_escapes_pipes() -> None:
    text = markdown_summary(CheckResult([rule("collapse", 0, False, "a | b")]))
    assert "a \\| b" in text
    assert text.startswith("## routelog check: FAIL\n")
