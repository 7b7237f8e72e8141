"""The analyze report: snapshots of the plain-text output, markdown, heatmap and plots.

Snapshots live in tests/render/snapshots/. After an intended change to the report, update them
with ``ROUTELOG_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/render`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.render.plot import Series, line_chart
from tests.conftest import SAMPLES, WriteRun, dirichlet

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
    panel = [line for line in lines if line.startswith(("  FAIL", "  WARN", "  EARLIER"))]
    # labels padded to the longest, EARLIER: the codes line up
    assert panel[0].startswith("  FAIL     collapse  layers 2*, 3*")
    assert all(line.startswith("  WARN     ") for line in panel[1:-1])
    assert panel[-1].startswith("  EARLIER  sharp_drop  layers 2, 3 · step 500")
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
    assert "| **fail** | `collapse` | layers 2\\*, 3\\* · steps 500–1100 |" in result.output
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


def _recovered_run(write_parquet_run: WriteRun) -> Path:
    """Layer 0 collapses onto expert 0 at steps 0-2 and recovers at steps 3-5; layer 1 is
    healthy throughout: every finding holds at early steps only."""
    rng = np.random.default_rng(0)
    collapsed = np.full((256, 8), 0.001)
    collapsed[:, 0] = 1 - 0.007
    return write_parquet_run(
        {
            step: {
                0: collapsed if step < 3 else dirichlet(rng, 256, 8),
                1: dirichlet(rng, 256, 8),
            }
            for step in range(6)
        }
    )


def test_findings_that_held_only_earlier_are_labelled_earlier(write_parquet_run: WriteRun) -> None:
    """The panel's label follows the status rule (fail/warn at the latest step, earlier
    after): a collapse that ended is EARLIER, not FAIL, as in the headline and the table."""
    run = _recovered_run(write_parquet_run)
    result = runner.invoke(app, ["analyze", str(run), "-k", "2", "--width", "160", "--no-cache"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "findings: 0 fail, 0 warn, " in result.output
    assert not [line for line in lines if line.startswith(("  FAIL", "  WARN"))], result.output
    labels = [line.split()[0] for line in lines if line.startswith("  EARLIER")]
    assert labels, result.output
    assert any(line.startswith("  EARLIER  collapse  layer 0 · steps 0–2") for line in lines)
    rows = {line.split()[0]: line for line in lines if "/8 " in line}
    assert " ok " in rows["0"] + " "
    assert "(collapse)" in rows["0"]

    document = json.loads(
        runner.invoke(app, ["analyze", str(run), "-k", "2", "-f", "json", "--no-cache"]).stdout
    )
    assert document["summary"]["fail"] == 0
    assert {f["status"] for f in document["findings"]} == {"earlier"}

    markdown = runner.invoke(app, ["analyze", str(run), "-k", "2", "-f", "markdown"]).stdout
    assert "| **earlier** | `collapse` |" in markdown
    assert "| **fail** |" not in markdown
    page = runner.invoke(app, ["analyze", str(run), "-k", "2", "-f", "html"]).stdout
    assert '<details class="group earlier"' in page
    assert '<details class="group fail"' not in page
