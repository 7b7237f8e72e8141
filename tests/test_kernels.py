"""Kernels against hand computations, scipy, and HuggingFace's aux-loss formula."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from routelog import kernels
from routelog.errors import InputError
from routelog.ingest import payload
from routelog.options import Options
from tests.conftest import dirichlet


def _frame(probs: np.ndarray, step: int = 0, layer: int = 0, **extra: object) -> pl.DataFrame:
    columns: dict[str, object] = {
        "step": np.full(len(probs), step, dtype=np.int64),
        "layer": np.full(len(probs), layer, dtype=np.int32),
        "probs": probs.astype(np.float32),
    }
    columns.update(extra)
    return pl.DataFrame(columns)


def _metrics(probs: np.ndarray, k: int = 1, **extra: object) -> dict[str, object]:
    stats = kernels.reduce_probs(_frame(probs, **extra), k).stats
    return kernels.finish(stats).row(0, named=True)


def test_hand_computed_two_tokens() -> None:
    # token 0 -> expert 0 (p=.75), token 1 -> expert 1 (p=.5, tie broken to the lower index)
    probs = np.array([[0.75, 0.25, 0.0, 0.0], [0.25, 0.5, 0.25, 0.0]])
    m = _metrics(probs)
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h1 = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    load = np.array([0.5, 0.375, 0.125, 0.0])
    assert m["n_tokens"] == 2
    assert m["n_experts"] == 4
    assert m["top_k"] == 1
    assert m["token_entropy"] == pytest.approx((h0 + h1) / 2, rel=1e-6)
    assert m["token_entropy_norm"] == pytest.approx((h0 + h1) / 2 / math.log(4), rel=1e-6)
    load_h = -sum(x * math.log(x) for x in load if x > 0)
    assert m["load_entropy"] == pytest.approx(load_h, rel=1e-6)
    assert m["assign_entropy"] == pytest.approx(math.log(2), rel=1e-6)  # f = [.5, .5, 0, 0]
    assert m["mutual_info"] == pytest.approx(load_h - (h0 + h1) / 2, rel=1e-6)
    assert m["max_load_share"] == pytest.approx(0.5)
    assert m["max_vio"] == pytest.approx(1 / 0.5 - 1)  # c = [1, 1, 0, 0], mean 0.5
    assert m["load_cv"] == pytest.approx(np.std([1, 1, 0, 0]) / 0.5)
    assert m["dead_experts"] == 2
    assert m["aux_loss"] == pytest.approx(4 * (0.5 * 0.5 + 0.5 * 0.375))
    assert m["top1_prob"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["z_loss"] is None
    assert m["load_share"] == pytest.approx([0.5, 0.5, 0.0, 0.0])


def test_top_k_two_and_ties() -> None:
    probs = np.array([[0.25, 0.25, 0.25, 0.25]])
    assert kernels.top_k_ids(probs, 2).tolist() == [[0, 1]]
    m = _metrics(probs, k=2)
    assert m["load_share"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert m["top_k"] == 2


@pytest.mark.parametrize("experts", [2, 8, 64])
def test_entropies_match_scipy(experts: int) -> None:
    rng = np.random.default_rng(experts)
    probs = dirichlet(rng, 500, experts, alpha=0.3).astype(np.float32)
    m = _metrics(probs, k=2)
    p64 = probs.astype(np.float64)
    token_h = scipy_entropy(p64, axis=1).mean()
    load_h = scipy_entropy(p64.mean(axis=0))
    top = np.argsort(-p64, axis=1, kind="stable")[:, :2]
    counts = np.bincount(top.ravel(), minlength=experts)
    assign_h = scipy_entropy(counts / counts.sum())
    assert m["token_entropy"] == pytest.approx(token_h, rel=1e-5)
    assert m["load_entropy"] == pytest.approx(load_h, rel=1e-5)
    assert m["assign_entropy"] == pytest.approx(assign_h, rel=1e-5)
    assert m["token_entropy_norm"] == pytest.approx(token_h / np.log(experts), rel=1e-5)
    assert m["top1_prob"] == pytest.approx(p64.max(axis=1).mean(), rel=1e-5)
    assert m["load_cv"] == pytest.approx(counts.std() / counts.mean(), rel=1e-9)


def _hf_load_balancing_loss(probs: np.ndarray, top_k: int) -> float:
    """transformers' load_balancing_loss_func for one layer without attention mask, in numpy:
    expert_mask = one_hot(topk(routing_weights)); tokens_per_expert = mean(expert_mask, 0);
    router_prob_per_expert = mean(routing_weights, 0);
    loss = sum(tokens_per_expert * router_prob_per_expert) * num_experts."""
    experts = probs.shape[1]
    selected = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    expert_mask = np.eye(experts)[selected]  # [T, k, E]
    tokens_per_expert = expert_mask.mean(axis=0)  # [k, E]
    router_prob_per_expert = probs.mean(axis=0)  # [E]
    return float((tokens_per_expert * router_prob_per_expert[None, :]).sum() * experts)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_matches_huggingface(top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    probs = dirichlet(rng, 300, 8, alpha=0.5).astype(np.float32)
    m = _metrics(probs, k=top_k)
    assert m["aux_loss"] == pytest.approx(
        _hf_load_balancing_loss(probs.astype(np.float64), top_k), rel=1e-5
    )


def test_aux_loss_is_k_when_perfectly_balanced() -> None:
    probs = np.tile(np.eye(4), (5, 1)) * 0.7 + 0.075  # each expert top-1 equally often
    assert _metrics(probs)["aux_loss"] == pytest.approx(1.0, rel=1e-6)  # = k


def test_z_loss_from_logit_lse() -> None:
    probs = np.full((3, 2), 0.5)
    lse = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert _metrics(probs, logit_lse=lse)["z_loss"] == pytest.approx((1 + 4 + 9) / 3)


def test_groups_by_step_layer_and_dataset() -> None:
    rng = np.random.default_rng(1)
    probs = dirichlet(rng, 40, 4).astype(np.float32)
    frame = pl.DataFrame(
        {
            "step": np.repeat([5, 7], 20),
            "layer": np.tile(np.repeat([0, 1], 10), 2).astype(np.int32),
            "dataset": np.tile(["a", "b"], 20),
            "probs": probs,
        }
    )
    stats = kernels.reduce_probs(frame, 1).stats
    assert stats.height == 8
    assert stats["n_tokens"].to_list() == [5] * 8
    totals = stats.group_by("step").agg(pl.col("n_tokens").sum()).sort("step")
    assert totals["n_tokens"].to_list() == [20, 20]


def test_counts_only_gives_count_metrics_and_nulls() -> None:
    frame = pl.DataFrame(
        {
            "step": [0, 0],
            "layer": [0, 0],
            "counts": pl.Series([[3, 1, 0, 0], [1, 3, 0, 0]], dtype=pl.Array(pl.Int64, 4)),
        }
    )
    m = kernels.finish(kernels.reduce_counts(frame).stats).row(0, named=True)
    assert m["assign_entropy"] == pytest.approx(math.log(2))
    assert m["max_load_share"] == pytest.approx(0.5)
    assert m["dead_experts"] == 2
    for name in kernels.PROBABILITY_METRICS:
        assert m[name] is None, name


def test_top_k_ids_kernel_matches_probability_counts() -> None:
    rng = np.random.default_rng(3)
    probs = dirichlet(rng, 100, 6).astype(np.float32)
    ids = kernels.top_k_ids(probs, 2)
    from_ids = kernels.reduce_topk(
        pl.DataFrame({"step": [0] * 100, "layer": [0] * 100, "topk_ids": ids}), 6
    ).stats
    from_probs = kernels.reduce_probs(_frame(probs), 2).stats
    assert from_ids["counts"].to_list() == from_probs["counts"].to_list()


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 60),
    experts=st.integers(2, 9),
    cut=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    k=st.integers(1, 3),
)
def test_merge_of_chunks_equals_whole(
    tokens: int, experts: int, cut: float, seed: int, k: int
) -> None:
    """Statistics are mergeable: any split of the rows adds up to the whole."""
    rng = np.random.default_rng(seed)
    probs = dirichlet(rng, tokens, experts).astype(np.float32)
    steps = rng.integers(0, 3, tokens)
    frame = pl.DataFrame(
        {"step": steps, "layer": rng.integers(0, 2, tokens).astype(np.int32), "probs": probs}
    )
    split = int(cut * tokens)
    whole = kernels.finish(kernels.reduce_probs(frame, k).stats)
    parts = [kernels.reduce_probs(p, k).stats for p in (frame[:split], frame[split:]) if p.height]
    merged = kernels.finish(kernels.merge(parts))
    assert_frame_equal(whole, merged, check_exact=False, rel_tol=1e-9)


def _stats_rows(rng: np.random.Generator, rows: int) -> list[dict[str, object]]:
    """Statistics rows of random groups: layer 2's vectors are always null, widths differ
    by layer, and a vector is sometimes null in a group that has others."""
    widths = {0: 2, 1: 5, 2: 3}
    out = []
    for _ in range(rows):
        layer = int(rng.integers(0, 3))
        width = widths[layer]
        present = layer != 2 and rng.random() < 0.8
        out.append(
            {
                "step": int(rng.integers(0, 2)),
                "layer": layer,
                "dataset": None,
                "n_experts": width,
                "top_k": 1,
                **{name: int(rng.integers(0, 9)) for name in kernels.SUMS if "sum" not in name},
                **{name: float(rng.random()) for name in kernels.SUMS if "sum" in name},
                "sum_probs": (rng.random(width) * 1e3).tolist() if present else None,
                "counts": rng.integers(0, 1000, width).tolist() if present else None,
                "top1_counts": rng.integers(0, 1000, width).tolist() if layer != 2 else None,
            }
        )
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 40), cut=st.floats(0, 1))
def test_merge_adds_each_group_in_row_order(seed: int, rows: int, cut: float) -> None:
    """Against running sums kept by hand: per group (in order of first appearance), scalars
    and vectors (elementwise) added row after row, so exactly; a group whose vectors are
    all null keeps a null vector."""
    table = _stats_rows(np.random.default_rng(seed), rows)
    expected: dict[tuple[object, ...], dict[str, object]] = {}
    for row in table:
        key = tuple(row[name] for name in kernels.GROUP)
        if key not in expected:
            expected[key] = dict(row)
            continue
        total = expected[key]
        for name in kernels.SUMS:
            total[name] += row[name]  # type: ignore[operator]
        for name in kernels.VECTORS:
            if row[name] is not None:
                before = total[name]
                total[name] = (
                    row[name]
                    if before is None
                    else [a + b for a, b in zip(before, row[name], strict=True)]  # type: ignore[call-overload]
                )
    frame = pl.DataFrame(table, schema=kernels.STATS_SCHEMA)
    split = int(cut * rows)
    merged = kernels.merge([frame[:split], frame[split:]])
    want = pl.DataFrame(list(expected.values()), schema=kernels.STATS_SCHEMA)
    assert_frame_equal(merged, want, check_exact=True)


def test_entropy_zero_log_zero() -> None:
    assert kernels.entropy(np.array([1.0, 0.0])) == 0.0
    assert kernels.entropy_rows(np.array([[1.0, 0.0]], dtype=np.float32))[0] == 0.0


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), e=st.integers(2, 64), zeros=st.integers(0, 3))
def test_js_divergence_matches_scipy(seed: int, e: int, zeros: int) -> None:
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(e)), rng.dirichlet(np.ones(e))
    p[rng.integers(0, e, size=min(zeros, e - 1))] = 0.0  # empty experts: 0 log 0 = 0
    p /= p.sum()
    # scipy returns the distance, the square root of the divergence
    expected = jensenshannon(p, q, base=2) ** 2
    assert float(kernels.js_divergence(p, q)) == pytest.approx(expected, abs=1e-12)


def test_js_divergence_rows_and_bounds() -> None:
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    q = np.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.5, 0.5]])
    result = kernels.js_divergence(p, q)
    expected = [jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, q, strict=True)]
    assert result.tolist() == pytest.approx(expected, abs=1e-12)
    assert result[0] == 1.0
    assert result[1] == 0.0


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
    sums = kernels._token_stats(matrix, 1, gid=gid, n_groups=5).sums
    np.testing.assert_allclose(sums, expected, rtol=1e-12)


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


@pytest.mark.parametrize("width", [8, payload.FLOAT32_SUM_WIDTH, payload.FLOAT32_SUM_WIDTH + 1])
def test_row_sum_check_at_the_tolerance_whatever_the_width(width: int) -> None:
    """Rows off by 0.9x the tolerance pass and by 1.1x fail, in float32 sums (up to
    FLOAT32_SUM_WIDTH experts) and in float64 ones beyond."""
    rng = np.random.default_rng(width)
    rows = rng.random((4, width))
    rows /= rows.sum(axis=1, keepdims=True)
    rows[1] *= 1 + 0.9 * payload.SUM_TOLERANCE
    rows[2] *= 1 - 1.1 * payload.SUM_TOLERANCE
    rows[3] *= 1 + 1.1 * payload.SUM_TOLERANCE
    kept = payload.to_probabilities(
        rows.astype(np.float32), "probs", Options(skip_bad_rows=True), str
    )
    assert kept.keep.tolist() == [True, True, False, False]


def test_validation_accepts_valid_rows() -> None:
    probs = _probs(np.random.default_rng(4), 50, 8)
    result = payload.to_probabilities(probs, "probs", Options(), str)
    assert result.skipped == 0
    np.testing.assert_array_equal(result.probs, probs)


def test_mass_and_top1_shares_by_hand() -> None:
    # three tokens, top-2: expert 2 is chosen second by every token, with almost no weight
    probs = np.array([[0.90, 0.05, 0.05, 0.0], [0.10, 0.88, 0.02, 0.0], [0.97, 0.0, 0.03, 0.0]])
    m = _metrics(probs, k=2)
    assert m["mass_share"] == pytest.approx(probs.mean(axis=0).tolist(), abs=1e-7)
    assert m["top1_share"] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    # counts: expert 0 x3, 1 x2 (token 0 ties 1 and 2 at 0.05: the lower index), 2 x1
    assert m["load_share"] == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0.0])
    # expert 3: no tokens and no mass; expert 2 takes 1/6 of the slots but 0.033 of the mass,
    # which is above 0.1 / 4 = 0.025: alive. With dead_fraction 0.3 (limit 0.075) it is dead.
    assert m["dead_experts"] == 1
    stats = kernels.reduce_probs(_frame(probs), 2).stats
    assert kernels.finish(stats, dead_fraction=0.3)["dead_experts"][0] == 2


def test_dead_mask_by_count_or_mass() -> None:
    limit = 0.1 / 4
    share = np.array([[0.5, 0.3, 0.2, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mass = np.array([[0.6, 0.39, 0.009, 0.001], [0.4, 0.4, 0.2, 0.0]])
    expected = (share < limit) | (mass < limit)
    assert kernels.dead_mask(share, mass, 0.1).tolist() == expected.tolist()
    # without probabilities (a null mass row) the count share decides alone
    assert kernels.dead_mask(share, [None, None], 0.1).tolist() == (share < limit).tolist()
    assert kernels.dead_mask(share[0], None, 0.1).tolist() == [False, False, False, True]


def test_shares_null_without_probabilities() -> None:
    frame = pl.DataFrame(
        {"step": [0], "layer": [0], "counts": np.array([[5, 0, 3]], dtype=np.int64)}
    )
    m = kernels.finish(kernels.reduce_counts(frame).stats).row(0, named=True)
    assert m["mass_share"] is None
    assert m["top1_share"] is None
    assert m["load_share"] == pytest.approx([5 / 8, 0.0, 3 / 8])
    assert m["dead_experts"] == 1


def test_top1_share_merges_across_chunks() -> None:
    rng = np.random.default_rng(5)
    probs = dirichlet(rng, 300, 6, alpha=0.5).astype(np.float32)
    parts = [kernels.reduce_probs(_frame(probs[i : i + 70]), 2).stats for i in range(0, 300, 70)]
    m = kernels.finish(kernels.merge(parts)).row(0, named=True)
    expected = np.bincount(probs.argmax(axis=1), minlength=6) / 300
    assert m["top1_share"] == pytest.approx(expected.tolist())
    assert m["mass_share"] == pytest.approx(probs.astype(np.float64).mean(axis=0).tolist())


@pytest.mark.parametrize(("n", "e", "k"), [(3000, 64, 2), (1500, 256, 8), (70, 8, 8), (5, 3, 1)])
def test_token_stats_match_scipy_and_a_stable_sort(n: int, e: int, k: int) -> None:
    """The one-pass compiled kernel, at E below, at and above the vector widths."""
    probs = _probs(np.random.default_rng(e), n, e)
    probs[1::7] = np.round(probs[1::7], 2)  # ties
    probs /= probs.sum(axis=1, keepdims=True)
    entropies, top1, ids = kernels.token_stats(probs, k)
    expected = scipy_entropy(probs.astype(np.float64), axis=1)
    np.testing.assert_allclose(entropies, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(top1, probs.max(axis=1))
    np.testing.assert_array_equal(ids, np.argsort(-probs, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize(
    "layers",
    [[0, 0, 1, 1, 1, 2], [0, 1, 0, 1], [3], [2, 2, 0, 0, 2]],
    ids=["runs", "interleaved", "one", "group-returns"],
)
def test_group_ids_from_runs_match_the_general_grouping(layers: list[int]) -> None:
    frame = pl.DataFrame({"step": [5] * len(layers), "layer": layers})
    ids, groups = kernels._group_ids(frame)
    general = frame.with_columns(pl.lit("x").alias("dataset"))  # takes the general path
    expected_ids, expected = kernels._group_ids(general)
    np.testing.assert_array_equal(ids, expected_ids)
    assert groups.drop("dataset").equals(expected.drop("dataset"))
    assert groups.schema == expected.schema


@st.composite
def selection_frames(draw: st.DrawFn) -> pl.DataFrame:
    """Selections as the kernels build them: runs of (step, layer, dataset), some repeated;
    token positions counting up in each run, anywhere in their type's range, or with nulls;
    top-k ids anywhere in their type's range."""
    k = draw(st.integers(1, 8))
    runs = draw(
        st.lists(
            st.tuples(
                st.integers(-(2**62), 2**62),
                st.integers(0, 2**31 - 1),
                st.sampled_from([None, "", "code", "wiki \u00e9"]),
                st.integers(0, 40),
            ),
            max_size=6,
        )
    )
    tokens = draw(st.sampled_from(["counting", "narrow", "wide", "nulls"]))
    wide_ids = draw(st.sampled_from([255, 256, 65_535, 65_536, 2**31 - 1]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = sum(length for *_, length in runs)
    high = 2**40 if tokens == "wide" else 2**31 - 1
    token = pl.Series("token", rng.integers(0, high, rows, dtype=np.int64))
    if tokens == "counting":
        firsts = rng.integers(-(2**40), 2**40, len(runs))
        token = pl.Series(
            "token",
            [int(first) + i for first, (*_, n) in zip(firsts, runs, strict=True) for i in range(n)],
            dtype=pl.Int64,
        )
    elif tokens == "nulls":
        token = token.scatter(rng.integers(0, max(rows, 1), min(rows, 3)), None)
    return pl.DataFrame(
        {
            "step": [step for step, _, _, n in runs for _ in range(n)],
            "layer": [layer for _, layer, _, n in runs for _ in range(n)],
            "dataset": [dataset for _, _, dataset, n in runs for _ in range(n)],
        },
        schema={"step": pl.Int64, "layer": pl.Int32, "dataset": pl.String},
    ).with_columns(
        token,
        pl.Series("topk", rng.integers(0, wide_ids + 1, (rows, k), dtype=np.int32)),
    )


@settings(max_examples=100, deadline=None)
@given(selection_frames())
def test_packed_selections_unpack_to_an_equal_frame(frame: pl.DataFrame) -> None:
    """The wire form of a Dask worker's selections: the same frame back, dtypes included,
    whatever the runs, the token positions (counting, anywhere, null) or the ids' range."""
    unpacked = kernels.unpack_selections(kernels.pack_selections(frame))
    assert_frame_equal(unpacked, frame)
    assert unpacked.schema == frame.schema


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([1, None, None, 1, 2, 2], pl.Int64, [1, 1, 0, 1, 1, 0]),
        ([None, 0, 0, None], pl.Int32, [1, 1, 0, 1]),
        ([None, None], pl.Int64, [1, 0]),
        (["a", None, None, "a", "a", "b"], pl.String, [1, 1, 0, 1, 0, 1]),
        ([None, None, None], pl.String, [1, 0, 0]),
        ([2**62, 2**62 + 1], pl.Int64, [1, 1]),
    ],
)
def test_changes_tells_null_from_every_value(
    values: list[object], dtype: pl.DataType, expected: list[int]
) -> None:
    """A run boundary where a key changes, a null being its own value (0 included: a
    filled-in null must not equal a real 0), exact beyond float64's 2^53."""
    changed = kernels._changes(pl.Series(values, dtype=dtype))
    assert changed.tolist() == [bool(e) for e in expected]


