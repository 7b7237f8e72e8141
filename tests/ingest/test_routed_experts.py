"""Routed-expert id arrays [tokens, num_hidden_layers, k] (vLLM / SGLang return_routed_experts),
as .npy and .npz, with the model's config.json deciding which layers are MoE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import entropy
from typer.testing import CliRunner

import routelog
from routelog.cli import app

runner = CliRunner()

E, K, L, T = 16, 2, 5, 300
DENSE = (0, 3)  # mlp_only_layers


def _routing(rng: np.random.Generator, dtype: type = np.int16) -> np.ndarray:
    ids = np.zeros((T, L, K), dtype=dtype)
    for layer in range(L):
        if layer in DENSE:
            continue
        weights = rng.dirichlet(np.full(E, 0.5))
        ids[:, layer] = np.stack([rng.choice(E, K, replace=False, p=weights) for _ in range(T)])
    return ids


def _config(root: Path) -> None:
    config = {
        "model_type": "qwen3_moe",
        "num_hidden_layers": L,
        "num_experts": E,
        "num_experts_per_tok": K,
        "mlp_only_layers": list(DENSE),
        "decoder_sparse_step": 1,
    }
    (root / "config.json").write_text(json.dumps(config))


def _check(metrics_rows: list[dict[str, object]], arrays: dict[int, np.ndarray]) -> None:
    for row in metrics_rows:
        ids = arrays[row["step"]][:, row["layer"]]  # type: ignore[index]
        counts = np.bincount(ids.ravel(), minlength=E)
        assert row["load_share"] == pytest.approx((counts / counts.sum()).tolist())
        assert row["assign_entropy"] == pytest.approx(entropy(counts), rel=1e-9)
        assert row["top_k"] == K


def test_npy_per_step_with_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    root = tmp_path / "replay"
    root.mkdir()
    _config(tmp_path)  # in a parent: found by the upward search
    arrays = {step: _routing(rng, np.uint8 if step else np.int32) for step in (0, 10)}
    for step, ids in arrays.items():
        np.save(root / f"step_{step:04d}.npy", ids)
    result = routelog.analyze([str(root)])
    metrics = result.metrics.sort("step", "layer")
    assert metrics.select("step", "layer").rows() == [(s, la) for s in (0, 10) for la in (1, 2, 4)]
    _check(list(metrics.iter_rows(named=True)), arrays)
    info = result.runs[0].files[0]
    assert (info.format, info.layout) == ("numpy", "routed-expert ids")
    assert "dense layers 0, 3 left out (not MoE in config.json)" in info.warnings


def test_without_config_all_zero_layers_are_dense(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ids = _routing(rng)
    np.save(tmp_path / "iter_7.npy", ids)
    result = routelog.analyze([str(tmp_path / "iter_7.npy")], num_experts=E)
    assert sorted(result.metrics["layer"].to_list()) == [1, 2, 4]
    _check(list(result.metrics.iter_rows(named=True)), {7: ids})
    assert "dense layers 0, 3 left out (all zeros)" in result.runs[0].files[0].warnings
    missing = runner.invoke(app, ["analyze", str(tmp_path / "iter_7.npy")])
    assert missing.exit_code == 2
    assert "pass --num-experts E" in missing.output


def test_npz_of_requests(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    _config(tmp_path)
    parts = [_routing(rng)[: 100 + 50 * i] for i in range(3)]
    np.savez(tmp_path / "step_3.npz", **{f"request{i}": p for i, p in enumerate(parts)})
    result = routelog.analyze([str(tmp_path / "step_3.npz")])
    _check(list(result.metrics.iter_rows(named=True)), {3: np.concatenate(parts)})


def test_bad_ids(tmp_path: Path) -> None:
    _config(tmp_path)
    ids = _routing(np.random.default_rng(7))
    ids[17, 2] = [E, 1]
    np.save(tmp_path / "step_1.npy", ids)
    result = runner.invoke(app, ["analyze", str(tmp_path / "step_1.npy")])
    assert result.exit_code == 2, result.output
    assert "step_1.npy token 17 layer 2: an expert id outside [0, 16)" in result.output
    skipped = routelog.analyze([str(tmp_path / "step_1.npy")], skip_bad_rows=True)
    assert skipped.runs[0].summary()["skipped_rows"] == 1
    ids[17, 2] = [4, 4]
    np.save(tmp_path / "step_1.npy", ids)
    result = runner.invoke(app, ["analyze", str(tmp_path / "step_1.npy")])
    assert "token 17 layer 2: an expert id repeated within one token" in result.output
    np.save(tmp_path / "step_1.npy", np.zeros((3, 4), dtype=np.float32))
    result = runner.invoke(app, ["analyze", str(tmp_path / "step_1.npy")])
    assert result.exit_code == 2, result.output
    assert "expected routed expert ids [tokens, layers, k] of integers" in result.output
    np.save(tmp_path / "step_1.npy", np.array([{"a": 1}], dtype=object))
    result = runner.invoke(app, ["analyze", str(tmp_path / "step_1.npy")])
    assert result.exit_code == 2, result.output
    assert "not a readable numpy file" in result.output


def test_other_numpy_files_in_a_run_are_not_logs(tmp_path: Path) -> None:
    _config(tmp_path)
    ids = _routing(np.random.default_rng(8))
    np.save(tmp_path / "step_5.npy", ids)
    np.save(tmp_path / "embeddings.npy", np.zeros((4, 16), dtype=np.float32))
    np.savez(tmp_path / "stats.npz", loss=np.zeros(3))
    result = routelog.analyze([str(tmp_path)])
    assert [Path(f.path).name for f in result.runs[0].files] == ["step_5.npy"]
    assert sorted(Path(p).name for p in result.runs[0].ignored_files) == [
        "embeddings.npy",
        "stats.npz",
    ]
