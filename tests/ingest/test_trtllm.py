"""TensorRT-LLM expert statistics: meta_info.json + rank{r}.safetensors ("{iter}_{layer}").

Written as ``tensorrt_llm/_torch/expert_statistic.py`` writes them: ``torch.bincount`` of the
selected experts per iteration and layer, saved with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import entropy
from typer.testing import CliRunner

import routelog
from routelog.cli import app

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
runner = CliRunner()

E, K, T = 16, 4, 40
ITERS, LAYERS, RANKS = (10, 11, 12), (3, 4, 5), (0, 1)


def write_statistics(root: Path, *, meta: bool = True) -> dict[tuple[int, int], np.ndarray]:
    """Both ranks' files; returns {(iter, layer): counts summed over ranks}."""
    rng = np.random.default_rng(5)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[tuple[int, int], np.ndarray] = {}
    for rank in RANKS:
        records = {}
        for step in ITERS:
            for layer in LAYERS:
                weights = rng.dirichlet(np.full(E, 0.3 if layer == 5 else 5.0))
                selected = np.stack([rng.choice(E, K, replace=False, p=weights) for _ in range(T)])
                counts = torch.bincount(torch.from_numpy(selected).flatten(), minlength=E)
                records[f"{step}_{layer}"] = counts
                total = expected.setdefault((step, layer), np.zeros(E, dtype=np.int64))
                total += counts.numpy()
        safetensors_torch.save_file(records, str(root / f"rank{rank}.safetensors"))
    if meta:
        (root / "meta_info.json").write_text(
            json.dumps({"num_experts": E, "num_experts_per_token": K})
        )
    return expected


def test_counts_add_up_over_ranks(tmp_path: Path) -> None:
    expected = write_statistics(tmp_path / "stats")
    result = routelog.analyze([str(tmp_path / "stats")])
    metrics = result.metrics.sort("step", "layer")
    assert metrics.select("step", "layer").rows() == [(s, la) for s in ITERS for la in LAYERS]
    for row in metrics.iter_rows(named=True):
        counts = expected[(row["step"], row["layer"])]
        share = counts / counts.sum()
        assert row["top_k"] == K
        assert row["n_experts"] == E
        assert row["load_share"] == pytest.approx(share.tolist())
        assert row["assign_entropy"] == pytest.approx(entropy(share), rel=1e-9)
        assert row["max_vio"] == pytest.approx(counts.max() / counts.mean() - 1)
        assert row["load_cv"] == pytest.approx(counts.std() / counts.mean())
    run = result.runs[0]
    assert {f.format for f in run.files} == {"trtllm"}
    assert {f.layout for f in run.files} == {"expert statistic"}
    assert [Path(p).name for p in run.sidecar_files] == ["meta_info.json"]


def test_layers_and_steps_select(tmp_path: Path) -> None:
    write_statistics(tmp_path / "stats")
    result = routelog.analyze([str(tmp_path / "stats")], layers="4", steps="11:")
    assert result.metrics.select("step", "layer").sort("step").rows() == [(11, 4), (12, 4)]


def test_without_meta_k_is_not_stated(tmp_path: Path) -> None:
    write_statistics(tmp_path / "stats", meta=False)
    result = routelog.analyze([str(tmp_path / "stats")])
    assert result.metrics["n_experts"].unique().to_list() == [E]
    assert result.metrics["top_k"].null_count() == result.metrics.height


def test_bad_key_and_bad_tensor(tmp_path: Path) -> None:
    root = tmp_path / "stats"
    write_statistics(root)
    counts = torch.ones(E, dtype=torch.int64)
    safetensors_torch.save_file(
        {"10_3": counts, "layer3": counts.clone()}, str(root / "rank2.safetensors")
    )
    result = runner.invoke(app, ["analyze", str(root)])
    assert result.exit_code == 2, result.output
    assert f"{root / 'rank2.safetensors'} key 'layer3': not '{{iter}}_{{layer}}'" in result.output
    skipped = routelog.analyze([str(root)], skip_bad_rows=True)
    assert skipped.runs[0].summary()["skipped_rows"] == 1
    short = torch.ones(E - 1, dtype=torch.int64)
    safetensors_torch.save_file({"10_3": short}, str(root / "rank2.safetensors"))
    result = runner.invoke(app, ["analyze", str(root)])
    assert result.exit_code == 2, result.output
    assert "key '10_3': 15 counts, but num_experts is 16" in result.output
    (root / "rank2.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = runner.invoke(app, ["analyze", str(root)])
    assert result.exit_code == 2, result.output
    assert "rank2.safetensors: not a valid safetensors file" in result.output


@pytest.mark.parametrize(("dtype", "value"), [(torch.int64, 2**62), (torch.int64, 2**53 + 2)])
def test_counts_beyond_2_53_are_bad_not_wrapped(tmp_path: Path, dtype: Any, value: int) -> None:
    # an int64 sum of 2^62 over 16 experts wraps round to 0, which read as "no tokens"
    root = tmp_path / "stats"
    write_statistics(root)
    huge = torch.full((E,), value, dtype=dtype) if value > 2**60 else torch.ones(E, dtype=dtype)
    huge[0] = value
    safetensors_torch.save_file({"10_3": huge}, str(root / "rank2.safetensors"))
    result = runner.invoke(app, ["analyze", str(root), "--no-cache"])
    assert result.exit_code == 2, result.output
    assert "rank2.safetensors key '10_3': counts beyond 2^53 tokens" in result.output
    skipped = routelog.analyze([str(root)], skip_bad_rows=True)
    assert skipped.runs[0].summary()["skipped_rows"] == 1


def test_all_zero_entries_are_not_routing(tmp_path: Path) -> None:
    root = tmp_path / "stats"
    root.mkdir()
    records = {"0_3": torch.zeros(E, dtype=torch.int64), "1_3": torch.arange(E)}
    safetensors_torch.save_file(records, str(root / "rank0.safetensors"))
    result = routelog.analyze([str(root)], num_experts=E)
    assert result.metrics["step"].to_list() == [1]
    assert "1 all-zero counts (no tokens routed) left out" in result.runs[0].files[0].warnings
