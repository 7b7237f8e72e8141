from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from scipy.stats import entropy as scipy_entropy

from routelog import kernels
from routelog.errors import InputError
from routelog.ingest import payload
from routelog.options import Options


def _probs(rng: np.random.Generator, n: int, e: int) -> np.ndarray:
    probs = rng.dirichlet(np.full(e, 0.3), size=n).astype(np.float32)
    probs[rng.random((n, e)) < 0.2] = 0.0  # exact zeros: 0 ln 0 = 0
    probs[0, :2] = [np.finfo(np.float32).tiny / 8, 0.0]  # a subnormal
    return probs / probs.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)


def test_entropy_rows_matches_scipy_with_zeros_and_subnormals() -> None:
    probs = _probs(np.random.default_rng(0), 500, 16)
    expected = scipy_entropy(probs.astype(np.float64), axis=1)
    np.testing.assert_allclose(kernels.entropy_rows(probs), expected, rtol=1e-6, atol=1e-7)
    assert kernels.entropy_rows(np.eye(4, dtype=np.float32)).tolist() == [0.0] * 4


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_top_k_ids_match_a_stable_sort(k: int) -> None:
    rng = np.random.default_rng(k)
    probs = rng.integers(0, 4, size=(300, 8)).astype(np.float32)  # many ties
    expected = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(kernels.top_k_ids(probs, k), expected)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_group_sums_match_numpy(order: str) -> None:
    rng = np.random.default_rng(1)
    gid = np.repeat(np.arange(5), [10, 1, 30, 7, 2])
    if order == "shuffled":
        rng.shuffle(gid)
    matrix = rng.random((len(gid), 6)).astype(np.float32)
    expected = np.stack([matrix[gid == g].sum(axis=0, dtype=np.float64) for g in range(5)])
    np.testing.assert_allclose(kernels._group_sum(gid, 5, matrix), expected, rtol=1e-12)


def test_reduce_probs_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(2)
    probs = _probs(rng, 400, 8)
    layer = rng.integers(0, 3, size=400)
    frame = pl.DataFrame({"step": np.zeros(400, dtype=np.int64), "layer": layer}).with_columns(
        pl.Series("probs", probs)
    )
    stats = kernels.reduce_probs(frame, top_k=2).stats.sort("layer")
    for row, group in zip(stats.iter_rows(named=True), range(3), strict=True):
        block = probs[layer == group].astype(np.float64)
        chosen = np.argsort(-block, axis=1, kind="stable")[:, :2]
        assert row["n_tokens"] == len(block)
        assert row["sum_entropy"] == pytest.approx(scipy_entropy(block, axis=1).sum(), rel=1e-6)
        assert row["sum_top1"] == pytest.approx(block.max(axis=1).sum(), rel=1e-6)
        np.testing.assert_allclose(row["sum_probs"], block.sum(axis=0), rtol=1e-6)
        assert row["counts"] == np.bincount(chosen.ravel(), minlength=8).tolist()


def test_chunked_reduction_merges_to_the_whole() -> None:
    rng = np.random.default_rng(3)
    probs = _probs(rng, 300, 8)
    frame = pl.DataFrame(
        {"step": np.repeat([0, 10], 150), "layer": np.tile([0, 1, 1], 100)}
    ).with_columns(pl.Series("probs", probs))
    whole = kernels.finish(kernels.reduce_probs(frame, 2).stats)
    parts = [kernels.reduce_probs(frame.slice(i, 37), 2).stats for i in range(0, 300, 37)]
    chunked = kernels.finish(kernels.merge(parts))
    assert_frame_equal(chunked, whole, check_exact=False, rel_tol=1e-9)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([np.nan, 1.0], "NaN or infinite probability"),
        ([np.inf, -np.inf], "NaN or infinite probability"),
        ([1.5, -0.5], "negative probability"),
        ([0.5, 0.4], "probabilities do not sum to 1"),
    ],
)
def test_validation_fast_path_reports_the_same_problem(row: list[float], message: str) -> None:
    matrix = np.full((6, 2), 0.5, dtype=np.float32)
    matrix[4] = row
    with pytest.raises(InputError, match=rf"row 4: {message}"):
        payload.to_probabilities(matrix, "probs", Options(), lambda i: f"f row {i}")
    kept = payload.to_probabilities(matrix, "probs", Options(skip_bad_rows=True), str)
    assert kept.skipped == 1
    assert kept.keep.tolist() == [True] * 4 + [False, True]


def test_validation_accepts_valid_rows() -> None:
    probs = _probs(np.random.default_rng(4), 50, 8)
    result = payload.to_probabilities(probs, "probs", Options(), str)
    assert result.skipped == 0
    np.testing.assert_array_equal(result.probs, probs)
