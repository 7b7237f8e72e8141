from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import routelog
from routelog import api
from routelog.api import RunSpec
from routelog.cli import app
from routelog.config import Config
from routelog.errors import UsageError
from tests.conftest import SAMPLES, WriteRun, dirichlet
from tests.test_compare import probs_for, random_ids


def test_run_spec_parsing(tmp_path: Path) -> None:
    assert RunSpec.parse("base=runs/a") == RunSpec("base", Path("runs/a"))
    assert RunSpec.parse(str(tmp_path)).name == tmp_path.name
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert RunSpec.parse(str(odd)) == RunSpec("a=b", odd)  # an existing path wins
    with pytest.raises(UsageError):
        RunSpec.parse("=x")


def test_duplicate_run_names_are_refused(write_parquet_run: WriteRun) -> None:
    root = write_parquet_run({0: {0: np.full((2, 2), 0.5)}})
    with pytest.raises(UsageError, match="two runs are named"):
        routelog.analyze([root, root])


def test_several_runs(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    a = write_parquet_run({0: {0: dirichlet(rng, 5, 4)}}, name="a")
    b = write_parquet_run({0: {0: dirichlet(rng, 5, 4)}}, name="b")
    result = routelog.analyze([a, b])
    assert result.metrics["run"].to_list() == ["a", "b"]
    assert [r.name for r in result.runs] == ["a", "b"]


def test_sample_collapse_is_visible_in_metrics() -> None:
    metrics = routelog.analyze([SAMPLES / "collapse"], top_k=2).metrics
    last = metrics.filter(metrics["step"] == metrics["step"].max()).sort("layer")
    assert last["dead_experts"].to_list()[2:] == [6, 6]
    assert all(h > 0.6 for h in last["token_entropy_norm"].to_list()[:2])
    assert all(h < 0.15 for h in last["token_entropy_norm"].to_list()[2:])


def test_selections_kept_when_tokens_known() -> None:
    run = routelog.analyze([SAMPLES / "healthy"], top_k=2).runs[0]
    assert run.selections is not None
    assert run.selections.height == 12 * 4 * 512
    assert run.selections.schema["topk"].shape == (2,)  # type: ignore[attr-defined]


runner = CliRunner()


def test_flip_rate_and_saturation_known_answer(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    final = random_ids(rng, 100)
    first = final.copy()
    first[:30] = first[:30, ::-1]  # 30 tokens: same top-2 set, top-1 flips at the last step
    middle = final.copy()
    path = write_parquet_run(
        {0: {0: probs_for(first)}, 10: {0: probs_for(middle)}, 40: {0: probs_for(final)}}
    )
    metrics = api.analyze([path], top_k=2).metrics.sort("step")
    assert metrics["flip_rate"].to_list() == [None, pytest.approx(0.3), 0.0]
    assert metrics["saturation"].to_list() == pytest.approx([1.0, 1.0, 1.0])
    top1 = write_parquet_run({0: {0: probs_for(first)}, 10: {0: probs_for(final)}}, name="top1")
    metrics = api.analyze([top1], top_k=1).metrics.sort("step")
    assert metrics["saturation"].to_list() == pytest.approx([0.7, 1.0])


def test_token_metrics_null_without_tokens(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 20)
    path = write_parquet_run({0: {0: probs_for(ids)}, 1: {0: probs_for(ids)}}, tokens=False)
    result = api.analyze([path], top_k=2)
    assert result.metrics["flip_rate"].null_count() == 2
    assert result.metrics["saturation"].null_count() == 2
    assert result.metrics.columns[-3:] == ["flip_rate", "saturation", "load_share"]


def test_early_saturation_finding_in_analyze(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(2)
    final = random_ids(rng, 100)
    early = final.copy()
    early[:50] = (final[:50] + 1) % 8  # half the tokens route elsewhere at step 0
    steps = {0: early, 100: final, 200: final, 1000: final}
    path = write_parquet_run({s: {0: probs_for(ids)} for s, ids in steps.items()})
    config = Config(rules=("early_saturation",))
    found = api.analyze([path], top_k=2, config=config).findings
    assert [(f.first_step, f.last_step, f.layer) for f in found] == [(100, 200, 0)]
    late = write_parquet_run(
        {0: {0: probs_for(early)}, 900: {0: probs_for(early)}, 1000: {0: probs_for(final)}},
        name="late",
    )
    assert api.analyze([late], top_k=2, config=config).findings == []


def test_analyze_json_and_csv_carry_token_metrics() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "drift"), "-k", "2", "-f", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    first = [m for m in document["metrics"] if m["step"] == 0]
    assert all(m["flip_rate"] is None and 0 <= m["saturation"] <= 1 for m in first)
    assert all(m["flip_rate"] is not None for m in document["metrics"] if m["step"] > 0)
    result = runner.invoke(app, ["analyze", str(SAMPLES / "drift"), "-k", "2", "-f", "csv"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split(",")
    assert header[-2:] == ["flip_rate", "saturation"]