def test_packed_selections_are_small() -> None:
    """At k=2 and E <= 256, 2 bytes a token (positions counting up in each run travel as the
    run's first, ids as uint8), against about 44 in the frame; the narrowing is exact or not
    done, and positions in any other order travel whole, in int32 where they fit."""
    rows = 50_000
    frame = pl.DataFrame(
        {"step": [3] * rows, "layer": [1] * rows, "dataset": [None] * rows, "token": range(rows)},
        schema={"step": pl.Int64, "layer": pl.Int32, "dataset": pl.String, "token": pl.Int64},
    ).with_columns(pl.Series("topk", np.tile(np.array([[63, 0]], np.int32), (rows, 1))))
    packed = kernels.pack_selections(frame)
    assert packed["token"] is None
    assert list(packed["first"]) == [0]
    assert packed["topk"].nbytes == 2 * rows
    assert packed["runs"] == {"step": [3], "layer": [1], "dataset": [None]}
    assert list(packed["lengths"]) == [rows]
    wide = frame.with_columns(pl.Series("topk", np.full((rows, 2), 256, np.int32)))
    assert kernels.pack_selections(wide)["topk"].dtype == np.uint16
    padded = frame.with_columns(pl.Series("topk", np.full((rows, 2), -1, np.int32)))
    assert kernels.pack_selections(padded)["topk"].dtype == np.int8
    negative = frame.with_columns(pl.Series("topk", np.full((rows, 2), -40_000, np.int32)))
    assert kernels.pack_selections(negative)["topk"].dtype == np.int32
    shuffled = frame.with_columns(pl.Series("token", np.arange(rows)[::-1]))
    assert kernels.pack_selections(shuffled)["token"].dtype == np.int32


