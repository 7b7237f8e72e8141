"""The same routing data written in every format gives the same metrics (issue 3's done-when).

One set of router logits is written as .pt (with real torch), per-token JSONL, batched JSONL,
Parquet with list columns and Parquet with wide columns; the metrics must agree. Counts and
top-k ids of the same routing give the same count-based metrics.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import routelog
from routelog.cli import app

E, K, T, LAYERS, STEPS = 8, 2, 64, 3, (0, 50, 100)
COUNT_METRICS = ["assign_entropy", "assign_entropy_norm", "max_load_share", "max_vio", "load_cv"]
COUNT_METRICS += ["dead_experts"]

runner = CliRunner()


@pytest.fixture(scope="module")
def logits() -> dict[int, np.ndarray]:
    """step -> [L, T, E] float32 router logits."""
    rng = np.random.default_rng(11)
    return {s: (rng.normal(size=(LAYERS, T, E)) * (1 + s / 50)).astype(np.float32) for s in STEPS}


def _metrics(path: Path) -> pl.DataFrame:
    return routelog.analyze([f"run={path}"], top_k=K).metrics.sort("step", "layer")


def _write_pt(root: Path, logits: dict[int, np.ndarray]) -> Path:
    torch = pytest.importorskip("torch")
    root.mkdir()
    for step, block in logits.items():
        tensors = tuple(torch.from_numpy(block[layer].copy()) for layer in range(LAYERS))
        torch.save({"step": step, "router_logits": tensors}, root / f"step_{step:06d}.pt")
    return root


def _token_rows(logits: dict[int, np.ndarray]) -> list[dict[str, object]]:
    return [
        {"step": s, "layer": layer, "token": t, "logits": block[layer, t].tolist()}
        for s, block in logits.items()
        for layer in range(LAYERS)
        for t in range(T)
    ]


def _write_jsonl(path: Path, lines: list[dict[str, object]], *, compress: bool = False) -> Path:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_every_format_gives_the_same_metrics(tmp_path: Path, logits: dict[int, np.ndarray]) -> None:
    reference = _metrics(_write_pt(tmp_path / "pt", logits))
    rows = _token_rows(logits)
    per_token = _write_jsonl(tmp_path / "tokens.jsonl", rows)
    per_token_gz = _write_jsonl(tmp_path / "tokens.jsonl.gz", rows, compress=True)
    batched = _write_jsonl(
        tmp_path / "batched.ndjson",
        [
            {"step": s, "layer": layer, "logits": block[layer].tolist()}
            for s, block in logits.items()
            for layer in range(LAYERS)
        ],
    )
    frame = pl.DataFrame(rows).with_columns(pl.col("logits").cast(pl.List(pl.Float32)))
    listed = tmp_path / "list.parquet"
    frame.write_parquet(listed)
    wide = tmp_path / "wide.parquet"
    matrix = np.stack(frame["logits"].to_list())
    frame.drop("logits").with_columns(
        [pl.Series(f"logit_{i}", matrix[:, i]) for i in range(E)]
    ).write_parquet(wide)
    for path in (per_token, per_token_gz, batched, listed, wide):
        try:
            assert_frame_equal(_metrics(path), reference, check_exact=False, rel_tol=1e-5)
        except AssertionError as exc:
            raise AssertionError(f"{path.name} differs from the .pt run: {exc}") from exc


def test_counts_and_ids_give_the_count_metrics(
    tmp_path: Path, logits: dict[int, np.ndarray]
) -> None:
    reference = _metrics(_write_pt(tmp_path / "pt", logits)).select("step", "layer", *COUNT_METRICS)
    ids_rows, count_rows = [], []
    for s, block in logits.items():
        for layer in range(LAYERS):
            ids = np.argsort(-block[layer], axis=1, kind="stable")[:, :K]  # independent top-k
            counts = np.bincount(ids.ravel(), minlength=E)
            count_rows.append({"iter": s, "layer": layer, "tokens_per_expert": counts.tolist()})
            ids_rows += [
                {"step": s, "layer": layer, "topk_ids": row.tolist(), "num_experts": E}
                for row in ids
            ]
    for path in (
        _write_jsonl(tmp_path / "tpe.jsonl", count_rows),
        _write_jsonl(tmp_path / "ids.jsonl", ids_rows),
    ):
        got = routelog.analyze([path]).metrics.sort("step", "layer")
        assert_frame_equal(
            got.select("step", "layer", *COUNT_METRICS), reference, check_exact=False, rel_tol=1e-9
        )


def test_a_named_pipe_is_never_opened(tmp_path: Path) -> None:
    """A FIFO named like a log would block a reader for ever: given, it is an error; in a
    run directory, it is left out and noted."""
    from routelog.ingest import discover

    run = tmp_path / "run"
    run.mkdir()
    pl.DataFrame({"layer": [0], "probs": [[0.5, 0.5]]}).write_parquet(run / "step_1.parquet")
    os.mkfifo(run / "step_2.jsonl")
    found = discover(run)
    assert [p.name for p in found.files] == ["step_1.parquet"]
    assert [p.name for p in found.ignored] == ["step_2.jsonl"]
    assert found.notes == ["step_2.jsonl: a named pipe (not read)"]
    result = runner.invoke(app, ["analyze", str(run / "step_2.jsonl")])
    assert result.exit_code == 2
    assert result.output == (
        f"routelog: error: {run / 'step_2.jsonl'}: a named pipe, not a log file or a directory\n"
    )


def test_directory_links_are_followed_once_and_dangling_links_noted(tmp_path: Path) -> None:
    from routelog.ingest import discover

    frame = pl.DataFrame({"layer": [0, 0], "probs": [[0.5, 0.5], [0.9, 0.1]]})
    real = tmp_path / "elsewhere"
    real.mkdir()
    frame.write_parquet(real / "step_2.parquet")
    run = tmp_path / "run"
    run.mkdir()
    frame.write_parquet(run / "step_1.parquet")
    (run / "linked").symlink_to(real, target_is_directory=True)
    (run / "again").symlink_to(real, target_is_directory=True)
    (run / "loop").symlink_to(run, target_is_directory=True)
    (run / "step_3.parquet").symlink_to(tmp_path / "gone.parquet")
    found = discover(run)
    assert sorted(p.name for p in found.files) == ["step_1.parquet", "step_2.parquet"]
    assert (run / "again" / "step_2.parquet") in found.files  # the first link in name order
    assert [p.name for p in found.ignored] == ["step_3.parquet"]
    assert any("step_3.parquet: a link to a missing file" in note for note in found.notes)
    assert sum("read already" in note for note in found.notes) == 2
    result = routelog.analyze([run], top_k=1)
    assert sorted(result.metrics["step"].to_list()) == [1, 2]
    assert any("missing file" in w for w in result.runs[0].summary()["warnings"])
