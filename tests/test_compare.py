from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.spatial.distance import jensenshannon
from typer.testing import CliRunner

from routelog import api
from routelog.cli import app
from routelog.compare import COLUMNS, compare_datasets, compare_runs
from routelog.errors import InputError, UsageError
from tests.conftest import REAL_LOGS, SAMPLES, WriteRun, dirichlet

runner = CliRunner()

E = 8
T = 200


def probs_for(ids: np.ndarray, e: int = E) -> np.ndarray:
    """Probability rows whose top-k (largest first) are exactly ``ids``."""
    n, k = ids.shape
    probs = np.full((n, e), 0.02 / max(e - k, 1))
    weights = np.linspace(0.6, 0.3, k) if k > 1 else np.array([0.98])
    weights = weights / weights.sum() * (0.98 if k < e else 1.0)
    np.put_along_axis(probs, ids, weights[None, :], axis=1)
    result: np.ndarray = probs / probs.sum(axis=1, keepdims=True)
    return result


def random_ids(rng: np.random.Generator, n: int = T, e: int = E, k: int = 2) -> np.ndarray:
    return np.argsort(rng.random((n, e)), axis=1)[:, :k]


def expected_jsd(a: np.ndarray, b: np.ndarray, e: int = E) -> float:
    """JSD of the top-k load distributions of two id arrays, via scipy."""
    f = np.bincount(a.ravel(), minlength=e) / a.size
    g = np.bincount(b.ravel(), minlength=e) / b.size
    return float(jensenshannon(f, g, base=2) ** 2)


def options() -> api.Options:
    return api.make_options(top_k=2)


