"""Each expert over time: shares per expert and step, the dead list, ``routelog experts``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from routelog import api
from routelog.cli import app
from routelog.diagnose import diagnose, named_experts
from routelog.experts import dead_experts, dead_since, histories, shares_frame
from tests.conftest import REAL_LOGS, SAMPLES, WriteRun, dirichlet

runner = CliRunner()
E = 8


def _dying_run(write_parquet_run: WriteRun, rng: np.random.Generator) -> Path:
    """Layer 0 healthy; layer 1: expert 3 gets no probability from step 2 on, expert 5 from
    step 1 on except a revival at step 3 (so its last streak starts at step 4)."""
    data: dict[int, dict[int, np.ndarray]] = {}
    for step in range(6):
        healthy = dirichlet(rng, 400, E, alpha=5.0)
        dying = dirichlet(rng, 400, E, alpha=5.0)
        if step >= 2:
            dying[:, 3] = 0.0
        if step >= 1 and step != 3:
            dying[:, 5] = 0.0
        dying /= dying.sum(axis=1, keepdims=True)
        data[step * 10] = {0: healthy, 1: dying}
    return write_parquet_run(data)


def _top2_shares(probs: np.ndarray) -> np.ndarray:
    """Independent count share for top-2: the two largest of each row, counted with argsort."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    counts = np.bincount(top.ravel(), minlength=probs.shape[1])
    return counts / counts.sum()


