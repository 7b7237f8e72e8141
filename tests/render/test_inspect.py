"""``inspect`` shows what ``routelog.record`` wrote in its files' metadata (issue 11):
the payload (logits or probabilities), the score function, per layer the router module and
class (the source model), E, k and the tokens not recorded beyond ``max_tokens``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from routelog.record import Recorder  # noqa: E402
from tests.record.test_models import _model  # noqa: E402

runner = CliRunner()
TOKENS = 2 * 12  # a batch of two sequences of twelve tokens
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of a tiny Mixtral (4 experts, top-2, two layers), 20 of 24 tokens kept."""
    model = _model("mixtral")
    run = tmp_path_factory.mktemp("inspect") / "run"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with Recorder(model, run, every=1, max_tokens=MAX_TOKENS) as rec:
        for step in (0, 1):
            rec.step(step)
            with torch.no_grad():
                model(input_ids=ids)
    return run


def test_inspect_json_carries_the_recorder_metadata(recorded: Path) -> None:
    result = runner.invoke(app, ["inspect", str(recorded), "-f", "json"])
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert len(files) == 2
    for entry in files:
        meta = entry["recorded"]
        assert meta["payload"] == "logits"
        assert meta["score"] == "softmax"
        assert set(meta["layers"]) == {"0", "1"}
        for layer in meta["layers"].values():
            assert layer["class"] == "MixtralTopKRouter" or "Mixtral" in layer["class"]
            assert layer["num_experts"] == entry["n_experts"]
            assert layer["top_k"] == entry["top_k"] == 2
            assert layer["tokens_not_recorded"] == TOKENS - MAX_TOKENS


def test_inspect_table_shows_the_recorder_metadata(recorded: Path) -> None:
    result = runner.invoke(app, ["inspect", str(recorded), "--color", "never"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    head = lines.index("recorded by routelog.record: 2 files, logits (score softmax), one rank")
    header = lines[head + 1].split()
    assert header[:5] == ["layer", "router", "class", "E", "k"]
    rows = {line.split()[0]: line.split() for line in lines[head + 2 : head + 4]}
    assert set(rows) == {"0", "1"}
    for layer, row in rows.items():
        assert row[1] == f"model.layers.{layer}.mlp.gate"
        assert "Mixtral" in row[2]
        # E, k, and the tokens not recorded summed over the two steps
        assert row[-3:] == [str(_experts(recorded)), "2", str(2 * (TOKENS - MAX_TOKENS))]


def _experts(run: Path) -> int:
    document = json.loads(runner.invoke(app, ["inspect", str(run), "-f", "json"]).stdout)
    return int(document["files"][0]["n_experts"])


def test_files_without_metadata_show_no_recorder_section() -> None:
    from tests.conftest import SAMPLES

    result = runner.invoke(app, ["inspect", str(SAMPLES / "collapse")])
    assert result.exit_code == 0, result.stderr
    assert "recorded by" not in result.stdout
    document = json.loads(
        runner.invoke(app, ["inspect", str(SAMPLES / "collapse"), "-f", "json"]).stdout
    )
    assert all(entry["recorded"] is None for entry in document["files"])
