"""Megatron-LM router traces: router_trace_rank{r}.jsonl, logits_rank{r}.bin, router state.

The fixtures are written the way ``megatron/core/transformer/moe/router_trace.py`` writes
them: one JSON record per (step, block, layer) and rank, bfloat16 logits appended to the
sidecar with real torch (``logits.to(torch.bfloat16).view(torch.int16).numpy().tobytes()``),
the router weights saved with ``torch.save``. Metrics are checked against numpy and scipy on
the logits torch decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import entropy
from typer.testing import CliRunner

import routelog
from routelog.cli import app
from routelog.errors import InputError
from routelog.options import MAX_EXPERTS

torch = pytest.importorskip("torch")
runner = CliRunner()

E, K, T, LAYERS, STEPS, RANKS = 8, 2, 48, (0, 1, 2), (0, 1, 2), (0, 1)


def write_trace(
    root: Path,
    *,
    logits: bool = True,
    mtp: bool = True,
    router_state: bool = False,
    seed: int = 3,
) -> dict[tuple[int, int], np.ndarray]:
    """Write a trace of every rank; returns {(step, layer): float32 logits of all ranks}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    kept: dict[tuple[int, int], list[np.ndarray]] = {}
    for rank in RANKS:
        lines = []
        offset = 0
        sidecar = bytearray()
        for step in STEPS:
            blocks = [("decoder", None, layer) for layer in LAYERS]
            if mtp:
                blocks.append(("mtp", 0, 1))
            for block, mtp_idx, layer in blocks:
                scale = 1.0 + 2.0 * step * (layer == 2)
                raw = torch.from_numpy(rng.normal(size=(T, E)).astype(np.float32) * scale)
                top = torch.topk(raw, K, dim=-1).indices.to(torch.int32)
                record: dict[str, object] = {
                    "step": step,
                    "stage": "pre_dispatch",
                    "block": block,
                    "layer": layer,
                    "rank": rank,
                    "num_tokens": T,
                    "topk": K,
                }
                if mtp_idx is not None:
                    record["mtp_idx"] = mtp_idx
                if logits:
                    data = raw.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
                    sidecar += data
                    record |= {"logit_offset": offset, "logit_bytes": len(data)}
                    record["logit_shape"] = [T, E]
                    offset += len(data)
                record["top_indices"] = top.tolist()
                lines.append(json.dumps(record))
                if block == "decoder":
                    decoded = raw.to(torch.bfloat16).float().numpy() if logits else raw.numpy()
                    kept.setdefault((step, layer), []).append(decoded)
        (root / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
        if logits:
            (root / f"logits_rank{rank}.bin").write_bytes(bytes(sidecar))
        (root / f"hidden_states_rank{rank}.bin").write_bytes(b"\0" * 64)
        if router_state:
            state = {
                layer: {
                    "weight": torch.zeros(E, 16),
                    "expert_bias": None,
                    "score_function": "softmax",
                    "topk": K,
                }
                for layer in LAYERS
            }
            torch.save(state, root / f"router_state_rank{rank}.pt")
    return {key: np.concatenate(parts) for key, parts in kept.items()}


def _recorded_counts(trace: Path, step: int, layer: int) -> np.ndarray:
    """Tokens per expert from the records' own top_indices (what the router selected)."""
    ids = [
        record["top_indices"]
        for path in sorted(trace.glob("router_trace_rank*.jsonl"))
        for record in map(json.loads, path.read_text().splitlines())
        if (record["step"], record["layer"]) == (step, layer) and record.get("block") != "mtp"
    ]
    return np.bincount(np.asarray(ids).ravel(), minlength=E)


def test_trace_with_logits_matches_numpy_and_scipy(tmp_path: Path) -> None:
    logits = write_trace(tmp_path / "trace")
    result = routelog.analyze([str(tmp_path / "trace")])
    metrics = result.metrics.sort("step", "layer")
    assert sorted(set(metrics["layer"].to_list())) == list(LAYERS)  # mtp left out
    for row in metrics.iter_rows(named=True):
        matrix = logits[(row["step"], row["layer"])].astype(np.float64)
        probs = softmax(matrix, axis=1)
        counts = _recorded_counts(tmp_path / "trace", row["step"], row["layer"])
        assert row["n_tokens"] == T * len(RANKS)
        assert row["top_k"] == K
        assert row["token_entropy"] == pytest.approx(entropy(probs, axis=1).mean(), rel=1e-4)
        assert row["load_entropy"] == pytest.approx(entropy(probs.mean(axis=0)), rel=1e-4)
        assert row["assign_entropy"] == pytest.approx(entropy(counts / counts.sum()), rel=1e-5)
        assert row["max_load_share"] == pytest.approx(counts.max() / counts.sum())
        lse = np.log(np.exp(matrix).sum(axis=1))
        assert row["z_loss"] == pytest.approx((lse**2).mean(), rel=1e-4)
    run = result.runs[0]
    assert run.files[0].format == "megatron"
    assert run.files[0].layout == "router trace"
    assert any("3 multi-token-prediction" in w for w in run.files[0].warnings)
    names = sorted(Path(p).name for p in run.sidecar_files)
    assert names == [*(f"hidden_states_rank{r}.bin" for r in RANKS)] + [
        f"logits_rank{r}.bin" for r in RANKS
    ]
    assert run.ignored_files == []


def test_trace_without_logits_gives_count_metrics(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace", logits=False, router_state=True)
    result = routelog.analyze([str(tmp_path / "trace")])
    metrics = result.metrics.sort("step", "layer")
    assert metrics["n_experts"].to_list() == [E] * metrics.height
    for row in metrics.iter_rows(named=True):
        counts = _recorded_counts(tmp_path / "trace", row["step"], row["layer"])
        assert row["load_share"] == pytest.approx((counts / counts.sum()).tolist())
        assert row["assign_entropy"] == pytest.approx(entropy(counts / counts.sum()), rel=1e-6)
        assert row["token_entropy"] is None
    assert result.runs[0].files[0].payload == "top-k ids"
    names = {Path(p).name for p in result.runs[0].sidecar_files}
    assert {f"router_state_rank{r}.pt" for r in RANKS} <= names  # never read as logs


def test_expert_count_from_config_or_option(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace", logits=False)
    with pytest.raises(InputError, match="--num-experts E"):
        routelog.analyze([str(tmp_path / "trace")])
    assert routelog.analyze([str(tmp_path / "trace")], num_experts=E).metrics.height == 9
    (tmp_path / "trace" / "config.json").write_text(json.dumps({"num_local_experts": E}))
    assert routelog.analyze([str(tmp_path / "trace")]).metrics["n_experts"].max() == E


@pytest.mark.parametrize("experts", [0, MAX_EXPERTS + 1, 10**12])
def test_an_expert_count_routelog_cannot_handle_is_refused(experts: int, tmp_path: Path) -> None:
    """E from the trace is held to the bound --num-experts is held to."""
    write_trace(tmp_path / "trace", mtp=False)
    trace = tmp_path / "trace" / "router_trace_rank0.jsonl"
    _rewrite(trace, 1, {"logit_shape": [T, experts]})
    expected = f"{trace}: 'logit_shape' gives E={experts}, outside the 1 to {MAX_EXPERTS} experts"
    assert expected in _bad(tmp_path / "trace")


def test_an_expert_count_from_config_json_is_bounded_too(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace", logits=False)
    config = tmp_path / "trace" / "config.json"
    config.write_text(json.dumps({"num_local_experts": MAX_EXPERTS + 1}))
    expected = f"{config}: {MAX_EXPERTS + 1} experts, beyond the {MAX_EXPERTS} experts"
    assert expected in _bad(tmp_path / "trace")


def _bad(path: Path, *args: str) -> str:
    result = runner.invoke(app, ["analyze", str(path), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def _rewrite(path: Path, line: int, change: dict[str, object]) -> None:
    lines = path.read_text().splitlines()
    record = json.loads(lines[line - 1]) | change
    lines[line - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def test_wrong_k_in_a_record_is_an_error_naming_the_line(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace")
    trace = tmp_path / "trace" / "router_trace_rank1.jsonl"
    _rewrite(trace, 3, {"top_indices": [[1, 2, 3]] * T})
    output = _bad(tmp_path / "trace")
    assert f"{trace}:3: a 'top_indices' row does not hold 'topk' expert ids" in output
    result = routelog.analyze([str(tmp_path / "trace")], skip_bad_rows=True)
    assert result.runs[0].summary()["skipped_rows"] == 1
    layer2 = result.metrics.filter((result.metrics["step"] == 0) & (result.metrics["layer"] == 2))
    assert layer2["n_tokens"].to_list() == [T]  # rank 0's tokens only


def test_sidecar_shorter_than_its_offsets(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace", mtp=False)
    sidecar = tmp_path / "trace" / "logits_rank0.bin"
    data = sidecar.read_bytes()
    sidecar.write_bytes(data[: len(data) - 10])
    output = _bad(tmp_path / "trace")
    trace = tmp_path / "trace" / "router_trace_rank0.jsonl"
    assert f"{trace}:9: its logits reach past the end of logits_rank0.bin" in output
    result = routelog.analyze([str(tmp_path / "trace")], skip_bad_rows=True)
    assert result.runs[0].summary()["skipped_rows"] == 1


def test_other_bad_records(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace", logits=False)
    trace = tmp_path / "trace" / "router_trace_rank0.jsonl"
    lines = trace.read_text().splitlines()
    lines[1] = lines[1][:40]
    trace.write_text("\n".join(lines) + "\n")
    assert f"{trace}:2: not valid JSON" in _bad(tmp_path / "trace", "--num-experts", "8")
    write_trace(tmp_path / "t2", logits=False)
    trace = tmp_path / "t2" / "router_trace_rank0.jsonl"
    _rewrite(trace, 1, {"top_indices": [[0, 8]] + [[0, 1]] * (T - 1)})
    assert f"{trace}:1: an expert id outside [0, 8)" in _bad(trace, "--num-experts", "8")
    _rewrite(trace, 1, {"top_indices": [[3, 3]] * T})
    assert f"{trace}:1: an expert id repeated" in _bad(trace, "--num-experts", "8")
    _rewrite(trace, 1, {"top_indices": [[3, None]] + [[0, 1]] * (T - 1)})
    output = _bad(trace, "--num-experts", "8")  # one line, no numpy warning
    assert output == f"routelog: error: {trace}:1: a null expert id in 'top_indices' " + (
        "(use --skip-bad-rows to drop such records)\n"
    )
    _rewrite(trace, 1, {"top_indices": [[3, 4]] * T, "num_tokens": 5})
    assert f"{trace}:1: 'num_tokens' differs" in _bad(trace, "--num-experts", "8")
    _rewrite(trace, 1, {"num_tokens": T, "layer": "x"})
    assert f"{trace}:1: 'layer' must be an integer" in _bad(trace, "--num-experts", "8")


def test_missing_logits_sidecar(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace")
    (tmp_path / "trace" / "logits_rank1.bin").unlink()
    assert "logits_rank1.bin is not beside it" in _bad(tmp_path / "trace")


def test_inspect_names_the_layout(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace")
    result = runner.invoke(app, ["inspect", str(tmp_path / "trace")])
    assert result.exit_code == 0, result.output
    assert "megatron" in result.output
    assert "router trace" in result.output


def test_cache_notices_a_changed_sidecar(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace", logits=False)
    (tmp_path / "trace" / "config.json").write_text(json.dumps({"num_local_experts": E}))
    first = runner.invoke(app, ["analyze", str(tmp_path / "trace"), "-f", "json"])
    assert first.exit_code == 0, first.output
    (tmp_path / "trace" / "config.json").write_text(json.dumps({"num_local_experts": 16}))
    second = runner.invoke(app, ["analyze", str(tmp_path / "trace"), "-f", "json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.output)["metrics"][0]["n_experts"] == 16


def test_selection_that_is_not_the_top_k_of_the_logits_is_counted_and_measured(
    tmp_path: Path,
) -> None:
    """With logits, counts follow the recorded top_indices (the experts the router really
    chose), and selection_mismatch measures how often they are not the logits' top-k."""
    logits = write_trace(tmp_path / "trace", mtp=False)
    lowest = np.argsort(logits[(0, 0)][:T], axis=1, kind="stable")[:, :K]
    _rewrite(tmp_path / "trace" / "router_trace_rank0.jsonl", 1, {"top_indices": lowest.tolist()})
    result = routelog.analyze([str(tmp_path / "trace")])
    rows = result.metrics.sort("step", "layer").iter_rows(named=True)
    mismatched = [round(r["selection_mismatch"] * r["n_tokens"]) for r in rows]
    assert sum(mismatched) == T  # exactly the rewritten record's tokens
    assert sum(m > 0 for m in mismatched) == 1
    first = result.metrics.sort("step", "layer").row(0, named=True)
    chosen = np.bincount(lowest.ravel(), minlength=E)
    assert all(share > 0 for share, c in zip(first["load_share"], chosen, strict=True) if c)


def test_a_sidecar_is_not_a_log(tmp_path: Path) -> None:
    write_trace(tmp_path / "trace")
    output = _bad(tmp_path / "trace" / "logits_rank0.bin")
    assert "logits_rank0.bin: a sidecar file, read together with the routing log" in output
    trace = tmp_path / "trace" / "router_trace_rank0.jsonl"
    output = _bad(trace, "--num-experts", "16")
    assert f"{trace}:1: 'logit_shape' does not have E=16 columns (--num-experts)" in output


@pytest.mark.parametrize(
    ("written", "key"), [('"layer" : 9', "layer"), ('"l\\u0061yer": 9', "layer")]
)
def test_repeated_key_in_a_trace_record_is_refused(tmp_path: Path, written: str, key: str) -> None:
    """The JSONL rule for repeated keys holds for traces too (polars would keep one value)."""
    write_trace(tmp_path / "trace", logits=False)
    trace = tmp_path / "trace" / "router_trace_rank0.jsonl"
    lines = trace.read_text().splitlines()
    lines[1] = lines[1][:-1] + f", {written}}}"
    trace.write_text("\n".join(lines) + "\n")
    output = _bad(trace, "--num-experts", "8")
    assert f"{trace}:2: not valid JSON (key {key!r} appears twice)" in " ".join(output.split())
