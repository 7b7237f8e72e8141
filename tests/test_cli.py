from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from routelog.cli import app
from tests.conftest import SAMPLES

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("routelog ")


def test_analyze_json_sample() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["runs"][0]["run"] == "healthy"
    assert len(document["metrics"]) == 12 * 4


def test_csv_to_file(tmp_path: Path) -> None:
    target = tmp_path / "m.csv"
    result = runner.invoke(
        app, ["analyze", str(SAMPLES / "healthy"), "-k", "2", "--format", "csv", "-o", str(target)]
    )
    assert result.exit_code == 0, result.output
    lines = target.read_text().splitlines()
    assert lines[0].startswith("run,step,layer,n_tokens,n_experts,top_k,token_entropy,")
    assert "load_share" not in lines[0].split(",")
    assert len(lines) == 1 + 12 * 4


def test_table_report() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "collapse"), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "collapse  steps 0–1100 (12 logged) · 4 layers · E=8 · k=2" in result.output
    layer_rows = [line.split() for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in layer_rows] == ["0", "1", "2", "3"]
    assert [row[5] for row in layer_rows] == ["0/8", "0/8", "6/8", "6/8"]


def test_debug_shows_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    plain = runner.invoke(app, ["analyze", missing])
    assert plain.exit_code == 2
    assert "Traceback" not in plain.output
    debug = runner.invoke(app, ["analyze", missing, "--debug"])
    assert debug.exit_code != 0
    assert isinstance(debug.exception, Exception)
    assert "no such file or directory" in str(debug.exception)


def test_usage_error_exit_code() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--layers", "x"])
    assert result.exit_code == 2
    assert "--layers: cannot read 'x'" in result.output


def test_python_dash_m() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "routelog", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("routelog ")
