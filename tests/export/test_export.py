"""``routelog export``: TensorBoard event files and W&B offline runs, read back and compared."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from routelog import api
from routelog.cli import app
from routelog.export import scalars, tag
from tests.conftest import REPO, SAMPLES

runner = CliRunner()
RUN = str(SAMPLES / "collapse")
METRIC_NAMES = ["token_entropy_norm", "load_entropy_norm", "max_vio", "dead_experts", "aux_loss"]


def _metrics() -> pl.DataFrame:
    return api.analyze([RUN], top_k=2).metrics


def _export(*args: str) -> str:
    result = runner.invoke(app, ["export", RUN, "-k", "2", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _expected(metrics: pl.DataFrame, layer: int, metric: str) -> list[tuple[int, float]]:
    block = metrics.filter(pl.col("layer") == layer).sort("step")
    return [(s, v) for s, v in zip(block["step"], block[metric], strict=True) if v is not None]


def test_scalars_cover_every_metric_and_skip_nulls() -> None:
    metrics = _metrics()
    todo = scalars(metrics)
    assert todo.steps == sorted(set(metrics["step"].to_list()))
    first = todo.values[0]
    for metric in METRIC_NAMES:
        assert tag(0, metric) in first
    assert tag(0, "n_experts") not in first
    assert all(np.isfinite(list(row.values())).all() for row in todo.values)
    counts_only = scalars(api.analyze([str(SAMPLES / "megatron-tpe")]).metrics)
    assert tag(0, "max_vio") in counts_only.values[0]
    assert tag(0, "token_entropy") not in counts_only.values[0]  # null: no probabilities
    assert scalars(metrics, after=1000).steps == [1100]


# --- TensorBoard -----------------------------------------------------------------------------


def _accumulator(directory: Path) -> object:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(directory), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def test_export_says_what_reading_left_out(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    for file in Path(RUN).glob("*.parquet"):
        (run / file.name).symlink_to(file)
    (run / "notes.txt").write_text("not a log\n")
    target = tmp_path / "tb"
    result = runner.invoke(app, ["export", str(run), "--tensorboard", str(target)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        "run: k=1 (assumed: the logs do not say; pass --top-k)",
        "run: 1 file in the run directory is not a log (ignored)",
    ]


def test_tensorboard_values_read_back_with_tensorboards_reader(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = _export("--tensorboard", str(tmp_path / "tb"))
    assert "12 new steps (steps 0–1100)" in out
    acc = _accumulator(tmp_path / "tb")
    metrics = _metrics()
    tags = acc.Tags()["scalars"]  # type: ignore[attr-defined]
    assert "routing/layer_03/token_entropy_norm" in tags
    assert set(tags) == set().union(*(row.keys() for row in scalars(metrics).values))
    for layer in range(4):
        for metric in METRIC_NAMES:
            events = acc.Scalars(tag(layer, metric))  # type: ignore[attr-defined]
            expected = _expected(metrics, layer, metric)
            assert [e.step for e in events] == [s for s, _ in expected]
            np.testing.assert_allclose(
                [e.value for e in events], [v for _, v in expected], rtol=1e-6, atol=1e-7
            )
    (text,) = acc.Tensors("routing/findings")  # type: ignore[attr-defined]
    assert text.step == 1100
    body = text.tensor_proto.string_val[0].decode()
    assert "`collapse` layer 2" in body


def test_tensorboard_export_is_incremental(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    target = tmp_path / "tb"
    assert "6 new steps (steps 0–500)" in _export("--tensorboard", str(target), "--steps", ":500")
    assert "6 new steps (steps 600–1100)" in _export("--tensorboard", str(target))
    assert "up to date, no new step" in _export("--tensorboard", str(target))
    assert len(list(target.glob("events.out.tfevents.*"))) == 2
    state = json.loads((target / "routelog-export.json").read_text())
    assert state["runs"] == {"collapse": 1100}
    events = _accumulator(target).Scalars("routing/layer_02/max_vio")  # type: ignore[attr-defined]
    assert [e.step for e in events] == list(range(0, 1200, 100))  # each step once


def test_tensorboard_bad_state_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    target = tmp_path / "tb"
    target.mkdir()
    (target / "routelog-export.json").write_text('{"runs": {"collapse": "soon"}}')
    result = runner.invoke(app, ["export", RUN, "--tensorboard", str(target)])
    assert result.exit_code == 2
    assert f"{target / 'routelog-export.json'}: key 'runs' must map run names" in result.output


# --- W&B -------------------------------------------------------------------------------------


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("wandb")
    directory = tmp_path / "wandb-dir"
    directory.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    return directory


def _next_second() -> None:
    """Wait for the clock's next second: W&B names an offline run's directory by the second
    it starts, so two exports within one second would write into one directory."""
    time.sleep(1 - time.time() % 1 + 0.01)


def test_wandb_offline_logs_every_metric_and_resumes(wandb_offline: Path) -> None:
    from tests.export.wandb_records import history, summary

    assert "6 new steps" in _export("--wandb", "moe-lab/run42", "--steps", ":500")
    _next_second()
    assert "6 new steps (steps 600–1100)" in _export("--wandb", "moe-lab/run42")
    assert "up to date" in _export("--wandb", "moe-lab/run42")
    files = sorted(wandb_offline.glob("wandb/offline-run-*-run42/run-run42.wandb"))
    assert len(files) == 2  # one offline run per export with new steps
    rows = [row for f in files for row in history(f)]
    assert [row["routelog/step"] for row in rows] == list(range(0, 1200, 100))
    metrics = _metrics()
    for layer in range(4):
        for metric in METRIC_NAMES:
            expected = _expected(metrics, layer, metric)
            got = [
                (r["routelog/step"], r[tag(layer, metric)]) for r in rows if tag(layer, metric) in r
            ]
            assert [s for s, _ in got] == [s for s, _ in expected]
            np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-12)
    last = summary(files[1])
    assert last["routing/last_exported_step"] == 1100
    assert "`collapse` layer 2" in last["routing/findings"]


def test_wandb_bad_target() -> None:
    result = runner.invoke(app, ["export", RUN, "--wandb", "a/b/c"])
    assert result.exit_code == 2
    assert "expected PROJECT or PROJECT/RUN_ID" in result.output


def test_export_needs_a_destination() -> None:
    result = runner.invoke(app, ["export", RUN])
    assert result.exit_code == 2
    assert "give --tensorboard DIR and/or --wandb PROJECT" in result.output


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("tensorboard", ["--tensorboard", "tb"], "tensorboard"),
        ("wandb", ["--wandb", "p/r"], "wandb"),
    ],
)
def test_missing_extra_is_one_line(
    tmp_path: Path, module: str, args: list[str], extra: str
) -> None:
    probe = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        f"sys.argv = ['routelog', 'export', {RUN!r}, *{args!r}]\n"
        "from routelog.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"routelog: error: routelog export --{extra} needs the {extra} extra "
        f"({module} is not installed): pip install 'routelog[{extra}]'"
    )


OPTIONAL = ("matplotlib", "tensorboard", "wandb")
OURS = ("routelog.render.html", "routelog.render.figures", "routelog.export", "routelog.experts")


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["--help"], OPTIONAL + OURS),
        (["export", "--help"], OPTIONAL + OURS),
        (["plot", "--help"], OPTIONAL + OURS),
        (["analyze", RUN, "-k", "2", "-f", "json"], OPTIONAL + OURS[:3]),
        (["analyze", RUN, "-k", "2"], OPTIONAL + OURS[:3]),
    ],
)
def test_optional_worlds_stay_out_of_the_import_path(
    argv: list[str], absent: tuple[str, ...]
) -> None:
    probe = (
        "import sys\n"
        f"sys.argv = ['routelog', *{argv!r}]\n"
        "from routelog.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {absent!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
