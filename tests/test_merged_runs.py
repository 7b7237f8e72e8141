"""Several runs must not become one: files logging the same tokens of the same step and layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from routelog import api, ingest
from routelog.cli import app
from routelog.errors import ExitCode
from tests.conftest import REAL_LOGS, dirichlet

runner = CliRunner()


def _write(path: Path, step: int, tokens: np.ndarray, *, rank: int | None = None) -> Path:
    rng = np.random.default_rng(step + len(tokens))
    columns: dict[str, object] = {
        "step": np.full(len(tokens), step, dtype=np.int64),
        "layer": np.zeros(len(tokens), dtype=np.int32),
        "token": tokens.astype(np.int64),
        "probs": dirichlet(rng, len(tokens), 4).astype(np.float32),
    }
    if rank is not None:
        columns["rank"] = np.full(len(tokens), rank, dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(columns).write_parquet(path)
    return path


def test_real_dumps_directory_warns_and_check_fails() -> None:
    if not REAL_LOGS.is_dir():
        pytest.skip("real logs not available")
    analysis = api.analyze([REAL_LOGS], top_k=2, jobs=1)
    [run] = analysis.runs
    assert run.merged is not None
    assert run.merged["files"] == ["aux-loss/step_000000.pt", "collapse/step_000000.pt"]
    assert (run.merged["step"], run.merged["layer"], run.merged["tokens"]) == (0, 0, [0, 1023])
    assert (run.merged["pairs"], run.merged["of"]) == (64, 64)
    report = runner.invoke(app, ["analyze", str(REAL_LOGS), "-k", "2", "--width", "200"])
    assert report.exit_code == 0, report.output
    assert report.output.splitlines()[1].startswith(
        "warning: several runs merged into one? aux-loss/step_000000.pt"
    )
    assert "(routelog analyze DIR/*)" in " ".join(report.output.split())
    # merged, the collapse averages away and every other rule passes: the gate must not
    checked = runner.invoke(app, ["check", str(REAL_LOGS), "-k", "2", "-f", "json"])
    assert checked.exit_code == ExitCode.CHECK_FAILED, checked.output
    document = json.loads(checked.output)
    failed = {(r["rule"], r["layer"]) for r in document["rules"] if not r["passed"]}
    assert failed == {("merged_runs", layer) for layer in range(4)}
    assert document["runs"][0]["merged_runs"]["pairs"] == 64


def test_each_argument_its_own_run_does_not_warn() -> None:
    if not REAL_LOGS.is_dir():
        pytest.skip("real logs not available")
    runs = api.analyze(sorted(REAL_LOGS.iterdir()), top_k=2, jobs=1).runs
    assert [r.merged for r in runs] == [None, None]
    assert all(r.warnings == [] for r in runs)


def test_overlapping_tokens_of_one_step_warn(tmp_path: Path) -> None:
    _write(tmp_path / "run" / "a" / "step_000100.parquet", 100, np.arange(0, 64))
    _write(tmp_path / "run" / "b" / "step_000100.parquet", 100, np.arange(32, 96))
    [run] = api.analyze([tmp_path / "run"], top_k=2).runs
    assert run.merged is not None
    assert run.merged["files"] == ["a/step_000100.parquet", "b/step_000100.parquet"]
    assert run.merged["tokens"] == [32, 63]
    assert run.summary()["warnings"][0].startswith("several runs merged into one?")


def test_disjoint_token_ranges_are_sharding(tmp_path: Path) -> None:
    _write(tmp_path / "run" / "part0.parquet", 100, np.arange(0, 64))
    _write(tmp_path / "run" / "part1.parquet", 100, np.arange(64, 128))
    _write(tmp_path / "run" / "part2.parquet", 200, np.arange(0, 64))  # another step
    [run] = api.analyze([tmp_path / "run"], top_k=2).runs
    assert run.merged is None
    assert run.warnings == []


@pytest.mark.parametrize(
    "names",
    [
        ("step_000100.rank0.parquet", "step_000100.rank1.parquet"),  # routelog.record
        ("router_trace_rank0.parquet", "router_trace_rank1.parquet"),  # Megatron-style
    ],
)
def test_rank_named_shards_never_warn(tmp_path: Path, names: tuple[str, str]) -> None:
    for name in names:
        _write(tmp_path / "run" / name, 100, np.arange(64))
    [run] = api.analyze([tmp_path / "run"], top_k=2).runs
    assert run.merged is None


@pytest.mark.parametrize(
    ("name", "shard"),
    [
        ("s3://bucket/run/step_000100.rank3.parquet", True),
        ("gs://bucket/run/router_trace_rank0.jsonl", True),
        ("s3://bucket/rank3/step_000100.parquet", False),  # a prefix is not the file's name
        ("/logs/run/step_000100.parquet", False),
    ],
)
def test_shards_are_told_by_name_also_in_buckets(name: str, shard: bool) -> None:
    assert ingest.is_shard(name) is shard


def test_one_rank_in_two_files_of_one_step_warns(tmp_path: Path) -> None:
    """A rank column tells ranks apart; the same rank's tokens logged twice are not shards."""
    _write(tmp_path / "run" / "a.parquet", 100, np.arange(64), rank=0)
    _write(tmp_path / "run" / "b.parquet", 100, np.arange(64), rank=0)
    [run] = api.analyze([tmp_path / "run"], top_k=2).runs
    assert run.merged is not None


def test_rank_column_shards_never_warn(tmp_path: Path) -> None:
    _write(tmp_path / "run" / "a.parquet", 100, np.arange(64), rank=0)
    _write(tmp_path / "run" / "b.parquet", 100, np.arange(64), rank=1)
    [run] = api.analyze([tmp_path / "run"], top_k=2).runs
    assert run.merged is None
