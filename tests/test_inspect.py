"""routelog inspect: what ingestion detected, per file, without metrics."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from routelog.cli import app
from tests.conftest import SAMPLES

runner = CliRunner()


def write(path: Path, lines: list[dict[str, object]] | list[dict[str, object] | str]) -> Path:
    text = (line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text("".join(line + "\n" for line in text))
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    write(
        root / "a_tokens.jsonl",
        [
            {"step": 3, "layer": 0, "probs": [0.5, 0.5], "mask": False},
            {"step": 3, "layer": 1, "probs": [1, 0]},
        ],
    )
    write(
        root / "b_batched.jsonl",
        [{"step": s, "layer": 0, "logits": [[1, 2, 3]] * 4} for s in (1, 2, 5)],
    )
    write(
        root / "c_tpe.jsonl",
        [{"iter": 9, "layer": layer, "tpe": [[1, 2], [3, 4]]} for layer in range(4)],
    )
    write(
        root / "d_ids.jsonl",
        [{"step": 1, "layer": 0, "topk_ids": [2, 0], "num_experts": 8}, "oops"],
    )
    pl.DataFrame(
        {"step": [7, 7], "layer": [0, 0], "expert": [0, 1], "count": [3, 4]}
    ).write_parquet(root / "e_long.parquet")
    pl.DataFrame({"step": [7], "layer": [2], "p_0": [0.25], "p_1": [0.75]}).write_parquet(
        root / "f_wide.parquet"
    )
    return root


def test_inspect_json_describes_each_layout(mixed: Path) -> None:
    result = runner.invoke(app, ["inspect", str(mixed), "--skip-bad-rows", "-f", "json"])
    assert result.exit_code == 0, result.output
    files = {Path(f["path"]).name: f for f in json.loads(result.output)["files"]}
    expected = {
        "a_tokens.jsonl": ("jsonl", "per-token rows", "probabilities", 2, None, 2, 1, 0),
        "b_batched.jsonl": ("jsonl", "batched lines", "logits", 3, None, 12, 0, 0),
        "c_tpe.jsonl": ("jsonl", "tokens-per-expert counts", "counts", 2, None, 4, 0, 0),
        "d_ids.jsonl": ("jsonl", "top-k ids", "top-k ids", 8, 2, 1, 0, 1),
        "e_long.parquet": ("parquet", "expert/count rows", "counts", 2, None, 2, 0, 0),
        "f_wide.parquet": ("parquet", "wide columns", "probabilities", 2, None, 1, 0, 0),
    }
    keys = [
        "format",
        "layout",
        "payload",
        "n_experts",
        "top_k",
        "rows",
        "masked_rows",
        "skipped_rows",
    ]
    assert {name: tuple(f[k] for k in keys) for name, f in files.items()} == expected
    assert files["b_batched.jsonl"]["steps"] == {"first": 1, "last": 5, "count": 3}
    assert files["c_tpe.jsonl"]["layers"] == [0, 1, 2, 3]


def test_inspect_table(mixed: Path) -> None:
    result = runner.invoke(app, ["inspect", str(mixed), "--skip-bad-rows"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["file", "format", "layout", "payload"]
    assert any(line.startswith("c_tpe.jsonl") and "tokens-per-expert" in line for line in lines)
    assert any(line.startswith("b_batched.jsonl") and "1–5 (3)" in line for line in lines)
    # the test runs in mixed's parent: the common directory is shown relative to it
    assert "files under run\n" in result.output


def test_inspect_sample_run() -> None:
    result = runner.invoke(app, ["inspect", str(SAMPLES / "drift"), "-f", "json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.output)["files"]
    assert len(files) == 12
    assert {(f["layout"], f["payload"], f["n_experts"], f["rows"]) for f in files} == {
        ("per-token rows", "probabilities", 8, 2048)
    }


def test_inspect_refuses_other_formats() -> None:
    result = runner.invoke(app, ["inspect", str(SAMPLES / "drift"), "-f", "csv"])
    assert result.exit_code == 2, result.output
    assert "'csv' is not one of" in result.output  # the choices are click's: table, json


def test_inspect_bad_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "step_1.jsonl", [{"layer": 0, "probs": [0.5, 0.5]}])
    path.write_text(path.read_text() + "{broken\n")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}:2: not valid JSON" in result.output


@pytest.mark.parametrize("command", ["inspect", "analyze"])
def test_a_k_above_e_is_the_same_error_as_in_analysis(command: str) -> None:
    log = SAMPLES / "drift" / "step_000000.parquet"
    extra = ["--no-cache"] if command == "analyze" else []
    result = runner.invoke(app, [command, str(log), "--top-k", "9", *extra])
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith(
        f"--top-k 9 is larger than E=8, the experts of layer 0 in {log}: a token cannot be "
        "routed to more experts than the layer has"
    )
    assert runner.invoke(app, ["inspect", str(log), "--top-k", "8"]).exit_code == 0


@pytest.mark.parametrize("command", ["inspect", "analyze"])
def test_a_num_experts_the_data_contradicts_is_refused(command: str) -> None:
    log = SAMPLES / "drift" / "step_000000.parquet"
    result = runner.invoke(app, [command, str(log), "--num-experts", "4"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith(
        f"--num-experts 4 disagrees with the data: layer 0 in {log} has E=8"
    )