def test_shares_match_an_independent_computation(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    data = {step: {0: dirichlet(rng, 300, E).astype(np.float32)} for step in (0, 5)}
    run = write_parquet_run(data)
    analysis = api.analyze([str(run)], top_k=2)
    shares = shares_frame(analysis.expert_histories())
    assert shares.height == 2 * E
    for step, layers in data.items():
        probs = layers[0].astype(np.float32).astype(np.float64)
        got = shares.filter(pl.col("step") == step).sort("expert")
        np.testing.assert_allclose(got["load_share"].to_numpy(), _top2_shares(probs))
        np.testing.assert_allclose(got["mass_share"].to_numpy(), probs.mean(axis=0), rtol=1e-6)
    assert not shares["dead"].any()


def test_mass_share_sums_datasets(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a, b = dirichlet(rng, 100, 4), dirichlet(rng, 300, 4)
    frame = pl.DataFrame(
        {
            "step": [0] * 400,
            "layer": [0] * 400,
            "dataset": ["a"] * 100 + ["b"] * 300,
            "probs": np.vstack([a, b]).astype(np.float32),
        }
    )
    frame.write_parquet(tmp_path / "mixed.parquet")
    analysis = api.analyze([str(tmp_path / "mixed.parquet")], top_k=1)
    shares = shares_frame(analysis.expert_histories())
    expected = np.vstack([a, b]).astype(np.float32).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(shares.sort("expert")["mass_share"].to_numpy(), expected, 1e-6)


def test_dead_list_names_experts_and_the_step_they_died(write_parquet_run: WriteRun) -> None:
    run = _dying_run(write_parquet_run, np.random.default_rng(2))
    analysis = api.analyze([str(run)], top_k=2)
    dead = dead_experts(analysis.expert_histories())
    assert dead.select("layer", "expert", "since_step").rows() == [(1, 3, 20), (1, 5, 40)]
    # The count of the layer table and the list agree (one rule).
    latest = analysis.metrics.filter((pl.col("layer") == 1) & (pl.col("step") == 50))
    assert latest["dead_experts"].item() == dead.height


def test_dead_rule_is_the_kernels_rule() -> None:
    """An expert exactly at the limit is alive; just below it is dead (f_i < fraction / E)."""
    metrics = pl.DataFrame(
        {
            "run": ["r"],
            "step": [0],
            "layer": [0],
            "n_experts": [4],
            "load_share": [[0.025, 0.0249, 0.5, 0.4501]],
        }
    )
    (history,) = histories(metrics, dead_fraction=0.1)
    assert history.dead[0].tolist() == [False, True, False, False]


def test_findings_name_dead_experts(write_parquet_run: WriteRun) -> None:
    run = _dying_run(write_parquet_run, np.random.default_rng(3))
    analysis = api.analyze([str(run)], top_k=2)
    found = [f for f in analysis.findings if f.code == "underutilization"]
    assert found, [f.code for f in analysis.findings]
    assert found[0].dead_experts == [
        {"expert": 3, "since_step": 20},
        {"expert": 5, "since_step": 40},
    ]
    assert "experts 3 since step 20; 5 since step 40" in found[0].message
    # diagnose without shares computes the same list from the metrics.
    again = [f for f in diagnose(analysis.metrics, analysis.config) if f.code == found[0].code]
    assert again[0].dead_experts == found[0].dead_experts


def test_named_experts_caps_the_list() -> None:
    dead = [{"expert": i, "since_step": 100} for i in range(20)]
    assert named_experts(dead, most=3) == "experts 0, 1, 2 since step 100 and 17 more"
    assert named_experts([{"expert": 4, "since_step": 7}]) == "expert 4 since step 7"
    assert named_experts([]) == ""


def test_histories_follow_steps() -> None:
    metrics = pl.DataFrame(
        {
            "run": ["r"] * 3,
            "step": [20, 0, 10],
            "layer": [0] * 3,
            "n_experts": [2] * 3,
            "load_share": [[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]],
        }
    )
    (history,) = histories(metrics)
    assert history.steps.tolist() == [0, 10, 20]
    assert history.load[:, 1].tolist() == [0.5, 0.1, 0.0]
    assert history.dead_since.tolist() == [-1, 20]
    assert history.mass is None


def test_dead_since_against_a_loop() -> None:
    """The vectorized streak start against a plain loop, on random dead patterns."""
    rng = np.random.default_rng(5)
    dead = rng.random((30, 50)) < 0.6
    steps = np.arange(30) * 7
    expected = []
    for expert in range(50):
        column = dead[:, expert].tolist()
        if not column[-1]:
            expected.append(-1)
            continue
        start = len(column) - 1
        while start > 0 and column[start - 1]:
            start -= 1
        expected.append(int(steps[start]))
    assert dead_since(dead, steps).tolist() == expected


def test_analyze_json_lists_dead_experts() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "collapse"), "-k", "2", "-f", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    dead = {(d["layer"], d["expert"]): d["since_step"] for d in document["dead_experts"]}
    assert dead == {(layer, e): 500 for layer in (2, 3) for e in range(2, 8)}
    under = [f for f in document["findings"] if f["code"] == "underutilization"]
    assert under[0]["dead_experts"][0] == {"expert": 2, "since_step": 500}


def test_experts_command_table() -> None:
    result = runner.invoke(app, ["experts", str(SAMPLES / "collapse"), "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("collapse  layer 2 (most dead experts")
    rows = [line.split() for line in lines[3:11]]
    # dead experts first, each with the step it died; the two survivors last.
    assert [r[0] for r in rows] == ["2", "3", "4", "5", "6", "7", "0", "1"]
    assert all(r[-2] == "500" for r in rows[:6])
    assert all(r[-2] == "–" for r in rows[6:])
    assert "×" in rows[0][1]
    assert "▆" in rows[6][1]  # 0.5 = 4x the fair share: dominant
    assert "6 of 8 experts dead at the latest step" in result.output


def test_experts_command_json_every_layer() -> None:
    result = runner.invoke(app, ["experts", str(SAMPLES / "collapse"), "-k", "2", "-f", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert [layer["layer"] for layer in document["layers"]] == [0, 1, 2, 3]
    layer2 = document["layers"][2]
    assert len(layer2["steps"]) == 12
    expert = layer2["experts"][7]
    assert expert["expert"] == 7
    assert expert["dead_since"] == 500
    assert len(expert["load_share"]) == len(expert["mass_share"]) == 12
    assert expert["load_share"][-1] == 0.0


def test_experts_command_many_experts_shows_extremes(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(4)
    n = 256
    data = {}
    for step in range(4):
        probs = dirichlet(rng, 2000, n, alpha=2.0)
        probs[:, : step * 10] = 0.0  # experts die in blocks of ten at each step
        probs /= probs.sum(axis=1, keepdims=True)
        data[step] = {0: probs}
    run = write_parquet_run(data)
    result = runner.invoke(app, ["experts", str(run), "-k", "8", "--rows", "20", "--width", "100"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [line for line in lines if line.strip()[:1].isdigit() and "dead at" not in line]
    assert len(rows) == 20
    hidden = next(line for line in lines if "more experts" in line)
    assert "236 more experts" in hidden
    assert "--rows 256" in hidden
    # the first rows are the earliest deaths
    assert rows[0].split()[0] == "0"
    assert rows[0].split()[-2] == "1"
    assert max(len(line) for line in lines) <= 100
    # the hidden experts are said under the table: the columns stay where the rows put them
    header = next(line for line in lines if line.startswith("expert"))
    assert header.rstrip().endswith("dead since  final")
    assert len(header.rstrip()) == max(len(r.rstrip()) for r in rows)


def test_experts_command_errors() -> None:
    result = runner.invoke(app, ["experts", str(SAMPLES / "collapse"), "--layer", "9"])
    assert result.exit_code == 2
    assert "no layer 9; the run has layers 0, 1, 2, 3" in result.output
    result = runner.invoke(app, ["experts", str(SAMPLES / "megatron-tpe"), "--share", "mass"])
    assert result.exit_code == 2
    assert "--share mass needs router probabilities" in result.output
    result = runner.invoke(app, ["experts", str(SAMPLES / "collapse"), "-f", "markdown"])
    assert result.exit_code == 2
    assert "'markdown' is not one of 'table', 'json', 'csv'" in result.output


@pytest.mark.skipif(not REAL_LOGS.exists(), reason="real logs not present")
def test_experts_on_real_logs_show_deaths() -> None:
    result = runner.invoke(
        app, ["experts", str(REAL_LOGS / "aux-loss"), "-k", "2", "--layer", "2", "-f", "json"]
    )
    assert result.exit_code == 0, result.output
    experts = json.loads(result.output)["layers"][0]["experts"]
    died = [e for e in experts if e["dead_since"] is not None]
    assert died, "the aux-loss run's layer 2 loses experts"
    for e in died:
        since = e["dead_since"]
        steps = json.loads(result.output)["layers"][0]["steps"]
        position = steps.index(since)
        assert all(share < 0.1 / 8 for share in e["load_share"][position:])


def test_experts_mass_share_and_sort_final() -> None:
    result = runner.invoke(
        app,
        ["experts", str(SAMPLES / "collapse"), "-k", "2", "--layer", "0", "--share", "mass"],
    )
    assert result.exit_code == 0, result.output
    assert "probability mass P_i per expert" in result.output
    result = runner.invoke(
        app, ["experts", str(SAMPLES / "collapse"), "-k", "2", "-l", "3", "--sort", "final"]
    )
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[3:11]]
    finals = [float(r[-1]) for r in rows]
    assert finals == sorted(finals)


def test_experts_csv_is_one_row_per_layer_step_expert() -> None:
    result = runner.invoke(app, ["experts", str(SAMPLES / "collapse"), "-k", "2", "-f", "csv"])
    assert result.exit_code == 0, result.output
    frame = pl.read_csv(result.output.encode())
    assert frame.columns == [
        "run",
        "layer",
        "step",
        "expert",
        "n_experts",
        "load_share",
        "mass_share",
        "dead",
    ]
    assert frame.height == 4 * 12 * 8


def test_step_sampling_keeps_the_ends_and_fits() -> None:
    from routelog.render.experts import _sample

    picked = _sample(300, 62)
    assert picked[0] == 0
    assert picked[-1] == 299
    assert len(picked) <= 62
    assert picked == sorted(set(picked))
    assert _sample(10, 62) == list(range(10))