def test_known_agreement_overlap_and_jsd(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    a = random_ids(rng)
    b = a.copy()
    b[:50] = b[:50, ::-1]  # 50 tokens swap first and second choice: same set, other top-1
    for t in range(50, 80):  # 30 tokens change their second choice to a new expert
        b[t, 1] = min(set(range(E)) - {a[t, 0], a[t, 1]})
    base = write_parquet_run({0: {0: probs_for(a)}, 10: {0: probs_for(a)}}, name="base")
    other = write_parquet_run({10: {0: probs_for(b)}}, name="other")
    runs = api.load_runs([base, other], options())
    result = compare_runs(runs, options())
    row = result.table.filter(pl.col("run") == "other").row(0, named=True)
    assert row["step"] == 10
    assert row["agreement_top1"] == pytest.approx(150 / T)
    overlap = np.mean([len(set(x) & set(y)) / 2 for x, y in zip(a, b, strict=True)])
    assert row["overlap_topk"] == pytest.approx(overlap)
    assert row["overlap_topk"] == pytest.approx((T - 30 * 0.5) / T)
    assert row["jsd"] == pytest.approx(expected_jsd(a, b), abs=1e-12)
    assert result.left_out == []


def test_entropy_deltas_against_numpy(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(1)
    data_a = {5: {layer: dirichlet(rng, T, E, 0.5) for layer in range(3)}}
    data_b = {5: {layer: dirichlet(rng, T, E, 0.1 + layer) for layer in range(3)}}
    runs = api.load_runs(
        [write_parquet_run(data_a, name="a"), write_parquet_run(data_b, name="b")], options()
    )
    table = compare_runs(runs, options()).table.filter(pl.col("run") == "b")
    for layer in range(3):
        p, q = data_a[5][layer].astype(np.float32), data_b[5][layer].astype(np.float32)

        def h_token(x: np.ndarray) -> float:
            x = x.astype(np.float64)
            return float(np.mean(-np.sum(np.where(x > 0, x * np.log(x), 0), axis=1)) / np.log(E))

        def h_load(x: np.ndarray) -> float:
            m = x.astype(np.float64).mean(axis=0)
            return float(-np.sum(m * np.log(m)) / np.log(E))

        row = table.filter(pl.col("layer") == layer).row(0, named=True)
        assert row["delta_token_entropy_norm"] == pytest.approx(h_token(q) - h_token(p), abs=1e-6)
        assert row["delta_load_entropy_norm"] == pytest.approx(h_load(q) - h_load(p), abs=1e-6)
        top_p, top_q = np.argsort(-p, axis=1)[:, :2], np.argsort(-q, axis=1)[:, :2]
        assert row["jsd"] == pytest.approx(expected_jsd(top_p, top_q), abs=1e-9)


def test_baseline_row_first_with_null_deltas(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(2)
    paths = [
        write_parquet_run({0: {0: dirichlet(rng, 50, E), 1: dirichlet(rng, 50, E)}}, name=n)
        for n in ("a", "b", "c")
    ]
    table = compare_runs(api.load_runs(paths, options()), options()).table
    assert table.columns == COLUMNS
    assert table["run"].to_list() == ["a", "b", "c", "a", "b", "c"]
    baseline = table.filter(pl.col("run") == "a")
    assert baseline["delta_token_entropy_norm"].null_count() == 2
    assert baseline["jsd"].null_count() == 2


def test_different_experts_and_missing_layers_are_left_out(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(3)
    base = write_parquet_run(
        {0: {0: dirichlet(rng, 50, E), 1: dirichlet(rng, 50, E), 2: dirichlet(rng, 50, E)}},
        name="base",
    )
    other = write_parquet_run(
        {0: {0: dirichlet(rng, 50, E), 3: dirichlet(rng, 50, E)}}, name="other"
    )
    narrow = {"step": [0] * 50, "layer": [1] * 50, "probs": dirichlet(rng, 50, 4)}
    pl.DataFrame(narrow).write_parquet(other / "narrow_layer.parquet")
    result = compare_runs(api.load_runs([base, other], options()), options())
    assert result.table["layer"].unique().sort().to_list() == [0]
    reasons = {(o.layer, o.what): o.reason for o in result.left_out}
    assert "E=4" in reasons[(1, "layer")]
    assert "E=8" in reasons[(1, "layer")]
    assert "not logged" in reasons[(2, "layer")]
    assert "no layer 3" in reasons[(3, "layer")]


def test_nothing_shared_is_an_error(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(4)
    base = write_parquet_run({0: {0: dirichlet(rng, 50, E)}}, name="base")
    other = write_parquet_run({0: {1: dirichlet(rng, 50, E)}}, name="other")
    with pytest.raises(InputError, match="nothing to compare"):
        compare_runs(api.load_runs([base, other], options()), options())


def test_token_metrics_left_out_without_tokens(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(5)
    base = write_parquet_run({0: {0: dirichlet(rng, 50, E)}}, name="base")
    other = write_parquet_run({0: {0: dirichlet(rng, 50, E)}}, name="other", tokens=False)
    result = compare_runs(api.load_runs([base, other], options()), options())
    assert result.table["agreement_top1"].null_count() == 2
    (note,) = result.left_out
    assert (note.run, note.layer, note.what) == ("other", None, "agreement_top1, overlap_topk")
    assert "no token positions" in note.reason


def test_token_metrics_left_out_for_other_tokens(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(6)
    base = write_parquet_run({0: {0: dirichlet(rng, 50, E)}}, name="base")
    other = write_parquet_run({0: {0: dirichlet(rng, 40, E)}}, name="other")
    result = compare_runs(api.load_runs([base, other], options()), options())
    (note,) = result.left_out
    assert (note.layer, note.reason) == (None, "routed other tokens than 'base'")
    # one layer with other tokens, one with the same: only that layer is left out
    probs = dirichlet(rng, 50, E)
    base = write_parquet_run({0: {0: probs, 1: dirichlet(rng, 50, E)}}, name="base2")
    other = write_parquet_run({0: {0: probs, 1: dirichlet(rng, 30, E)}}, name="other2")
    result = compare_runs(api.load_runs([base, other], options()), options())
    (note,) = result.left_out
    assert note.layer == 1
    agreement = result.table.filter(pl.col("run") == "other2")["agreement_top1"].to_list()
    assert agreement == [1.0, None]


def _stepped(write_parquet_run: WriteRun, name: str, steps: list[int]) -> Path:
    rng = np.random.default_rng(len(name))
    return write_parquet_run({s: {0: dirichlet(rng, 30, E)} for s in steps}, name=name)


def test_alignment_default_step_and_nearest(write_parquet_run: WriteRun) -> None:
    base = _stepped(write_parquet_run, "base", [0, 100, 200, 300])
    other = _stepped(write_parquet_run, "other", [0, 100, 250])
    runs = api.load_runs([base, other], options())
    assert [g.step for g in compare_runs(runs, options()).groups] == [100, 100]
    assert [g.step for g in compare_runs(runs, options(), step=0).groups] == [0, 0]
    nearest = compare_runs(runs, options(), align="nearest")
    assert [g.step for g in nearest.groups] == [300, 250]
    row = nearest.table.filter(pl.col("run") == "other").row(0, named=True)
    assert (row["step"], row["baseline_step"]) == (250, 300)
    at_200 = compare_runs(runs, options(), align="nearest", step=200)
    assert [g.step for g in at_200.groups] == [200, 100]


def test_no_common_step_is_a_clear_error(write_parquet_run: WriteRun) -> None:
    base = _stepped(write_parquet_run, "base", [0, 100])
    other = _stepped(write_parquet_run, "other", [150, 250])
    runs = api.load_runs([base, other], options())
    with pytest.raises(UsageError, match="no step is logged in every run") as error:
        compare_runs(runs, options())
    message = str(error.value)
    assert "base: steps 0–100 (2 logged)" in message
    assert "other: steps 150–250 (2 logged)" in message
    assert "--align nearest" in message
    assert "--step" in message
    with pytest.raises(UsageError, match="step 100 is not logged in every run"):
        compare_runs(runs, options(), step=100)
    with pytest.raises(UsageError, match="'other' logged no step at or before 100"):
        compare_runs(runs, options(), align="nearest")


def test_cli_no_common_step_exits_2(write_parquet_run: WriteRun) -> None:
    base = _stepped(write_parquet_run, "base", [0, 100])
    other = _stepped(write_parquet_run, "other", [150])
    result = runner.invoke(app, ["compare", str(base), str(other)])
    assert result.exit_code == 2, result.output
    assert "routelog: error: no step is logged in every run" in result.output
    assert "--align nearest" in result.output


def test_cli_compare_needs_two_runs() -> None:
    result = runner.invoke(app, ["compare", str(SAMPLES / "healthy")])
    assert result.exit_code == 2, result.output
    assert "at least two runs" in result.output


def test_cli_base_without_by_dataset() -> None:
    healthy, collapse = str(SAMPLES / "healthy"), str(SAMPLES / "collapse")
    result = runner.invoke(app, ["compare", healthy, collapse, "--base", "x"])
    assert result.exit_code == 2, result.output
    assert "--base names a dataset" in result.output


def _shift_reference(layer: int) -> float:
    """JSD of the top-2 load of 'code' against 'text' at step 200, from the Parquet file."""
    frame = pl.read_parquet(SAMPLES / "shift" / "step_000200.parquet").filter(
        pl.col("layer") == layer
    )
    ids = {}
    for dataset in ("text", "code"):
        logits = np.array(frame.filter(pl.col("dataset") == dataset)["logits"].to_list())
        ids[dataset] = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    return expected_jsd(ids["code"], ids["text"])


def test_by_dataset_on_the_shift_sample() -> None:
    (run,) = api.load_runs([SAMPLES / "shift"], options())
    result = compare_datasets(run, options())
    assert result.baseline == "text"
    assert [g.name for g in result.groups] == ["text", "code"]
    code = result.table.filter(pl.col("run") == "code").sort("layer")
    for layer, jsd in enumerate(code["jsd"].to_list()):
        assert jsd == pytest.approx(_shift_reference(layer), abs=1e-9)
    assert [f.layer for f in result.findings] == [2, 3]
    assert {f.code for f in result.findings} == {"distribution_shift"}
    assert all(f.severity == "warn" and f.value > 0.1 for f in result.findings)
    assert code["jsd"][0] < 0.1


def test_by_dataset_base_and_threshold() -> None:
    (run,) = api.load_runs([SAMPLES / "shift"], options())
    result = compare_datasets(run, options(), base="code", threshold=0.39)
    assert result.baseline == "code"
    assert result.table["run"].to_list()[:2] == ["code", "text"]
    assert [f.layer for f in result.findings] == [3]


def test_by_dataset_errors(write_parquet_run: WriteRun) -> None:
    shift = str(SAMPLES / "shift")
    result = runner.invoke(app, ["compare", shift, "--by", "dataset", "--base", "prose"])
    assert result.exit_code == 2, result.output
    assert "--base 'prose' is not a dataset" in result.output
    assert "text, code" in result.output
    healthy = str(SAMPLES / "healthy")
    result = runner.invoke(app, ["compare", healthy, "--by", "dataset"])
    assert result.exit_code == 2, result.output
    assert "needs two or more datasets, found no dataset column" in result.output
    result = runner.invoke(app, ["compare", shift, healthy, "--by", "dataset"])
    assert result.exit_code == 2, result.output
    assert "datasets of one run, got 2" in result.output


def _torch_reference(path: Path, k: int = 2) -> dict[int, dict[str, np.ndarray | float]]:
    """Per layer, from a real router dump with torch: normalised entropies and load f."""
    import torch

    dump = torch.load(path, weights_only=True)
    out: dict[int, dict[str, np.ndarray | float]] = {}
    for layer, logits in enumerate(dump["router_logits"]):
        probs = torch.softmax(logits.double(), dim=-1)
        n_experts = probs.shape[1]
        plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
        mean = probs.mean(dim=0)
        # top-k as the README defines it: the k largest, ties to the lower index
        ids = torch.sort(-probs.float(), dim=1, stable=True).indices[:, :k]
        counts = torch.bincount(ids.flatten(), minlength=n_experts).double()
        out[layer] = {
            "token_entropy_norm": float(-plogp.sum(dim=1).mean() / math.log(n_experts)),
            "load_entropy_norm": float(-(mean * mean.log()).sum() / math.log(n_experts)),
            "share": (counts / counts.sum()).numpy(),
            "ids": ids.numpy(),
        }
    return out


@pytest.mark.torch
@pytest.mark.real_logs
def test_real_runs_jsd_and_entropy_deltas() -> None:
    """aux-loss vs collapse (real Mixtral .pt dumps): deltas and JSD equal a torch computation."""
    runs = api.load_runs([REAL_LOGS / "aux-loss", REAL_LOGS / "collapse"], options())
    result = compare_runs(runs, options())
    assert [g.step for g in result.groups] == [300, 300]
    reference_base = _torch_reference(REAL_LOGS / "aux-loss" / "step_000300.pt")
    reference_other = _torch_reference(REAL_LOGS / "collapse" / "step_000300.pt")
    rows = result.table.filter(pl.col("run") == "collapse").sort("layer")
    assert rows["layer"].to_list() == [0, 1, 2, 3]
    for row in rows.iter_rows(named=True):
        ref_b, ref_o = reference_base[row["layer"]], reference_other[row["layer"]]
        for metric in ("token_entropy_norm", "load_entropy_norm"):
            expected = float(ref_o[metric]) - float(ref_b[metric])  # type: ignore[arg-type]
            assert row[f"delta_{metric}"] == pytest.approx(expected, abs=1e-5), metric
        p, q = ref_o["share"], ref_b["share"]
        assert row["jsd"] == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-9)
        # the same probe batch in both runs: token t is row t of both dumps
        ids_o, ids_b = np.asarray(ref_o["ids"]), np.asarray(ref_b["ids"])
        assert row["agreement_top1"] == pytest.approx(np.mean(ids_o[:, 0] == ids_b[:, 0]))
        overlap = np.mean([len(set(x) & set(y)) / 2 for x, y in zip(ids_o, ids_b, strict=True)])
        assert row["overlap_topk"] == pytest.approx(overlap)
    # the collapsed run routes differently: towards collapse in every layer
    assert (rows["delta_token_entropy_norm"] < 0).all()
    assert (rows["jsd"] > 0.05).all()
