from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from routelog import kernels, tokens
from tests.test_kernels import selection_frames


def _random_ids(rng: np.random.Generator, n: int, e: int, k: int) -> np.ndarray:
    """Distinct expert ids per row (a random permutation's first k)."""
    return np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32)


def _by_hand(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """agreement and overlap with Python sets, row by row (the independent reference)."""
    k = min(a.shape[1], b.shape[1])
    agree = np.mean([x[0] == y[0] for x, y in zip(a, b, strict=True)])
    overlap = np.mean(
        [len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(a, b, strict=True)]
    )
    return float(agree), float(overlap)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    e=st.integers(2, 10),
    data=st.data(),
)
def test_agreement_and_overlap_match_sets(seed: int, n: int, e: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, e))
    k2 = data.draw(st.integers(1, e))
    rng = np.random.default_rng(seed)
    a, b = _random_ids(rng, n, e, k), _random_ids(rng, n, e, k2)
    agree, overlap = _by_hand(a, b)
    assert float(tokens.agreement_top1(a, b)) == pytest.approx(agree)
    assert float(tokens.overlap_topk(a, b)) == pytest.approx(overlap)


def test_identical_and_disjoint_choices() -> None:
    a = np.array([[0, 1], [2, 3], [4, 5]])
    assert float(tokens.agreement_top1(a, a)) == 1.0
    assert float(tokens.overlap_topk(a, a)) == 1.0
    assert float(tokens.overlap_topk(a, (a + 6) % 12)) == 0.0
    # the same set in another order: top-1 differs, the top-2 sets are equal
    assert float(tokens.agreement_top1(a, a[:, ::-1])) == 0.0
    assert float(tokens.overlap_topk(a, a[:, ::-1])) == 1.0


def test_step_series_known_answer() -> None:
    rng = np.random.default_rng(0)
    final = _random_ids(rng, 100, 8, 2)
    first = final.copy()
    first[:40, 0] = (final[:40, 0] + 4) % 8  # 40 tokens end on another top-1
    first[:40, 1] = (final[:40, 1] + 4) % 8  # ...and another second choice
    flips, saturation = tokens.step_series(np.stack([first, final, final]))
    assert np.isnan(flips[0])
    assert flips[1:].tolist() == pytest.approx([0.4, 0.0])
    by_hand = _by_hand(first, final)[1]
    assert saturation.tolist() == pytest.approx([by_hand, 1.0, 1.0])


def _selections(
    step_ids: dict[int, np.ndarray], token_order: np.ndarray | None = None
) -> pl.DataFrame:
    frames = []
    for step, ids in step_ids.items():
        order = token_order if token_order is not None else np.arange(len(ids))
        frames.append(
            pl.DataFrame(
                {
                    "step": np.full(len(ids), step, dtype=np.int64),
                    "layer": np.zeros(len(ids), dtype=np.int32),
                    "dataset": pl.Series([None] * len(ids), dtype=pl.String),
                    "token": order.astype(np.int64),
                }
            ).with_columns(pl.Series("topk", ids[order]))
        )
    return pl.concat(frames)


def test_token_metrics_aligns_tokens_by_position() -> None:
    rng = np.random.default_rng(1)
    a, b = _random_ids(rng, 50, 8, 2), _random_ids(rng, 50, 8, 2)
    shuffled = rng.permutation(50)
    frame = pl.concat([_selections({0: a}, shuffled), _selections({10: b})])
    result = tokens.token_metrics(frame)
    agree, overlap = _by_hand(a, b)
    assert result["step"].to_list() == [0, 10]
    assert result["flip_rate"].to_list() == [None, pytest.approx(1 - agree)]
    assert result["saturation"].to_list() == pytest.approx([overlap, 1.0])


def test_token_metrics_need_the_same_tokens_every_step() -> None:
    rng = np.random.default_rng(2)
    a = _random_ids(rng, 20, 8, 2)
    frame = pl.concat([_selections({0: a}), _selections({10: a[:15]})])
    assert tokens.token_metrics(frame).height == 0
    repeated = pl.concat([_selections({0: a}), _selections({0: a})])
    assert tokens.token_metrics(repeated).height == 0


def test_same_tokens_rejects_other_tokens() -> None:
    rng = np.random.default_rng(3)
    a = _selections({0: _random_ids(rng, 10, 8, 2)})
    assert tokens.same_tokens(a, a) is not None
    assert tokens.same_tokens(a, a.with_columns(pl.col("token") + 1)) is None
    assert tokens.same_tokens(a, a.head(5)) is None


