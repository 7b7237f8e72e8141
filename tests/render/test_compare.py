from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.compare import COLUMNS
from routelog.render.compare import delta_text, direction
from tests.conftest import SAMPLES, WriteRun, dirichlet

runner = CliRunner()

HEALTHY, COLLAPSE, SHIFT = (str(SAMPLES / n) for n in ("healthy", "collapse", "shift"))


def test_direction_marks_collapse_and_recovery() -> None:
    assert direction("token_entropy_norm", -0.1) == 1
    assert direction("load_entropy_norm", 0.1) == -1
    assert direction("max_load_share", 0.1) == 1
    assert direction("max_load_share", 0.001) == 0
    assert direction("dead_experts", 1) == 1
    assert direction("dead_experts", 0) == 0
    assert delta_text("token_entropy_norm", -0.6013) == "-0.601 ✗"
    assert delta_text("dead_experts", -2) == "-2 ✓"
    assert delta_text("max_load_share", None) == ""


def test_table_side_by_side() -> None:
    result = runner.invoke(app, ["compare", HEALTHY, COLLAPSE, "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("baseline healthy  steps 0–1100 (12 logged)")
    assert "compared at step 1100" in lines[1]
    assert all(len(line) <= 100 for line in lines)
    header = next(line for line in lines if line.startswith("layer"))
    assert header.split() == [
        "layer",
        "run",
        "H_token",
        "H_load",
        "max",
        "share",
        "dead",
        "JSD",
        "agree@1",
        "overlap@k",
    ]
    collapsed = next(line for line in lines if line.strip().startswith("collapse  0.106"))
    assert "-0.580 ✗" in collapsed
    assert "6/8 +6 ✗" in collapsed
    assert "0.567" in collapsed
    assert "✗ towards collapse" in result.output


def test_json_document() -> None:
    result = runner.invoke(app, ["compare", HEALTHY, COLLAPSE, "-k", "2", "-f", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert [r["run"] for r in document["runs"]] == ["healthy", "collapse"]
    assert document["baseline"] == "healthy"
    assert document["left_out"] == []
    assert document["findings"] == []
    rows = document["comparisons"]
    assert len(rows) == 8
    assert set(rows[0]) >= {
        "layer",
        "step",
        "run",
        "baseline",
        "token_entropy_norm",
        "delta_token_entropy_norm",
        "load_entropy_norm",
        "delta_load_entropy_norm",
        "max_load_share",
        "delta_max_load_share",
        "dead_experts",
        "jsd",
        "agreement_top1",
        "overlap_topk",
    }
    layer2 = next(r for r in rows if r["layer"] == 2 and r["run"] == "collapse")
    assert layer2["jsd"] == pytest.approx(0.567, abs=1e-3)
    assert layer2["dead_experts"] == 6


def test_csv_matches_table_columns() -> None:
    result = runner.invoke(app, ["compare", HEALTHY, COLLAPSE, "-k", "2", "-f", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    columns = list(COLUMNS)
    columns.insert(columns.index("n_experts") + 1, "top_k_assumed")  # k was given: false
    assert list(rows[0]) == columns
    assert {row["top_k_assumed"] for row in rows} == {"false"}
    assert len(rows) == 8


def test_markdown_by_dataset_with_findings() -> None:
    result = runner.invoke(app, ["compare", SHIFT, "--by", "dataset", "-k", "2", "-f", "markdown"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "| layer | dataset | H_token | Δ |" in text
    assert "|---:|---|" in text
    assert "- **warn** `distribution_shift`: layer 2:" in text
    assert "- **warn** `distribution_shift`: layer 3:" in text
    assert "datasets route different tokens" in text


def test_table_by_dataset_lists_findings_and_left_out() -> None:
    result = runner.invoke(app, ["compare", SHIFT, "--by", "dataset", "-k", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("shift: datasets compared · k=2 (--top-k)\nbaseline text")
    assert "warn distribution_shift: layer 3" in result.output
    assert "left out: shift every layer (agreement_top1, overlap_topk)" in result.output


def test_left_out_in_table_and_json(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    base = write_parquet_run({0: {0: dirichlet(rng, 40, 8), 1: dirichlet(rng, 40, 8)}}, name="a")
    other = write_parquet_run({0: {0: dirichlet(rng, 40, 8)}}, name="b", tokens=False)
    result = runner.invoke(app, ["compare", str(base), str(other)])
    assert result.exit_code == 0, result.output
    assert (
        "left out: b layer 1 (layer): not logged at step 0 (baseline 'a' has it)" in result.output
    )
    assert "left out: b every layer (agreement_top1, overlap_topk)" in result.output
    result = runner.invoke(app, ["compare", str(base), str(other), "-f", "json"])
    assert result.exit_code == 0, result.output
    left_out = json.loads(result.output)["left_out"]
    assert {"run": "b", "layer": 1, "what": "layer", "reason": left_out[0]["reason"]} in left_out


def test_plot_overlays_runs_per_layer() -> None:
    result = runner.invoke(
        app, ["compare", HEALTHY, COLLAPSE, "-k", "2", "--layers", "2-3", "--plot"]
    )
    assert result.exit_code == 0, result.output
    assert "layer 2: token entropy (normalised) over steps" in result.output
    assert "layer 3: token entropy (normalised) over steps" in result.output
    assert "layer 0: token entropy" not in result.output
    assert result.output.count("0 healthy   1 collapse") == 2


def test_config_sets_the_shift_threshold(tmp_path: Path) -> None:
    config = tmp_path / "routelog.toml"
    config.write_text("top_k = 2\n[thresholds]\nshift_jsd = 0.39\n", encoding="utf-8")
    result = runner.invoke(
        app, ["compare", SHIFT, "--by", "dataset", "--config", str(config), "-f", "json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert [f["layer"] for f in document["findings"]] == [3]
    assert document["runs"][0]["top_k"] == 2
    flag = ["--shift-threshold", "0.2"]
    result = runner.invoke(
        app, ["compare", SHIFT, "--by", "dataset", "--config", str(config), "-f", "json", *flag]
    )
    assert [f["layer"] for f in json.loads(result.output)["findings"]] == [2, 3]


def test_bad_config_key_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "routelog.toml"
    config.write_text("[thresholds]\nshift_jsd = 2.0\n", encoding="utf-8")
    result = runner.invoke(app, ["compare", SHIFT, "--by", "dataset", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "shift_jsd" in result.output


def test_token_columns_only_where_the_same_tokens_were_routed() -> None:
    """Datasets route different tokens: agree@1 and overlap@k would be empty in every row,
    so neither they nor their caption are printed (the left-out line says why)."""
    for fmt in ("table", "markdown"):
        args = ["compare", SHIFT, "--by", "dataset", "-k", "2", "-f", fmt, "--width", "120"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "agree@1" not in result.output
        assert "overlap@k" not in result.output
        assert "(agreement_top1, overlap_topk): datasets route different tokens" in result.output
    markdown = runner.invoke(app, ["compare", HEALTHY, COLLAPSE, "-k", "2", "-f", "markdown"])
    assert "| JSD | agree@1 | overlap@k |" in markdown.output
    assert "agree@1, overlap@k: the same tokens' top-1 and top-k choices." in markdown.output
