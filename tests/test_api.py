from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from routelog import api
from routelog.cli import app
from tests.conftest import SAMPLES, WriteRun
from tests.test_compare import probs_for, random_ids

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
    (finding,) = api.analyze([path], top_k=2).findings
    assert (finding.code, finding.first_step, finding.layer) == ("early_saturation", 100, 0)
    late = write_parquet_run(
        {0: {0: probs_for(early)}, 900: {0: probs_for(early)}, 1000: {0: probs_for(final)}},
        name="late",
    )
    assert api.analyze([late], top_k=2).findings == []


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