def _run_selections(
    rng: np.random.Generator, steps: int, layers: int, n: int, named: bool, token_major: bool
) -> pl.DataFrame:
    """Selections as ingest writes them: per step, per layer, tokens in one fixed order."""
    datasets = np.array(["code", "web"])[rng.integers(0, 2, n)] if named else None
    order = rng.permutation(n)
    frames = []
    for step in range(steps):
        for layer in range(layers):
            frames.append(
                pl.DataFrame(
                    {
                        "step": np.full(n, step * 10, dtype=np.int64),
                        "layer": np.full(n, layer, dtype=np.int32),
                        "dataset": pl.Series(
                            datasets[order] if datasets is not None else [None] * n,
                            dtype=pl.String,
                        ),
                        "token": order.astype(np.int64),
                    }
                ).with_columns(pl.Series("topk", _random_ids(rng, n, 8, 2)))
            )
    frame = pl.concat(frames)
    if token_major:  # rows token by token, every layer of a token in turn
        frame = frame.sort("step", "token", "dataset", "layer")
    return frame


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 4),
    layers=st.integers(1, 3),
    n=st.integers(1, 30),
    named=st.booleans(),
    token_major=st.booleans(),
    damage=st.sampled_from(["none", "reorder", "drop", "repeat"]),
)
def test_token_metrics_in_order_equal_shuffled_and_sorted(
    seed: int, steps: int, layers: int, n: int, named: bool, token_major: bool, damage: str
) -> None:
    """The in-order fast path, a row shuffle (the sorting path) and the sorting path itself
    give identical frames, also for reordered, missing and repeated tokens."""
    rng = np.random.default_rng(seed)
    frame = _run_selections(rng, steps, layers, n, named, token_major)
    last = frame.filter(pl.col("step") == frame["step"].max(), pl.col("layer") == 0)
    if damage == "reorder":  # the last step lists layer 0's tokens in another order
        rest = frame.filter((pl.col("step") != frame["step"].max()) | (pl.col("layer") != 0))
        frame = pl.concat([rest, last.sample(fraction=1.0, shuffle=True, seed=seed)])
    elif damage == "drop":
        frame = frame.filter(~pl.int_range(pl.len()).is_in([frame.height - 1]))
    elif damage == "repeat":
        frame = pl.concat([frame, last.head(1)])
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed + 1)
    fast = tokens.token_metrics(frame)
    assert_frame_equal(fast, tokens.token_metrics(shuffled))
    assert_frame_equal(fast, tokens._sorted_token_metrics(frame))
    if damage in ("none", "reorder"):
        assert fast.height == steps * layers
    if damage == "repeat":  # layer 0 has a token twice at the last step
        assert 0 not in fast["layer"].to_list()


def test_token_metrics_in_order_match_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    frame = _run_selections(rng, steps=3, layers=2, n=40, named=True, token_major=False)

    def no_sorting(selections: pl.DataFrame) -> pl.DataFrame:
        raise AssertionError("rows in order must not be sorted")

    monkeypatch.setattr(tokens, "_sorted_token_metrics", no_sorting)
    result = tokens.token_metrics(frame)
    for layer in (0, 1):
        by_step = [
            frame.filter(pl.col("step") == s, pl.col("layer") == layer)["topk"].to_numpy()
            for s in (0, 10, 20)
        ]
        mine = result.filter(pl.col("layer") == layer)
        flips = [1 - _by_hand(by_step[i], by_step[i - 1])[0] for i in (1, 2)]
        assert mine["flip_rate"].to_list() == [None, *[pytest.approx(f) for f in flips]]
        overlaps = [_by_hand(ids, by_step[-1])[1] for ids in by_step]
        assert mine["saturation"].to_list() == pytest.approx(overlaps)


def test_token_metrics_shards_of_one_step_and_repeated_positions() -> None:
    """Two files of one step: layer 0 logs the same positions twice (left out), layer 1
    splits its positions between the files (kept)."""
    rng = np.random.default_rng(6)
    n = 30

    def part(layer: int, first: int) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "step": np.zeros(n, dtype=np.int64),
                "layer": np.full(n, layer, dtype=np.int32),
                "dataset": pl.Series([None] * n, dtype=pl.String),
                "token": np.arange(first, first + n, dtype=np.int64),
            }
        ).with_columns(pl.Series("topk", _random_ids(rng, n, 8, 2)))

    frame = pl.concat([part(0, 0), part(1, 0), part(0, 0), part(1, n)])
    result = tokens.token_metrics(frame)
    assert result["layer"].to_list() == [1]
    assert result["saturation"].to_list() == [1.0]
    assert_frame_equal(result, tokens._sorted_token_metrics(frame))


