"""Hostile names: a run directory or file named with terminal escapes, a newline, Markdown,
workflow-command and HTML syntax comes out inert in every command and format (issue 11 §1).

The name below holds ESC[2J (clear the screen), a colour code, a bell, a C1 CSI, a newline,
a Markdown table pipe, a GitHub workflow command, rich markup and an HTML script element.
Each output is checked for what would make it act: a raw ESC or newline from the name, an
unescaped ``|`` in a Markdown cell, a line starting a workflow command, markup that rich
would parse, a ``<script>`` in HTML, XML that XML 1.0 forbids.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.errors import printable
from tests.conftest import SAMPLES

runner = CliRunner()

HOSTILE = "ev\x1b[2Jil\x1b[31mred\x07\x9b1m\n|cell|::error::x[bold]*<script>alert(1)"
"""Every trick at once, in one directory name (no ``/``, no NUL: a valid file name)."""

RAW = ("\x1b", "\x07", "\x9b", "red\n|cell")
"""What must never reach an output raw (colour off: no ESC at all)."""


@pytest.fixture
def hostile_run(tmp_path: Path) -> Path:
    """The collapse sample (fails and warns) under the hostile directory name."""
    run = tmp_path / HOSTILE
    run.mkdir()
    for step in ("000000", "000100", "000400", "000500", "000600"):
        shutil.copy(SAMPLES / "collapse" / f"step_{step}.parquet", run)
    return run


def _invoke(*args: str, code: int = 1) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result.stdout + result.stderr


def _assert_inert_text(output: str) -> None:
    for raw in RAW:
        assert raw not in output, (raw, output)
    # the name is shown, escaped, its markup shown as text (not parsed by rich)
    assert printable(HOSTILE) in output.replace("\n", ""), output


def _pipes(line: str) -> int:
    return line.replace("\\\\", "").replace("\\|", "").count("|")


def _assert_inert_markdown(output: str) -> None:
    for raw in RAW:
        assert raw not in output, (raw, output)
    assert not re.search(r"(?<!\\)<script", output), output  # \<script renders as text
    assert "|cell|" not in output
    assert "::error::" not in output.replace("::error::x", "")  # no workflow command either
    header = 0
    previous = ""
    for line in output.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                header = _pipes(line)
            # a name's pipes are escaped: every row has as many cells as its header
            assert _pipes(line) == header, line
        previous = line


@pytest.mark.parametrize("command", ["analyze", "experts", "check"])
def test_text_reports_print_the_name_inert(command: str, hostile_run: Path) -> None:
    code = {"analyze": 0, "experts": 0, "check": 1}[command]
    _assert_inert_text(_invoke(command, str(hostile_run), "-k", "2", code=code))
    coloured = _invoke(command, str(hostile_run), "-k", "2", "--color", "always", code=code)
    assert "\x1b[2J" not in coloured
    assert "\x1b[31mred" not in coloured
    assert "\x07" not in coloured


def test_analyze_with_plots_and_values_prints_the_name_inert(hostile_run: Path) -> None:
    _assert_inert_text(
        _invoke("analyze", str(hostile_run), "-k", "2", "--plot", "--values", code=0)
    )


def test_compare_names_and_plots_are_inert(hostile_run: Path) -> None:
    named = f"{HOSTILE}={hostile_run}"
    base = str(SAMPLES / "collapse")
    out = _invoke("compare", base, named, "-k", "2", "--plot", code=0)
    _assert_inert_text(out)
    markdown = _invoke("compare", base, named, "-k", "2", "-f", "markdown", code=0)
    _assert_inert_markdown(markdown)
    _assert_html(_invoke("compare", base, named, "-k", "2", "-f", "html", code=0))
    _assert_csv(_invoke("compare", base, named, "-k", "2", "-f", "csv", code=0))


@pytest.mark.parametrize("command", ["analyze", "check"])
def test_markdown_cells_are_inert(command: str, hostile_run: Path) -> None:
    code = {"analyze": 0, "check": 1}[command]
    _assert_inert_markdown(
        _invoke(command, str(hostile_run), "-k", "2", "-f", "markdown", code=code)
    )


def _assert_html(page: str) -> None:
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)" in page
    assert "\x1b" not in page
    assert page.count("<script") == 2  # the data element and routelog's own drawing code


@pytest.mark.parametrize("command", ["analyze", "check"])
def test_html_is_escaped(command: str, hostile_run: Path) -> None:
    code = {"analyze": 0, "check": 1}[command]
    _assert_html(_invoke(command, str(hostile_run), "-k", "2", "-f", "html", code=code))


def _assert_csv(text: str) -> None:
    assert "\x1b" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    names = {row.get("run") for row in rows}
    assert printable(HOSTILE) in names, names


@pytest.mark.parametrize("command", ["analyze", "experts", "check"])
def test_csv_names_are_escaped(command: str, hostile_run: Path) -> None:
    code = {"analyze": 0, "experts": 0, "check": 1}[command]
    _assert_csv(_invoke(command, str(hostile_run), "-k", "2", "-f", "csv", code=code))


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


@pytest.mark.parametrize("command", ["analyze", "check", "inspect"])
def test_json_keeps_the_exact_name(command: str, hostile_run: Path) -> None:
    """JSON is data: the name is exact, its control characters escaped by JSON itself."""
    result = runner.invoke(app, [command, str(hostile_run), "-k", "2", "-f", "json"])
    assert result.exit_code == {"check": 1}.get(command, 0), result.stderr
    assert "\x1b" not in result.stdout
    assert any(HOSTILE in text for text in _strings(json.loads(result.stdout)))


def test_inspect_table_is_inert(hostile_run: Path) -> None:
    _assert_inert_text(_invoke("inspect", str(hostile_run), code=0))
    _assert_inert_text(_invoke("inspect", str(hostile_run / "step_000100.parquet"), code=0))


def test_junit_is_valid_xml(hostile_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "junit.xml"
    _invoke("check", str(hostile_run), "-k", "2", "--junit", str(target))
    document = target.read_bytes()
    root = ET.fromstring(document)  # expat refuses what XML 1.0 forbids
    assert b"\x1b" not in document
    names = [case.get("name", "") for case in root.iter("testcase")]
    # XML allows a line break (an attribute keeps it as &#10;); the escapes are shown
    assert any(printable(HOSTILE) in printable(name) for name in names), names


def test_github_annotations_and_summary_are_inert(
    hostile_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = runner.invoke(app, ["check", str(hostile_run), "-k", "2", "--github"])
    assert result.exit_code == 1, result.stderr
    annotations = [line for line in result.stdout.splitlines() if line.startswith("::")]
    assert annotations
    # every workflow command is routelog's own: the name cannot start one
    assert all(line.startswith("::error title=routelog check") for line in annotations)
    assert "::error::x" not in "\n".join(line.split("::", 2)[1] for line in annotations)
    assert "\x1b" not in result.stdout
    _assert_inert_markdown(summary.read_text(encoding="utf-8"))


def test_watch_lines_are_inert(hostile_run: Path) -> None:
    result = runner.invoke(
        app, ["watch", str(hostile_run), "-k", "2", "--interval", "0.1", "--fail-on", "warn"]
    )
    assert result.exit_code == 1, (result.stdout, result.stderr)
    _assert_inert_text(result.stdout + result.stderr)


def test_export_names_the_directory_inert(hostile_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    target = tmp_path / f"tb{HOSTILE}"
    result = runner.invoke(
        app, ["export", str(hostile_run), "-k", "2", "--tensorboard", str(target)]
    )
    assert result.exit_code == 0, result.stderr
    for raw in RAW:
        assert raw not in result.stderr
    assert printable(str(target)) in result.stderr


def test_error_messages_name_the_file_inert(tmp_path: Path) -> None:
    bad = tmp_path / f"{HOSTILE}.parquet"
    bad.write_bytes(b"not parquet")
    result = runner.invoke(app, ["analyze", str(bad)])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    for raw in RAW:
        assert raw not in result.stderr


def test_an_undecodable_name_is_shown_not_crashed_on() -> None:
    """A name that is not UTF-8 (a surrogate escape in Python: an argument or a file name
    with a byte such as 0xff) is shown as that byte, in every format."""
    named = f"run\udcff={SAMPLES / 'collapse'}"
    for fmt in ("table", "markdown", "csv", "html"):
        result = runner.invoke(app, ["analyze", named, "-k", "2", "-f", fmt])
        assert result.exit_code == 0, (fmt, result.stderr)
        shown = "run\\\\xff" if fmt == "markdown" else "run\\xff"  # Markdown escapes the \\
        assert shown in result.stdout, (fmt, result.stdout[:200])
    for command in ("check", "experts", "compare"):
        args = [named, str(SAMPLES / "collapse")] if command == "compare" else [named]
        result = runner.invoke(app, [command, *args, "-k", "2"])
        assert result.exit_code in (0, 1), (command, result.stderr)
        assert "run\\xff" in result.stdout, (command, result.stdout[:200])
