from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import routelog
from routelog.api import RunSpec
from routelog.errors import UsageError
from tests.conftest import SAMPLES, WriteRun, dirichlet


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