def _layer_steps(layer: int, step_ids: dict[int, np.ndarray]) -> list[pl.DataFrame]:
    return [
        _selections({step: ids}).with_columns(pl.lit(layer, dtype=pl.Int32).alias("layer"))
        for step, ids in step_ids.items()
    ]


@pytest.mark.parametrize("shuffle", [False, True])
def test_token_metrics_of_layers_and_steps_with_different_k(shuffle: bool) -> None:
    """A run whose layer 0 selects 1 expert per token and layer 1 selects 3 (held padded to
    k=3): each layer's metrics are those of its own k, by hand. Layer 2 selects 3 experts at
    step 0 and 2 afterwards: its steps compare their top-2 sets. The fast path and the
    sorting path agree."""
    rng = np.random.default_rng(7)
    ones = {s: _random_ids(rng, 30, 8, 1) for s in (0, 10, 20)}
    threes = {s: _random_ids(rng, 30, 8, 3) for s in (0, 10, 20)}
    changing = {0: _random_ids(rng, 30, 8, 3), 10: _random_ids(rng, 30, 8, 2)}
    parts = [*_layer_steps(0, ones), *_layer_steps(1, threes), *_layer_steps(2, changing)]
    frame = kernels.concat_selections(parts)
    if shuffle:
        frame = frame.sample(fraction=1.0, shuffle=True, seed=1)
    result = tokens.token_metrics(frame)
    for layer, by_step in ((0, ones), (1, threes), (2, changing)):
        ids = list(by_step.values())
        if layer == 2:
            ids = [each[:, :2] for each in ids]
        mine = result.filter(pl.col("layer") == layer).sort("step")
        flips = [1 - _by_hand(ids[i], ids[i - 1])[0] for i in range(1, len(ids))]
        assert mine["flip_rate"].to_list() == [None, *[pytest.approx(f) for f in flips]]
        assert mine["saturation"].to_list() == pytest.approx([_by_hand(i, ids[-1])[1] for i in ids])
    assert_frame_equal(result.sort("layer", "step"), tokens._sorted_token_metrics(frame))
    one, three = (frame.filter(pl.col("step") == 0, pl.col("layer") == i) for i in (0, 1))
    aligned = tokens.same_tokens(one, three)
    assert aligned is not None
    assert [a.shape for a in aligned] == [(30, 1), (30, 3)]


def _ranges_by_group_by(selections: pl.DataFrame) -> pl.DataFrame:
    """The definition: a group-by over every row, groups in the order they first appear."""
    return selections.group_by(kernels.KEYS, maintain_order=True).agg(
        pl.col("token").min().alias("lo"), pl.col("token").max().alias("hi")
    )


@settings(max_examples=100, deadline=None)
@given(selection_frames())
def test_token_ranges_equal_a_group_by_over_every_row(frame: pl.DataFrame) -> None:
    """Runs reduced in numpy, then grouped: the group-by's frame, whatever the runs (a group
    in several of them), the positions (counting, anywhere, some null) or the datasets."""
    assert_frame_equal(tokens.token_ranges(frame), _ranges_by_group_by(frame))


@pytest.mark.parametrize(
    "columns",
    [
        {"step": [0, 0, 1, 0], "layer": [0, 0, 0, 0], "token": [None, None, 4, 2]},
        {"step": [None, None, 1, None], "layer": [0, 0, 0, 0], "token": [7, 1, 4, 2]},
        {"step": [0, 0], "layer": [None, 1], "token": [None, 3]},
        {"step": [], "layer": [], "token": []},
    ],
)
def test_token_ranges_of_null_keys_and_positions(columns: dict[str, list[int | None]]) -> None:
    """A group whose positions are all null has null ``lo``/``hi``; a null step or layer is
    a group of its own, as in the group-by; no rows give an empty frame of the same schema."""
    rows = len(columns["step"])
    frame = pl.DataFrame(
        {**columns, "dataset": [None] * rows},
        schema={"step": pl.Int64, "layer": pl.Int32, "token": pl.Int64, "dataset": pl.String},
    )
    assert_frame_equal(tokens.token_ranges(frame), _ranges_by_group_by(frame))