def _one_layer(layer: int, ids: list[list[int]]) -> pl.DataFrame:
    k = len(ids[0])
    return pl.DataFrame(
        {
            "step": [0] * len(ids),
            "layer": [layer] * len(ids),
            "dataset": [None] * len(ids),
            "token": range(len(ids)),
        },
        schema={"step": pl.Int64, "layer": pl.Int32, "dataset": pl.String, "token": pl.Int64},
    ).with_columns(pl.Series("topk", np.array(ids, np.int32), dtype=pl.Array(pl.Int32, k)))


def test_concat_selections_pads_a_smaller_k_and_travels_whole() -> None:
    """Layers of one run may select different numbers of experts: their selections are put
    one after another at the largest k, a smaller k padded with -1; selections of one k are
    concatenated as they are. The padded frame survives the wire (a Dask worker's result)."""
    one, three = _one_layer(0, [[2], [0]]), _one_layer(1, [[1, 3, 0], [2, 1, 3]])
    joined = kernels.concat_selections([one, three])
    assert joined.schema["topk"] == pl.Array(pl.Int32, 3)
    assert joined["topk"].to_list() == [[2, -1, -1], [0, -1, -1], [1, 3, 0], [2, 1, 3]]
    assert_frame_equal(joined.drop("topk"), pl.concat([one.drop("topk"), three.drop("topk")]))
    assert_frame_equal(kernels.concat_selections([one, one]), pl.concat([one, one]))
    assert_frame_equal(kernels.unpack_selections(kernels.pack_selections(joined)), joined)
