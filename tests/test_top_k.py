"""k is never a silent guess: where it comes from, and every output saying so when assumed."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from routelog import api
from routelog.cli import app
from routelog.errors import UsageError
from routelog.options import ASSUMED_K_TEXT
from tests.conftest import REAL_LOGS, WriteRun, dirichlet

runner = CliRunner()

MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.02,
}


def _real_copy(tmp_path: Path, run: str = "aux-loss") -> Path:
    if not (REAL_LOGS / run).is_dir():
        pytest.skip("real logs not available")
    target = tmp_path / "model" / run
    shutil.copytree(REAL_LOGS / run, target)
    return target


def _config(directory: Path, **values: object) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps({**MIXTRAL_CONFIG, **values}))
    return path


def _run(write_parquet_run: WriteRun, name: str = "run", e: int = 8) -> Path:
    rng = np.random.default_rng(0)
    return write_parquet_run(
        {s: {0: dirichlet(rng, 64, e), 1: dirichlet(rng, 64, e)} for s in (0, 100)}, name=name
    )


# --- the real dumps --------------------------------------------------------------------------


def test_real_aux_loss_run_passes_check_with_k_from_config_json(tmp_path: Path) -> None:
    run = _real_copy(tmp_path)
    config = _config(run.parent)  # beside the run, as HF writes it next to a checkpoint
    result = runner.invoke(app, ["check", str(run), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "aux-loss  k=2 (num_experts_per_tok in " in result.output
    assert "assumed" not in result.output
    document = json.loads(runner.invoke(app, ["check", str(run), "-f", "json"]).output)
    [entry] = document["runs"]
    assert entry["top_k"] == 2
    assert entry["top_k_source"] == "model_config"
    assert entry["top_k_file"] == str(config.resolve())


def test_real_aux_loss_run_is_not_gated_on_an_assumed_k(tmp_path: Path) -> None:
    run = _real_copy(tmp_path)  # no config.json anywhere up to the test's .git
    # the verdict turns on k: at k=1 layers 2 and 3 of this top-2 run look collapsed
    assert runner.invoke(app, ["check", str(run), "-k", "1"]).exit_code == 1
    assert runner.invoke(app, ["check", str(run), "-k", "2"]).exit_code == 0
    result = runner.invoke(app, ["check", str(run)])
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"routelog: error: {run}: the logs do not state k (experts per token), and the "
        "verdict depends on it (dead experts and load shares count top-k choices): pass "
        "--top-k K, or set top_k in routelog.toml\n"
    )
    analyze = runner.invoke(app, ["analyze", str(run), "--width", "160"])
    assert ASSUMED_K_TEXT in analyze.output.splitlines()[0]


# --- precedence ------------------------------------------------------------------------------


def test_precedence_option_data_run_config_model_config_configuration(
    tmp_path: Path, write_parquet_run: WriteRun
) -> None:
    run = _run(write_parquet_run)
    options = api.make_options(default_top_k=4, default_top_k_file="cwd/routelog.toml")
    assert api.run_options(run, options)[0].k_source(True) == "config"
    _config(run, num_experts_per_tok=3)
    resolved, model = api.run_options(run, options)
    assert (resolved.default_top_k, resolved.default_top_k_source) == (3, "model_config")
    assert model is not None
    assert model.num_experts == 8
    (run / "routelog.toml").write_text("top_k = 2\n")
    resolved, _ = api.run_options(run, options)
    assert (resolved.default_top_k, resolved.default_top_k_source) == (2, "run_config")
    assert resolved.default_top_k_file == str(run / "routelog.toml")
    # the data's own k wins over every default; --top-k over everything
    assert resolved.k_for(5) == 5
    assert resolved.k_source(used_default=False) == "data"
    forced, _ = api.run_options(run, api.make_options(top_k=1))
    assert (forced.k_for(5), forced.k_source(True)) == (1, "option")


def test_run_config_and_model_config_reach_the_metrics(
    tmp_path: Path, write_parquet_run: WriteRun
) -> None:
    run = _run(write_parquet_run)
    _config(run.parent, num_experts_per_tok=2)
    found = api.analyze([run])
    assert found.metrics["top_k"].unique().to_list() == [2]
    assert found.runs[0].top_k_source == "model_config"
    (run / "pyproject.toml").write_text("[tool.routelog]\ntop_k = 3\n")
    found = api.analyze([run])
    assert found.metrics["top_k"].unique().to_list() == [3]
    summary = found.runs[0].summary()
    assert (summary["top_k_source"], summary["top_k_assumed"]) == ("run_config", False)


def test_configuration_in_cwd_ranks_below_config_json(
    tmp_path: Path, write_parquet_run: WriteRun
) -> None:
    run = _run(write_parquet_run)
    (tmp_path / "routelog.toml").write_text("top_k = 3\n")  # the test's cwd
    document = json.loads(runner.invoke(app, ["analyze", str(run), "-f", "json"]).output)
    assert document["runs"][0]["top_k"] == 3
    assert document["runs"][0]["top_k_source"] == "config"
    _config(run)
    document = json.loads(runner.invoke(app, ["analyze", str(run), "-f", "json"]).output)
    assert (document["runs"][0]["top_k"], document["runs"][0]["top_k_source"]) == (
        2,
        "model_config",
    )


def test_bad_run_config_is_an_error_naming_the_file(
    tmp_path: Path, write_parquet_run: WriteRun
) -> None:
    run = _run(write_parquet_run)
    (run / "routelog.toml").write_text("top_k = 0\n")
    result = runner.invoke(app, ["analyze", str(run)])
    assert result.exit_code == 2
    assert f"{run / 'routelog.toml'}: top_k must be in [1, " in result.output


# --- E and k against the data ----------------------------------------------------------------


def test_config_json_e_disagreeing_with_the_data_is_an_error(
    tmp_path: Path, write_parquet_run: WriteRun
) -> None:
    run = _run(write_parquet_run)
    config = _config(run.parent, num_local_experts=16)
    result = runner.invoke(app, ["analyze", str(run)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line
    assert "layer 0 has E=8 experts" in line
    assert f"{config.resolve()} says E=16" in line
    assert "step_000000.parquet" in line


@pytest.mark.parametrize("command", ["analyze", "check", "compare"])
def test_top_k_larger_than_e_is_an_error(command: str, write_parquet_run: WriteRun) -> None:
    run = _run(write_parquet_run, e=4)
    args = [command, str(run), *([f"b={run}"] if command == "compare" else []), "-k", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--top-k 5 is larger than E=4, the experts of layer" in result.output
    assert "Traceback" not in result.output


def test_config_json_k_larger_than_e_names_the_file(
    tmp_path: Path, write_parquet_run: WriteRun
) -> None:
    run = _run(write_parquet_run, e=4)
    config = _config(run, num_local_experts=4, num_experts_per_tok=6)
    result = runner.invoke(app, ["analyze", str(run)])
    assert result.exit_code == 2, result.output
    assert f"k=6 (num_experts_per_tok in {config.resolve()}) is larger than E=4" in result.output


# --- every output states an assumed k --------------------------------------------------------


def test_every_report_states_an_assumed_k_and_check_refuses_it(
    write_parquet_run: WriteRun,
) -> None:
    run = _run(write_parquet_run)
    other = _run(write_parquet_run, name="other")
    path = str(run)
    analyze = runner.invoke(app, ["analyze", path, "--width", "160"])
    assert ASSUMED_K_TEXT in analyze.output.splitlines()[0]
    document = json.loads(runner.invoke(app, ["analyze", path, "-f", "json"]).output)
    assert document["runs"][0]["top_k_assumed"] is True
    assert document["runs"][0]["top_k_source"] == "assumed"
    rows = list(
        csv.DictReader(io.StringIO(runner.invoke(app, ["analyze", path, "-f", "csv"]).output))
    )
    assert {row["top_k_assumed"] for row in rows} == {"true"}
    markdown = runner.invoke(app, ["analyze", path, "-f", "markdown"]).output
    assert f"**{ASSUMED_K_TEXT}**" in markdown

    compared = runner.invoke(app, ["compare", path, str(other), "--width", "160"]).output
    assert compared.splitlines()[0].endswith(ASSUMED_K_TEXT)
    compare_csv = runner.invoke(app, ["compare", path, str(other), "-f", "csv"]).output
    assert {row["top_k_assumed"] for row in csv.DictReader(io.StringIO(compare_csv))} == {"true"}
    assert (
        f"**{ASSUMED_K_TEXT}**"
        in runner.invoke(app, ["compare", path, str(other), "-f", "markdown"]).output
    )

    checked = runner.invoke(app, ["check", path])
    assert checked.exit_code == 2
    assert checked.output.startswith(f"routelog: error: {path}: the logs do not state k")
    with pytest.raises(UsageError, match=f"^--baseline {re.escape(path)}: the logs do not"):
        api.check(api.analyze(str(other), top_k=2), baseline=api.analyze(path))

    inspected = " ".join(runner.invoke(app, ["inspect", path]).output.split())
    assert f"{path}: files without their own k: {ASSUMED_K_TEXT}" in inspected
    inspect_json = json.loads(runner.invoke(app, ["inspect", path, "-f", "json"]).output)
    assert inspect_json["paths"][0]["top_k_assumed"] is True


def test_given_k_is_not_called_assumed(write_parquet_run: WriteRun) -> None:
    run = _run(write_parquet_run)
    output = runner.invoke(app, ["analyze", str(run), "-k", "2"]).output
    assert "k=2 (--top-k)" in output.splitlines()[0]
    assert "assumed" not in output


def test_assumed_k_is_yellow_where_colour_is_on(
    write_parquet_run: WriteRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    monkeypatch.delenv("NO_COLOR")
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setenv("TERM", "xterm-256color")
    from routelog.render.report import print_report

    analysis = api.analyze([_run(write_parquet_run)])
    console = Console(
        file=io.StringIO(), force_terminal=True, color_system="standard", width=160, highlight=False
    )
    print_report(analysis, console)
    header = console.file.getvalue().splitlines()[0]  # type: ignore[attr-defined]
    assert f"\x1b[33m{ASSUMED_K_TEXT}\x1b[0m" in header


def test_suggest_says_which_k_it_measured_with(write_parquet_run: WriteRun) -> None:
    run = _run(write_parquet_run)
    assumed = runner.invoke(app, ["check", "--suggest", str(run)])
    assert assumed.exit_code == 2
    assert "the logs do not state k" in assumed.output
    given = runner.invoke(app, ["check", "--suggest", str(run), "-k", "2"]).output
    assert "# Measured with k = 2: check with the same --top-k" in given
