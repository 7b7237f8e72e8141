from __future__ import annotations

import json

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
