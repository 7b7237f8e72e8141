"""Rows carrying probabilities AND the router's selected ids, in every format.

Probability metrics come from the probabilities, count metrics from the selection, and
``selection_mismatch`` is the share of tokens whose selection is not the top-k of their
probabilities. Expected values are computed here independently (scipy, numpy, Python sets).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.special import softmax
from scipy.stats import entropy
from typer.testing import CliRunner

import routelog
from routelog.cli import app
from routelog.errors import InputError
from routelog.kernels import mismatched_rows

runner = CliRunner()
E, K, T, LAYERS = 8, 2, 60, 2


def _data(seed: int = 3) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer: logits [T, E] and a selection biased away from the top-k (like DeepSeek-V3)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(LAYERS):
        logits = rng.normal(size=(T, E)).astype(np.float32)
        bias = np.zeros(E, dtype=np.float32)
        bias[layer] = 1.5  # pushes expert `layer` into many selections
        ids = np.argsort(-(logits + bias), axis=1, kind="stable")[:, :K].astype(np.int64)
        out[layer] = (logits, ids)
    return out


def _expected(logits: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    probs = softmax(logits.astype(np.float64), axis=1)
    counts = np.bincount(ids.ravel(), minlength=E)
    share = counts / counts.sum()
    top = np.argsort(-probs, axis=1)[:, :K]
    mismatch = np.mean([set(a) != set(b) for a, b in zip(ids.tolist(), top.tolist(), strict=True)])
    return {
        "token_entropy": float(np.mean(entropy(probs, axis=1))),
        "load_entropy": float(entropy(probs.mean(axis=0))),
        "assign_entropy": float(entropy(share)),
        "max_load_share": float(share.max()),
        "selection_mismatch": float(mismatch),
    }


def _check(path: Path, data: dict[int, tuple[np.ndarray, np.ndarray]]) -> pl.DataFrame:
    result = routelog.analyze([f"run={path}"])
    metrics = result.metrics.sort("layer")
    assert metrics["top_k"].to_list() == [K] * LAYERS
    assert not result.runs[0].top_k_assumed
    for row in metrics.iter_rows(named=True):
        want = _expected(*data[row["layer"]])
        for name, value in want.items():
            assert row[name] == pytest.approx(value, abs=1e-5), name
    return metrics


def test_parquet_per_token_rows(tmp_path: Path) -> None:
    data = _data()
    frame = pl.concat(
        pl.DataFrame(
            {
                "step": [100] * T,
                "layer": [layer] * T,
                "token": np.arange(T),
                "logits": logits,
                "topk_ids": ids,
            }
        )
        for layer, (logits, ids) in data.items()
    )
    path = tmp_path / "step_100.parquet"
    frame.write_parquet(path)
    metrics = _check(path, data)
    assert (metrics["selection_mismatch"] > 0).all()
    info = routelog.api.inspect([path])[0]
    assert info.layout == "per-token rows with selected ids"


def test_parquet_wide_columns(tmp_path: Path) -> None:
    data = _data(5)
    frame = pl.concat(
        pl.DataFrame(
            {
                "step": [0] * T,
                "layer": [layer] * T,
                **{f"logit_{i}": logits[:, i] for i in range(E)},
                "topk_ids": ids,
            }
        )
        for layer, (logits, ids) in data.items()
    )
    path = tmp_path / "wide.parquet"
    frame.write_parquet(path)
    _check(path, data)


@pytest.mark.parametrize("batched", [False, True])
def test_jsonl(tmp_path: Path, batched: bool) -> None:
    data = _data(9)
    path = tmp_path / "log.jsonl"
    with path.open("w") as stream:
        for layer, (logits, ids) in data.items():
            if batched:
                line = {
                    "step": 7,
                    "layer": layer,
                    "logits": logits.tolist(),
                    "topk_ids": ids.tolist(),
                }
                stream.write(json.dumps(line) + "\n")
                continue
            for t in range(T):
                line = {
                    "step": 7,
                    "layer": layer,
                    "token": t,
                    "logits": logits[t].tolist(),
                    "topk_ids": ids[t].tolist(),
                }
                stream.write(json.dumps(line) + "\n")
    _check(path, data)


@pytest.mark.torch
@pytest.mark.parametrize("container", ["list", "dict", "stacked"])
def test_pt(tmp_path: Path, container: str) -> None:
    torch = pytest.importorskip("torch")
    data = _data(11)
    logits = [torch.from_numpy(data[layer][0]) for layer in range(LAYERS)]
    ids = [torch.from_numpy(data[layer][1]) for layer in range(LAYERS)]
    if container == "dict":
        payload = {
            "router_logits": {f"model.layers.{i}.mlp.gate": t for i, t in enumerate(logits)},
            "topk_ids": {f"model.layers.{i}.mlp.gate": t for i, t in enumerate(ids)},
        }
    elif container == "stacked":
        payload = {"router_logits": torch.stack(logits), "topk_ids": torch.stack(ids)}
    else:
        payload = {"router_logits": logits, "topk_ids": ids}
    path = tmp_path / "step_3.pt"
    torch.save(payload, path)
    _check(path, data)


def test_selection_wins_over_probabilities_for_counts(tmp_path: Path) -> None:
    """Every token prefers expert 0, but the router selected expert 1: counts say expert 1."""
    probs = np.tile(np.array([0.7, 0.2, 0.1], dtype=np.float32), (10, 1))
    frame = pl.DataFrame(
        {"step": [0] * 10, "layer": [0] * 10, "probs": probs, "topk_ids": [[1]] * 10}
    )
    path = tmp_path / "f.parquet"
    frame.write_parquet(path)
    row = routelog.analyze([path]).metrics.row(0, named=True)
    assert row["load_share"] == [0.0, 1.0, 0.0]
    assert row["selection_mismatch"] == 1.0
    assert row["top1_prob"] == pytest.approx(0.7)


def test_no_selection_means_null_mismatch(tmp_path: Path) -> None:
    frame = pl.DataFrame({"step": [0, 0], "layer": [0, 0], "probs": [[0.6, 0.4], [0.3, 0.7]]})
    path = tmp_path / "f.parquet"
    frame.write_parquet(path)
    assert routelog.analyze([path]).metrics["selection_mismatch"].to_list() == [None]


def test_ties_are_not_a_mismatch() -> None:
    probs = np.array([[0.4, 0.2, 0.2, 0.2], [0.4, 0.2, 0.2, 0.2]])
    assert mismatched_rows(probs, np.array([[0, 3], [1, 2]])).tolist() == [False, True]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([[0], [5]], "row 1: 'topk_ids': expert id outside [0, 3)"),
        ([[0, 0], [1, 2]], "row 0: 'topk_ids': an expert id repeated within one token"),
        ([[0], [1, 2]], "layer 0 has rows selecting 1 and 2 experts"),
        ([[0], None], "row 1: missing 'topk_ids' value"),
    ],
)
def test_bad_selections_name_the_row(tmp_path: Path, ids: list[object], message: str) -> None:
    frame = pl.DataFrame(
        {"step": [0, 0], "layer": [0, 0], "probs": [[0.5, 0.3, 0.2]] * 2, "topk_ids": ids}
    )
    path = tmp_path / "f.parquet"
    frame.write_parquet(path)
    with pytest.raises(InputError, match=re_escape(message)):
        routelog.analyze([path])
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "step": [0] * 3,
            "layer": [0] * 3,
            "probs": [[0.5, 0.3, 0.2]] * 3,
            "topk_ids": [[0], [7], [1]],
        }
    )
    path = tmp_path / "f.parquet"
    frame.write_parquet(path)
    result = routelog.analyze([path], skip_bad_rows=True)
    assert result.runs[0].summary()["skipped_rows"] == 1
    assert result.metrics["load_share"].to_list() == [[0.5, 0.5, 0.0]]


def test_json_and_report_show_the_mismatch(tmp_path: Path) -> None:
    probs = np.tile(np.array([0.7, 0.2, 0.1], dtype=np.float32), (4, 1))
    frame = pl.DataFrame(
        {"step": [0] * 4, "layer": [0] * 4, "probs": probs, "topk_ids": [[1], [0], [0], [0]]}
    )
    path = tmp_path / "f.parquet"
    frame.write_parquet(path)
    result = runner.invoke(app, ["analyze", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metrics"][0]["selection_mismatch"] == 0.25
    result = runner.invoke(app, ["analyze", str(path), "--format", "csv"])
    assert "selection_mismatch" in result.output.splitlines()[0]
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 0, result.output
    assert "mismatch" in result.output
    assert "0.250" in result.output


def re_escape(text: str) -> str:
    import re

    return re.escape(text)
