"""Every table layout gives the metrics of the same data as per-token probability rows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import routelog
from routelog import ingest
from routelog.cli import app
from routelog.errors import InputError
from routelog.ingest import table
from routelog.kernels import PROBABILITY_METRICS
from tests.conftest import WriteRun, dirichlet

runner = CliRunner()
E, K, T = 6, 2, 40
COUNT_METRICS = ["assign_entropy", "assign_entropy_norm", "max_load_share", "max_vio", "load_cv"]


@pytest.fixture
def data() -> dict[int, dict[int, np.ndarray]]:
    rng = np.random.default_rng(7)
    return {
        step: {layer: dirichlet(rng, T, E, alpha=0.3).astype(np.float32) for layer in range(3)}
        for step in (0, 100)
    }


def rows(data: dict[int, dict[int, np.ndarray]]) -> list[tuple[int, int, np.ndarray]]:
    return [(step, layer, m) for step, layers in data.items() for layer, m in layers.items()]


def selected(matrix: np.ndarray, k: int = K) -> np.ndarray:
    """Top-k ids by an independent route: a stable sort of -p (ties to the lower index)."""
    return np.argsort(-matrix.astype(np.float64), axis=1, kind="stable")[:, :k]


def metrics(path: Path, **options: object) -> pl.DataFrame:
    result = routelog.analyze([f"run={path}"], **options)  # type: ignore[arg-type]
    return result.metrics.sort("step", "layer")


@pytest.fixture
def reference(data: dict[int, dict[int, np.ndarray]], write_parquet_run: WriteRun) -> pl.DataFrame:
    # no token column: none of the layouts below carries one (token metrics stay null)
    return metrics(write_parquet_run(data, name="ref", tokens=False), top_k=K)


def test_wide_probability_columns_match(
    data: dict[int, dict[int, np.ndarray]], reference: pl.DataFrame, tmp_path: Path
) -> None:
    frame = pl.concat(
        pl.DataFrame(
            {"step": [s] * T, "layer": [layer] * T, **{f"p_{i}": m[:, i] for i in range(E)}}
        )
        for s, layer, m in rows(data)
    )
    # columns out of order on purpose: the layout sorts them by expert index
    frame.select("step", "layer", *[f"p_{i}" for i in reversed(range(E))]).write_parquet(
        tmp_path / "wide.parquet"
    )
    assert_frame_equal(metrics(tmp_path / "wide.parquet", top_k=K), reference)


def test_wide_logit_columns_match(
    data: dict[int, dict[int, np.ndarray]], reference: pl.DataFrame, tmp_path: Path
) -> None:
    frame = pl.concat(
        pl.DataFrame(
            {
                "step": [s] * T,
                "layer": [layer] * T,
                **{f"logit_{i}": np.log(m[:, i]) + 3.0 for i in range(E)},
            }
        )
        for s, layer, m in rows(data)
    )
    frame.write_parquet(tmp_path / "wide.parquet")
    got = metrics(tmp_path / "wide.parquet", top_k=K)
    columns = ["token_entropy", "load_entropy", "max_load_share", "dead_experts", "aux_loss"]
    assert_frame_equal(got.select(columns), reference.select(columns), abs_tol=1e-5)
    assert got["z_loss"].null_count() == 0  # logits were seen


@pytest.mark.parametrize(
    ("name", "write", "place"),
    [
        (
            "step_0.parquet",
            lambda path: pl.DataFrame(
                {"layer": [0, 0], "p_0": [0.5, None], "p_1": [0.5, 0.5]}
            ).write_parquet(path),
            "row 1",
        ),
        (
            "step_0.jsonl",
            lambda path: path.write_text(
                '{"layer": 0, "p_0": 0.5, "p_1": 0.5}\n{"layer": 0, "p_1": 0.5}\n'
            ),
            ":2",
        ),
    ],
)
def test_a_missing_wide_column_value_names_the_column(
    tmp_path: Path, name: str, write: Any, place: str
) -> None:
    path = tmp_path / name
    write(path)
    result = runner.invoke(app, ["analyze", str(path), "-k", "1"])
    assert result.exit_code == 2
    assert f"{path}{' ' if place[0] == 'r' else ''}{place}: missing 'p_0' value" in result.output
    skipped = runner.invoke(app, ["analyze", str(path), "-k", "1", "--skip-bad-rows", "-f", "json"])
    assert skipped.exit_code == 0, skipped.output
    assert '"skipped_rows": 1' in skipped.output


def counts_of(data: dict[int, dict[int, np.ndarray]]) -> list[tuple[int, int, np.ndarray]]:
    return [(s, layer, np.bincount(selected(m).ravel(), minlength=E)) for s, layer, m in rows(data)]


def assert_count_metrics(got: pl.DataFrame, reference: pl.DataFrame) -> None:
    assert_frame_equal(
        got.select("step", "layer", "n_experts", *COUNT_METRICS, "dead_experts"),
        reference.select("step", "layer", "n_experts", *COUNT_METRICS, "dead_experts"),
    )
    assert got.select(PROBABILITY_METRICS).null_count().row(0) == (got.height,) * len(
        PROBABILITY_METRICS
    )


@pytest.mark.parametrize("column", ["tokens_per_expert", "expert_counts"])
def test_count_lists_give_the_count_metrics(
    data: dict[int, dict[int, np.ndarray]], reference: pl.DataFrame, tmp_path: Path, column: str
) -> None:
    counts = counts_of(data)
    pl.DataFrame(
        {
            "step": [s for s, _, _ in counts],
            "layer": [layer for _, layer, _ in counts],
            column: [c.tolist() for _, _, c in counts],
        }
    ).write_parquet(tmp_path / "counts.parquet")
    assert_count_metrics(metrics(tmp_path / "counts.parquet"), reference)


def test_expert_count_rows_give_the_count_metrics(
    data: dict[int, dict[int, np.ndarray]], reference: pl.DataFrame, tmp_path: Path
) -> None:
    long = pl.concat(
        pl.DataFrame({"step": s, "layer": layer, "expert": np.arange(E), "count": c})
        for s, layer, c in counts_of(data)
    )
    # split each count in two rows: duplicates of (step, layer, expert) are summed
    halves = pl.concat(
        [
            long.with_columns(pl.col("count") // 2),
            long.with_columns(pl.col("count") - pl.col("count") // 2),
        ]
    )
    halves.sample(fraction=1.0, shuffle=True, seed=1).write_parquet(tmp_path / "long.parquet")
    assert_count_metrics(metrics(tmp_path / "long.parquet"), reference)


def test_topk_ids_give_the_same_counts(
    data: dict[int, dict[int, np.ndarray]], reference: pl.DataFrame, tmp_path: Path
) -> None:
    frame = pl.concat(
        pl.DataFrame(
            {
                "step": [s] * T,
                "layer": [layer] * T,
                "token": np.arange(T),
                "topk_ids": selected(m).tolist(),
                "topk_weights": np.sort(m, axis=1)[:, ::-1][:, :K].tolist(),
                "num_experts": [E] * T,
            }
        )
        for s, layer, m in rows(data)
    )
    frame.write_parquet(tmp_path / "ids.parquet")
    got = metrics(tmp_path / "ids.parquet")  # k comes from the data
    assert got["top_k"].unique().to_list() == [K]
    assert_count_metrics(got, reference)


def test_num_experts_option_supplies_e(
    data: dict[int, dict[int, np.ndarray]], reference: pl.DataFrame, tmp_path: Path
) -> None:
    frame = pl.concat(
        pl.DataFrame({"step": [s] * T, "layer": [layer] * T, "topk_ids": selected(m).tolist()})
        for s, layer, m in rows(data)
    )
    frame.write_parquet(tmp_path / "ids.parquet")
    assert_count_metrics(metrics(tmp_path / "ids.parquet", num_experts=E), reference)
    result = runner.invoke(app, ["analyze", str(tmp_path / "ids.parquet")])
    assert result.exit_code == 2, result.output
    assert "ids.parquet" in result.output
    assert "--num-experts" in result.output


@pytest.mark.parametrize(
    ("ids", "row"),
    [([[0, 1], [1, 6]], 1), ([[0, 1], [-1, 2]], 1), ([[3, -1], [0, 1]], 0), ([[2, 2], [0, 1]], 0)],
)
def test_bad_ids_are_errors_naming_the_row_or_skipped(
    tmp_path: Path, ids: list[list[int]], row: int
) -> None:
    path = tmp_path / "step_5.parquet"
    pl.DataFrame({"layer": [0, 0], "topk_ids": ids}).write_parquet(path)
    result = runner.invoke(app, ["analyze", str(path), "--num-experts", "6"])
    assert result.exit_code == 2, result.output
    assert f"step_5.parquet row {row}" in result.output
    result = runner.invoke(
        app, ["analyze", str(path), "--num-experts", "6", "--skip-bad-rows", "-f", "json"]
    )
    assert result.exit_code == 0, result.output
    assert '"skipped_rows": 1' in result.output


def test_num_experts_differing_within_a_layer_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "step_5.parquet"
    pl.DataFrame(
        {"layer": [0, 0], "topk_ids": [[0, 1], [1, 2]], "num_experts": [8, 16]}
    ).write_parquet(path)
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert (
        f"step_5.parquet row 1: layer 0 has 16 experts in 'num_experts', but 8 at {path} row 0"
    ) in " ".join(result.output.split())


def test_negative_count_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "step_5.parquet"
    pl.DataFrame({"layer": [0, 1], "tokens_per_expert": [[1, 2], [3, -4]]}).write_parquet(path)
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert "step_5.parquet row 1: null or negative count" in result.output


def schema(**columns: pl.DataType) -> dict[str, pl.DataType]:
    return {"step": pl.Int64(), "layer": pl.Int64(), **columns}


@pytest.mark.parametrize(
    ("columns", "name", "payload"),
    [
        (schema(probs=pl.List(pl.Float32())), "per-token rows", "probabilities"),
        (schema(logits=pl.Array(pl.Float32(), 8)), "per-token rows", "logits"),
        (schema(logits=pl.List(pl.List(pl.Float64()))), "batched lines", "logits"),
        (schema(p_0=pl.Float32(), p_1=pl.Float32()), "wide columns", "probabilities"),
        (schema(logit_1=pl.Float32(), logit_0=pl.Float32()), "wide columns", "logits"),
        (schema(tpe=pl.List(pl.List(pl.Int64()))), "tokens-per-expert counts", "counts"),
        (schema(tokens_per_expert=pl.List(pl.Int64())), "tokens-per-expert counts", "counts"),
        (schema(expert=pl.Int64(), count=pl.Int64()), "expert/count rows", "counts"),
        (schema(topk_ids=pl.List(pl.Int64())), "top-k ids", "top-k ids"),
    ],
)
def test_detect_layout_names_each_layout(
    columns: dict[str, pl.DataType], name: str, payload: str
) -> None:
    layout = table.detect_layout(columns, Path("f.parquet"))
    assert (layout.name, layout.payload_name) == (name, payload)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (schema(p_0=pl.Float32(), p_2=pl.Float32()), "p_0..p_2 have no p_1"),
        (schema(p_0=pl.Float32(), logit_0=pl.Float32()), "both p_* and logit_*"),
        (schema(probs=pl.List(pl.Float32()), tpe=pl.List(pl.Int64())), "ambiguous payload"),
        (schema(weights=pl.List(pl.Float32())), "no payload column"),
        ({"layer": pl.Int64(), "probs": pl.List(pl.Float32())}, "no 'step' column"),
    ],
)
def test_detect_layout_errors(columns: dict[str, pl.DataType], message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        table.detect_layout(columns, Path("f.parquet"))


def test_wrong_column_type_names_the_column(tmp_path: Path) -> None:
    path = tmp_path / "step_5.parquet"
    pl.DataFrame({"layer": ["a"], "probs": [[1.0]]}).write_parquet(path)
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert "step_5.parquet: column 'layer' must hold integers" in result.output


def test_dense_counters_are_bounded_by_the_payload() -> None:
    budget = ingest.DenseBudget()
    floor, per = ingest.DENSE_FLOOR, ingest.DENSE_PER_VALUE
    budget.claim("f.jsonl", floor // 64, 64, 0, "ids")  # the floor alone: allowed
    budget.claim("f.jsonl", 1, per * 10, 10, "ids")  # 10 values pay for 10 x 256 more
    assert (budget.cells, budget.values) == (floor + per * 10, 10)
    budget.claim("f.jsonl", 1, per, 1, "ids")
    with pytest.raises(InputError, match=r"^f\.jsonl: E=2 experts .* for 11 ids"):
        budget.claim("f.jsonl", 1, 2, 0, "ids")  # claims add up across batches of a file
    assert (budget.cells, budget.values) == (floor + per * 11, 11)  # a refusal claims nothing


def test_dense_counter_bound_keeps_real_shapes_and_refuses_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no floor, a log of real shape (64 experts, 64 tokens per group, k=1) still reads;
    one token per group claiming E=65536 is refused naming the file, for Parquet and JSONL."""
    monkeypatch.setattr(ingest, "DENSE_FLOOR", 0)
    rng = np.random.default_rng(3)
    real = pl.DataFrame(
        {
            "step": np.repeat(np.arange(20), 64),
            "layer": [0] * 1280,
            "topk_ids": rng.integers(0, 64, (1280, 1)).tolist(),
            "num_experts": [64] * 1280,
        }
    )
    real.write_parquet(tmp_path / "real.parquet")
    assert metrics(tmp_path / "real.parquet").height == 20
    claim = pl.DataFrame(
        {"step": range(3), "layer": [0] * 3, "topk_ids": [[65535]] * 3, "num_experts": [65536] * 3}
    )
    claim.write_parquet(tmp_path / "claim.parquet")
    claim.write_ndjson(tmp_path / "claim.jsonl")
    for name in ("claim.parquet", "claim.jsonl"):
        result = runner.invoke(app, ["analyze", str(tmp_path / name)])
        assert result.exit_code == 2, result.output
        assert f"{name}: E=65536 experts per (step, layer) group would take 196,608" in " ".join(
            result.output.split()
        )
