"""Every command has help text and a README section; the README's commands exist."""

from __future__ import annotations

import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from routelog.cli import app
from tests.conftest import REPO

runner = CliRunner()
README = (REPO / "README.md").read_text(encoding="utf-8")


def _commands() -> list[str]:
    group = get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", _commands())
def test_command_has_help_and_readme_section(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output, f"{command} --help should end with an example"
    assert f"### `routelog {command}" in README, f"README lacks a section for {command}"


def test_short_help_flag() -> None:
    result = runner.invoke(app, ["-h"])
    assert result.exit_code == 0, result.output
    for command in _commands():
        assert command in result.output


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:600]
    assert "make demo" in head
    assert "make test" in head


def test_every_metric_is_documented() -> None:
    from routelog.kernels import METRICS

    for metric in METRICS:
        assert re.search(rf"`{metric}`", README), metric
