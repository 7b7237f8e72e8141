"""Configuration: discovery upwards, pyproject vs routelog.toml, --config, bad keys (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.config import Config, find_config, load_config
from routelog.errors import ConfigError
from tests.conftest import SAMPLES

runner = CliRunner()


def test_defaults_without_a_file(tmp_path: Path) -> None:
    if find_config(tmp_path) is None:
        assert load_config(start=tmp_path) == Config()


def test_routelog_toml_found_upwards(tmp_path: Path) -> None:
    (tmp_path / "routelog.toml").write_text("top_k = 2\n[thresholds]\ncollapse_entropy = 0.4\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    config = load_config(start=deep)
    assert config.path == tmp_path / "routelog.toml"
    assert (config.top_k, config.thresholds.collapse_entropy) == (2, 0.4)
    assert config.source("top_k") == str(tmp_path / "routelog.toml")
    assert config.source("dead_fraction") == "default"


def test_pyproject_needs_a_tool_routelog_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.routelog]\ndead_fraction = 0.2\n")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    config = load_config(start=inner)
    assert config.path == tmp_path / "pyproject.toml"
    assert config.dead_fraction == 0.2


def test_routelog_toml_wins_in_the_same_directory(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.routelog]\ntop_k = 3\n")
    (tmp_path / "routelog.toml").write_text("top_k = 4\n")
    assert load_config(start=tmp_path).top_k == 4


def test_explicit_config_file_and_check_table(tmp_path: Path) -> None:
    path = tmp_path / "custom.toml"
    path.write_text('rules = ["collapse"]\n[check]\nfail_on = ["collapse"]\n')
    config = load_config(path)
    assert config.rules == ("collapse",)
    assert config.check.fail_on == ("collapse",)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("[thresholds]\nnope = 1\n", "thresholds.'nope'"),
        ("top_k = 0\n", "top_k"),
        ("dead_fraction = 1.5\n", "dead_fraction"),
        ("[thresholds]\ncollapse_entropy = 2\n", "thresholds.collapse_entropy"),
        ("[thresholds]\nskew_min_steps = 1.5\n", "thresholds.skew_min_steps"),
        ('rules = ["collapse", "nosuch"]\n', "nosuch"),
        ("top_k = \n", "not valid TOML"),
    ],
)
def test_bad_values_exit_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "routelog.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert key.replace("'", "") in result.output.replace("'", "")
    assert str(path) in result.output


def test_bad_key_in_pyproject_names_the_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.routelog]\ntopk = 2\n")
    with pytest.raises(ConfigError, match=r"pyproject.toml: unknown key \[tool.routelog\] 'topk'"):
        load_config(start=tmp_path)


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2, result.output
    assert "none.toml" in result.output


def test_config_command_shows_sources(tmp_path: Path) -> None:
    path = tmp_path / "routelog.toml"
    path.write_text("top_k = 2\n[thresholds]\nrigidity_warn = 0.2\n")
    result = runner.invoke(app, ["config", "--config", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    settings = {row["key"]: row for row in document["settings"]}
    assert settings["top_k"] == {"key": "top_k", "value": 2, "source": str(path)}
    assert settings["thresholds.rigidity_warn"]["value"] == 0.2
    assert settings["dead_fraction"]["source"] == "default"
    table = runner.invoke(app, ["config", "--config", str(path)])
    assert table.exit_code == 0, table.output
    assert "thresholds.rigidity_warn" in table.output
    assert str(path) in table.output


def test_config_feeds_analyze(tmp_path: Path) -> None:
    path = tmp_path / "routelog.toml"
    path.write_text('top_k = 2\nrules = ["rigidity"]\n')
    result = runner.invoke(
        app, ["analyze", str(SAMPLES / "collapse"), "--config", str(path), "-f", "json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["runs"][0]["top_k"] == 2
    assert {f["code"] for f in document["findings"]} == {"rigidity"}


def test_search_stops_at_the_repository_root(tmp_path: Path) -> None:
    """A configuration above the git repository does not configure the project in it."""
    outer = tmp_path / "outer"
    project = outer / "project"
    (project / ".git").mkdir(parents=True)
    (project / "runs").mkdir()
    (outer / "routelog.toml").write_text("top_k = 3\n")
    assert find_config(project / "runs") is None
    (project / "routelog.toml").write_text("top_k = 2\n")
    assert find_config(project / "runs") == (project / "routelog.toml").resolve()
