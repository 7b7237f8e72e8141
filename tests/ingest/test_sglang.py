"""SGLang expert-distribution dumps, written with torch.save in the shapes of
``python/sglang/srt/eplb/expert_distribution.py``: stat dumps (a circular buffer of logical
counts) and per_pass / per_token dumps (physical counts and ids, with the physical-to-logical
map). Expected counts are computed here from the simulated routing, independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import entropy
from typer.testing import CliRunner

import routelog
from routelog.cli import app

torch = pytest.importorskip("torch")
runner = CliRunner()

E, E_PHYSICAL, K, L, T = 8, 10, 2, 4, 30
DENSE = 0  # layer 0 is dense: all-zero counts, ids all -1


def _mapping() -> np.ndarray:
    """[L, E_physical]: physical slots 8 and 9 replicate logical experts 2 and 5 (or 3, 6)."""
    rows = [
        np.r_[np.arange(E), [2, 5]] if la % 2 else np.r_[np.arange(E), [3, 6]] for la in range(L)
    ]
    return np.stack(rows).astype(np.int64)


def _route(rng: np.random.Generator, mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Physical ids [L, T, 8] padded with -1, and the logical ids [L, T, K] they stand for."""
    physical = np.full((L, T, 8), -1, dtype=np.int32)
    logical = np.zeros((L, T, K), dtype=np.int64)
    for layer in range(L):
        if layer == DENSE:
            continue
        for token in range(T):
            experts = rng.choice(E, K, replace=False, p=rng.dirichlet(np.ones(E)))
            logical[layer, token] = experts
            for slot, expert in enumerate(experts):
                replicas = np.flatnonzero(mapping[layer] == expert)
                physical[layer, token, slot] = rng.choice(replicas)
    return physical, logical


def _physical_count(physical: np.ndarray) -> np.ndarray:
    counts = np.zeros((L, E_PHYSICAL), dtype=np.int32)
    for layer in range(L):
        ids = physical[layer][physical[layer] != -1]
        counts[layer] = np.bincount(ids, minlength=E_PHYSICAL)
    return counts


def write_stat(root: Path, stamps: list[str], rng: np.random.Generator) -> list[np.ndarray]:
    """Stat dumps; returns each dump's expected [L, E] counts, in time-stamp order."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for stamp in stamps:
        buffer = np.zeros((6, L, E), dtype=np.int32)
        for slot in (4, 5, 0, 1):  # wrapped around: not in time order, slots 2 and 3 unused
            buffer[slot, 1:] = rng.integers(0, 20, size=(L - 1, E))
        expected[float(stamp)] = buffer.sum(axis=0)
        torch.save(
            {
                "rank": 0,
                "logical_count": torch.from_numpy(buffer),
                "average_utilization_rate_over_window": None,
            },
            root / f"expert_distribution_recorder_{stamp}.pt",
        )
    return [expected[key] for key in sorted(expected)]


def test_stat_dumps_number_steps_by_time_stamp(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    expected = write_stat(tmp_path / "dumps", ["1732500100.25", "1732500000.5", "999"], rng)
    result = routelog.analyze([str(tmp_path / "dumps")], top_k=K)
    metrics = result.metrics.sort("step", "layer")
    assert metrics.select("step", "layer").rows() == [(s, la) for s in range(3) for la in (1, 2, 3)]
    for row in metrics.iter_rows(named=True):
        counts = expected[row["step"]][row["layer"]]
        assert row["load_share"] == pytest.approx((counts / counts.sum()).tolist())
        assert row["assign_entropy"] == pytest.approx(entropy(counts), rel=1e-9)
    info = result.runs[0].files[0]
    assert info.format == "sglang"
    assert info.layout == "stat dump"
    assert info.rows == 4  # the buffer's non-zero passes
    assert "layer 0 routed no tokens (dense layers): left out" in info.warnings
    assert routelog.analyze([str(tmp_path / "dumps")], steps="1").metrics[
        "step"
    ].unique().to_list() == [1]


def _write_records(root: Path, rng: np.random.Generator, *, per_token: bool) -> np.ndarray:
    """Two ranks' dumps of passes 7 and 8; returns the expected logical counts [pass, L, E]."""
    root.mkdir(parents=True, exist_ok=True)
    mapping = _mapping()
    expected = np.zeros((2, L, E), dtype=np.int64)
    for rank in (0, 1):
        records = []
        for index, pass_id in enumerate((7, 8)):
            physical, logical = _route(rng, mapping)
            for layer in range(1, L):
                expected[index, layer] += np.bincount(logical[layer].ravel(), minlength=E)
            record: dict[str, object] = {
                "forward_pass_id": pass_id,
                "rank": rank,
                "gatherer_key": "primary",
                "global_physical_count": torch.from_numpy(_physical_count(physical)),
            }
            if per_token:
                record |= {
                    "input_ids": list(range(T)),
                    "positions": list(range(T)),
                    "extend_seq_lens": [T],
                    "forward_mode": 1,
                    "topk_ids_of_layer": torch.from_numpy(physical),
                    "misc_objects": [],
                }
            records.append(record)
        torch.save(
            {"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)},
            root / f"expert_distribution_recorder_1732500000.{rank}5_{rank}.pt",
        )
    return expected


@pytest.mark.parametrize("per_token", [False, True])
def test_physical_experts_are_mapped_to_logical(tmp_path: Path, per_token: bool) -> None:
    expected = _write_records(tmp_path / "dumps", np.random.default_rng(2), per_token=per_token)
    (tmp_path / "dumps" / "config.json").write_text(
        json.dumps({"n_routed_experts": E, "num_experts_per_tok": K})
    )
    result = routelog.analyze([str(tmp_path / "dumps")])
    metrics = result.metrics.sort("step", "layer")
    assert metrics.select("step", "layer").rows() == [(s, la) for s in (7, 8) for la in (1, 2, 3)]
    for row in metrics.iter_rows(named=True):
        counts = expected[row["step"] - 7, row["layer"]]
        assert row["n_experts"] == E
        assert row["top_k"] == K
        assert row["load_share"] == pytest.approx((counts / counts.sum()).tolist())
        assert row["assign_entropy"] == pytest.approx(entropy(counts), rel=1e-9)
    mode = "per-token" if per_token else "per-pass"
    rows = sum(f.rows for f in result.runs[0].files)
    assert rows == (2 * 2 * T if per_token else 2 * 2)  # tokens, or passes, of both ranks
    assert {f.layout for f in result.runs[0].files} == {f"{mode} dump"}
    assert [Path(p).name for p in result.runs[0].sidecar_files] == ["config.json"]


def test_physical_id_outside_the_map(tmp_path: Path) -> None:
    root = tmp_path / "dumps"
    _write_records(root, np.random.default_rng(3), per_token=True)
    dump = root / "expert_distribution_recorder_1732500000.05_0.pt"
    content = torch.load(dump, weights_only=True)
    content["records"][1]["topk_ids_of_layer"][2, 5, 0] = E_PHYSICAL
    torch.save(content, dump)
    result = runner.invoke(app, ["analyze", str(root)])
    assert result.exit_code == 2, result.output
    assert f"{dump} record 1: physical expert id 10 (layer 2, token 5) is outside" in result.output
    skipped = routelog.analyze([str(root)], skip_bad_rows=True)
    assert skipped.runs[0].summary()["skipped_rows"] == 1


def test_not_an_sglang_dump(tmp_path: Path) -> None:
    path = tmp_path / "expert_distribution_recorder_17.pt"
    torch.save({"something": torch.zeros(3)}, path)
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert "an SGLang dump holds 'logical_count' (stat) or 'records'" in result.output
