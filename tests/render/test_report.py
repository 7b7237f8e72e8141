"""The analyze report: snapshots of the plain-text output, markdown, heatmap and plots.

Snapshots live in tests/render/snapshots/. After an intended change to the report, update them
with ``ROUTELOG_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/render`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.render.plot import Series, line_chart
from tests.conftest import SAMPLES

runner = CliRunner()
SNAPSHOTS = Path(__file__).parent / "snapshots"


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("ROUTELOG_UPDATE_SNAPSHOTS"):
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no snapshot {path}: run with ROUTELOG_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("width", [80, 160])
def test_report_snapshot(width: int) -> None:
    args = ["analyze", str(SAMPLES / "collapse"), "-k", "2", "--width", str(width)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output
    assert all(len(line) <= width for line in result.output.splitlines())
    check_snapshot(f"collapse_{width}.txt", result.output)


def test_report_with_plot_and_values_snapshot() -> None:
    args = ["analyze", str(SAMPLES / "collapse"), "-k", "2", "--width", "120", "--plot", "--values"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "token entropy (normalised) over steps" in result.output
    assert "- rigidity (0.15)" in result.output
    assert "- collapse (0.5)" in result.output
    check_snapshot("collapse_plot_values_120.txt", result.output)


def test_findings_panel_and_status_words() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "collapse"), "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    panel = [line for line in lines if line.startswith("  FAIL") or line.startswith("  WARN")]
    assert panel[0].startswith("  FAIL  collapse  layers 2*, 3*")
    assert all(line.startswith("  WARN") for line in panel[1:])
    rows = {line.split()[0]: line for line in lines if "/8 " in line}
    assert " ok" in rows["0"]
    assert rows["2"].endswith(" fail")


def test_healthy_report_says_no_findings() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "no findings" in result.output


def test_single_step_report_says_trends_need_two_steps() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "collapse"), "-k", "2", "--steps", "600"])
    assert result.exit_code == 0, result.output
    assert "trends need at least two logged steps" in result.output
    assert "sharp_drop" not in result.output


def test_markdown_snapshot() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "collapse"), "-k", "2", "-f", "markdown"])
    assert result.exit_code == 0, result.output
    assert "| **fail** | `collapse` | layers 2*, 3* · steps 500–1100 |" in result.output
    assert "| 2 | 0.106 | 0.284 | 0.333 | 0.500 | 6/8 | fail |" in result.output
    check_snapshot("collapse.md", result.output)


def test_assumed_top_k_is_reported() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "collapse")])
    assert result.exit_code == 0, result.output
    assert "k=1 assumed" in result.output


def test_line_chart_is_sized_and_marks_series() -> None:
    chart = line_chart(
        [
            Series("layer 0", [0, 100, 200], [0.9, 0.5, 0.1]),
            Series("layer 1", [0, 100], [1.0, None]),
        ],
        title="t",
        width=50,
        height=10,
        thresholds=[("rigidity", 0.15)],
    )
    lines = chart.splitlines()
    assert max(len(line) for line in lines[:-1]) == 50
    assert lines[-1] == "0 layer 0   1 layer 1   - rigidity (0.15)"
    assert any("-" * 20 in line for line in lines)
