"""Parquet input: layouts, step discovery, validation and every bad input of the core issue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import routelog
from routelog.cli import app
from routelog.errors import InputError, UsageError
from tests.conftest import WriteRun, dirichlet

runner = CliRunner()


def _analyze_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["analyze", *args, "--format", "json"])
    return result.exit_code, result.output


def _one_file(tmp_path: Path, name: str = "step_000100.parquet", **columns: object) -> Path:
    path = tmp_path / name
    pl.DataFrame(columns).write_parquet(path)
    return path


def test_logits_become_softmax_probabilities(tmp_path: Path) -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    path = _one_file(tmp_path, layer=[0, 0], logits=logits)
    metrics = routelog.analyze([path]).metrics.row(0, named=True)
    e = np.exp(logits[0] - 3)
    p0 = e / e.sum()
    expected_h = (-(p0 * np.log(p0)).sum() + 0.0) / 2  # the second row is one-hot: H = 0
    assert metrics["token_entropy"] == pytest.approx(expected_h, rel=1e-5)
    lse = np.log(np.exp(logits[0].astype(np.float64)).sum())
    assert metrics["z_loss"] == pytest.approx((lse**2 + 1000.0**2) / 2, rel=1e-5)
    assert metrics["step"] == 100


def test_scaled_logits_are_held_to_the_logit_bound(tmp_path: Path) -> None:
    logits = np.array([[1e60, 0.0, -1.0], [1.0, 2.0, 3.0]], dtype=np.float64)
    path = _one_file(tmp_path, layer=[0, 0], logits=logits)
    assert routelog.analyze([path], temperature=1e-80).metrics["z_loss"][0] > 1e279  # 1e140
    with pytest.raises(InputError, match=r"row 0: logit beyond ±1e\+55 \(±1e\+150 divided"):
        routelog.analyze([path], temperature=1e-95)  # 1e155: its square overflows
    with pytest.raises(UsageError, match="at least 1e-100"):
        routelog.analyze([path], temperature=1e-310)  # 1/T is not finite


def test_fixed_size_list_and_step_column(tmp_path: Path) -> None:
    probs = pl.Series("probs", dirichlet(np.random.default_rng(0), 10, 4).astype(np.float32))
    assert isinstance(probs.dtype, pl.Array)
    path = _one_file(tmp_path, name="dump.parquet", step=[7] * 10, layer=[2] * 10, probs=probs)
    metrics = routelog.analyze([path]).metrics
    assert metrics.select("step", "layer", "n_tokens").row(0) == (7, 2, 10)


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step_000200.parquet", 200),
        ("iter-200.parquet", 200),
        ("global_step200.parquet", 200),
        ("router_iter_0042.parquet", 42),
    ],
)
def test_step_from_file_name(tmp_path: Path, name: str, step: int) -> None:
    path = _one_file(tmp_path, name=name, layer=[0], probs=[[0.5, 0.5]])
    assert routelog.analyze([path]).metrics["step"].to_list() == [step]


@pytest.mark.parametrize("directory", ["global_step300", "checkpoint-300", "checkpoint_300"])
def test_step_from_parent_directory(tmp_path: Path, directory: str) -> None:
    """DeepSpeed's global_stepN/ and the HF Trainer's checkpoint-N/ name the step."""
    (tmp_path / directory).mkdir()
    _one_file(tmp_path / directory, name="router.parquet", layer=[0], probs=[[0.5, 0.5]])
    assert routelog.analyze([tmp_path]).metrics["step"].to_list() == [300]


def test_steps_of_an_hf_trainer_output_directory(tmp_path: Path) -> None:
    for step in (500, 1000, 1500):
        (tmp_path / f"checkpoint-{step}").mkdir()
        _one_file(
            tmp_path / f"checkpoint-{step}", name="router.parquet", layer=[0], probs=[[0.5, 0.5]]
        )
    assert routelog.analyze(tmp_path).metrics["step"].to_list() == [500, 1000, 1500]


def test_mask_excludes_and_counts(tmp_path: Path) -> None:
    path = _one_file(
        tmp_path,
        layer=[0, 0, 0],
        probs=[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
        mask=[True, False, True],
    )
    code, output = _analyze_cli(str(path))
    assert code == 0, output
    document = json.loads(output)
    assert document["runs"][0]["masked_rows"] == 1
    assert document["metrics"][0]["n_tokens"] == 2


def test_run_names_and_selection(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    data = {s: {layer: dirichlet(rng, 20, 4) for layer in range(4)} for s in (0, 10, 20)}
    root = write_parquet_run(data, name="a")
    result = routelog.analyze([f"mine={root}"], layers="1-2", steps="10:")
    assert result.runs[0].name == "mine"
    assert sorted(result.metrics["layer"].unique().to_list()) == [1, 2]
    assert sorted(result.metrics["step"].unique().to_list()) == [10, 20]
    with pytest.raises(InputError, match="selected --layers/--steps"):
        routelog.analyze([root], layers="9")


def test_directory_ignores_and_counts_other_files(write_parquet_run: WriteRun) -> None:
    root = write_parquet_run({0: {0: np.full((3, 2), 0.5)}})
    (root / "README.txt").write_text("notes")
    result = routelog.analyze([root])
    assert result.runs[0].summary()["ignored_files"] == [str(root / "README.txt")]


def test_skip_bad_rows_counts_in_json(tmp_path: Path) -> None:
    path = _one_file(tmp_path, layer=[0, 0, 0], probs=[[0.5, 0.5], [float("nan"), 1.0], [0.9, 0.9]])
    code, output = _analyze_cli(str(path), "--skip-bad-rows")
    assert code == 0, output
    document = json.loads(output)
    assert document["runs"][0]["skipped_rows"] == 2
    assert document["metrics"][0]["n_tokens"] == 1


def test_the_logs_are_not_modified(write_parquet_run: WriteRun) -> None:
    root = write_parquet_run({0: {0: np.full((3, 2), 0.5)}})
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.iterdir()}
    routelog.analyze([root])
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.iterdir()} == before


# --- bad input: exit code 2, one line naming the file (and row) ----------------------------


def _bad(tmp_path: Path, *args: str) -> str:
    result = runner.invoke(app, ["analyze", *args])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("routelog: error: "), message
    assert "\n" not in message
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ([float("nan"), 1.0], "NaN or infinite probability"),
        ([float("inf"), 0.0], "NaN or infinite probability"),
        ([-0.5, 1.5], "negative probability"),
        ([0.6, 0.6], "probabilities do not sum to 1"),
    ],
)
def test_bad_probability_row(tmp_path: Path, row: list[float], problem: str) -> None:
    path = _one_file(tmp_path, layer=[0, 0, 0], probs=[[0.5, 0.5], [0.5, 0.5], row])
    message = _bad(tmp_path, str(path))
    assert f"{path} row 2: {problem}" in message


def test_non_finite_logit(tmp_path: Path) -> None:
    path = _one_file(tmp_path, layer=[0, 0], logits=[[0.0, 1.0], [float("nan"), 1.0]])
    assert f"{path} row 1: non-finite logit" in _bad(tmp_path, str(path))


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "step_1.parquet"
    path.write_bytes(b"this is not parquet at all")
    assert f"{path}: not a valid Parquet file" in _bad(tmp_path, str(path))


def test_truncated_parquet(tmp_path: Path) -> None:
    path = _one_file(tmp_path, layer=[0] * 100, probs=[[0.5, 0.5]] * 100)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert f"{path}: not a valid Parquet file" in _bad(tmp_path, str(path))


def test_empty_file_and_empty_directory(tmp_path: Path) -> None:
    empty = tmp_path / "step_1.parquet"
    empty.touch()
    assert f"{empty}: file is empty" in _bad(tmp_path, str(empty))
    folder = tmp_path / "nothing"
    folder.mkdir()
    assert f"{folder}: no routing logs found" in _bad(tmp_path, str(folder))


def test_unknown_extension_and_missing_path(tmp_path: Path) -> None:
    other = tmp_path / "router.h5"
    other.write_text("x")
    assert f"{other}: unknown file type" in _bad(tmp_path, str(other))
    assert "no such file or directory" in _bad(tmp_path, str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        ({"probs": [[0.5, 0.5]]}, "no 'layer' column"),
        ({"layer": [0]}, "no payload column"),
        ({"layer": [0], "probs": [[0.5, 0.5]], "logits": [[0.0, 0.0]]}, "ambiguous payload"),
        ({"layer": [0], "probs": ["a"]}, "must hold a list of numbers per row"),
    ],
)
def test_missing_or_wrong_columns(tmp_path: Path, columns: dict[str, object], problem: str) -> None:
    path = _one_file(tmp_path, **columns)
    message = _bad(tmp_path, str(path))
    assert str(path) in message
    assert problem in message


def test_no_step_anywhere(tmp_path: Path) -> None:
    path = _one_file(tmp_path, name="router.parquet", layer=[0], probs=[[0.5, 0.5]])
    assert f"{path}: no 'step' column, and no step in the file name" in _bad(tmp_path, str(path))


def test_expert_count_differs_within_a_layer(tmp_path: Path) -> None:
    path = _one_file(tmp_path, layer=[0, 0], probs=[[0.5, 0.5], [0.25, 0.25, 0.5]])
    message = _bad(tmp_path, str(path))
    assert f"{path} row 1: layer 0 has 3 experts in 'probs', but 2 at {path} row 0" in message


def test_expert_count_differs_across_files(tmp_path: Path) -> None:
    _one_file(tmp_path, name="step_1.parquet", layer=[0], probs=[[0.5, 0.5]])
    second = _one_file(tmp_path, name="step_2.parquet", layer=[0], probs=[[0.25, 0.25, 0.5]])
    message = _bad(tmp_path, str(tmp_path))
    assert f"{second}: layer 0 has 3 experts, but 2 in" in message


def test_layers_may_differ_in_expert_count(tmp_path: Path) -> None:
    path = _one_file(tmp_path, layer=[0, 1], probs=[[0.5, 0.5], [0.25, 0.25, 0.5]])
    metrics = routelog.analyze([path]).metrics
    assert metrics.sort("layer")["n_experts"].to_list() == [2, 3]


def test_temperature_refused_for_probabilities(tmp_path: Path) -> None:
    path = _one_file(tmp_path, layer=[0], probs=[[0.5, 0.5]])
    assert "--temperature applies to logits" in _bad(tmp_path, str(path), "--temperature", "2")


def test_temperature_scales_logits(tmp_path: Path) -> None:
    path = _one_file(tmp_path, layer=[0], logits=[[0.0, 2.0]])
    hot = routelog.analyze([path], temperature=2.0).metrics["token_entropy"][0]
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    assert hot == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)


def test_file_that_vanished_is_an_input_error(tmp_path: Path) -> None:
    """A file listed, then deleted before it is read (a run directory being cleaned)."""
    from routelog import ingest
    from routelog.options import Options

    gone = tmp_path / "step_2.parquet"
    with pytest.raises(InputError, match=r"step_2\.parquet: cannot read \(No such file"):
        list(ingest.scan(gone, Options(), ingest.FileInfo(str(gone), "parquet")))


def _row_groups(tmp_path: Path, probs: np.ndarray, layer: np.ndarray, rows: int) -> Path:
    """A Parquet file of FixedSizeList probabilities in row groups of ``rows`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, e = probs.shape
    table = pa.table(
        {
            "step": pa.array(np.zeros(n, dtype=np.int64)),
            "layer": pa.array(layer.astype(np.int32)),
            "token": pa.array(np.arange(n, dtype=np.int64)),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), e),
        }
    )
    path = tmp_path / "step_000003.parquet"
    pq.write_table(table, path, row_group_size=rows, compression="zstd")
    return path


def test_row_groups_decoded_in_parallel_give_the_serial_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several row groups decode on two threads; the batches keep the file's order, so the
    statistics, the token selections and the row numbers of errors are those of a serial read."""
    from routelog.ingest import parquet

    rng = np.random.default_rng(5)
    probs = dirichlet(rng, 5000, 8).astype(np.float32)
    layer = np.repeat(np.arange(5), 1000)
    path = _row_groups(tmp_path, probs, layer, rows=700)
    monkeypatch.setattr(parquet, "BATCH_ROWS", 300)
    parallel = routelog.analyze([path], jobs=1)
    monkeypatch.setattr(parquet, "PARALLEL_ROW_GROUP_BYTES", 0)  # serial: one batch at a time
    serial = routelog.analyze([path], jobs=1)
    assert parallel.metrics.equals(serial.metrics)
    assert parallel.metrics["n_tokens"].to_list() == [1000] * 5
    probs[4321] = [0.6, 0.6, 0, 0, 0, 0, 0, 0]
    bad = _row_groups(tmp_path, probs, layer, rows=700)
    monkeypatch.setattr(parquet, "PARALLEL_ROW_GROUP_BYTES", 256 << 20)
    with pytest.raises(InputError, match=f"{bad} row 4321: probabilities do not sum to 1"):
        routelog.analyze([bad])


def test_small_row_groups_are_read_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file written 70 rows at a time is reduced in batches of up to BATCH_ROWS rows (units
    of 4 row groups here), with the same results serially, in parallel and from one big row
    group, and errors still name the file's row."""
    from routelog import kernels
    from routelog.ingest import parquet

    rng = np.random.default_rng(6)
    probs = dirichlet(rng, 5000, 8).astype(np.float32)
    layer = np.repeat(np.arange(5), 1000)
    path = _row_groups(tmp_path, probs, layer, rows=70)
    monkeypatch.setattr(parquet, "BATCH_ROWS", 300)
    heights: list[int] = []
    reduce = kernels.reduce_probs

    def counted(frame: pl.DataFrame, top_k: int) -> kernels.Reduced:
        heights.append(frame.height)
        return reduce(frame, top_k)

    monkeypatch.setattr(kernels, "reduce_probs", counted)
    parallel = routelog.analyze([path], jobs=1)
    assert max(heights) == 280  # 4 row groups of 70 rows in one batch (a layer splits some)
    assert sum(heights) == 5000
    monkeypatch.setattr(parquet, "PARALLEL_ROW_GROUP_BYTES", 0)  # serial: one unit at a time
    serial = routelog.analyze([path], jobs=1)
    assert parallel.metrics.equals(serial.metrics)
    (tmp_path / "one").mkdir()
    whole = routelog.analyze([_row_groups(tmp_path / "one", probs, layer, rows=5000)], jobs=1)
    assert_frame_equal(parallel.metrics, whole.metrics, check_exact=False, rel_tol=1e-9)
    probs[4321] = [0.6, 0.6, 0, 0, 0, 0, 0, 0]
    bad = _row_groups(tmp_path, probs, layer, rows=70)
    monkeypatch.setattr(parquet, "PARALLEL_ROW_GROUP_BYTES", 256 << 20)
    with pytest.raises(InputError, match=f"{bad} row 4321: probabilities do not sum to 1"):
        routelog.analyze([bad])


@pytest.mark.parametrize(
    ("rows", "units"),
    [
        ([4096] * 20, [list(range(16)), list(range(16, 20))]),
        ([100_000, 10, 10, 70_000, 5], [[0], [1, 2], [3], [4]]),
        ([65_536, 1], [[0], [1]]),
        ([], []),
    ],
)
def test_row_group_units(rows: list[int], units: list[list[int]]) -> None:
    from types import SimpleNamespace

    from routelog.ingest import parquet

    groups = [SimpleNamespace(num_rows=n, total_byte_size=4 * n) for n in rows]
    found = parquet.row_group_units(groups)
    assert [indices for indices, _ in found] == units
    assert [size for _, size in found] == [sum(4 * rows[i] for i in unit) for unit in units]


def test_sums_near_the_tolerance_are_decided_in_float64(tmp_path: Path) -> None:
    """float32 row sums decide only rows far from the 1e-3 edge; the others are summed in
    float64: 0.5 + 0.501 is refused, 0.5 + 0.5009 accepted, whatever float32 rounds them to."""
    ok = _one_file(tmp_path, layer=[0, 0], probs=np.array([[0.5, 0.5], [0.5, 0.5009]]))
    assert routelog.analyze([ok]).metrics["n_tokens"][0] == 2
    off = _one_file(tmp_path, layer=[0, 0], probs=np.array([[0.5, 0.5], [0.5, 0.50101]]))
    assert f"{off} row 1: probabilities do not sum to 1" in _bad(tmp_path, str(off))


def test_a_directory_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    """pyarrow takes UTF-8 file names only; such a run is read through Python (was exit 70)."""
    import os
    import shutil

    from tests.conftest import SAMPLES

    run = Path(os.fsdecode(os.fsencode(tmp_path) + b"/run\xff"))
    run.mkdir()
    shutil.copy(SAMPLES / "collapse" / "step_000000.parquet", run / "step_000000.parquet")
    result = CliRunner().invoke(app, ["analyze", str(run), "-k", "2", "-f", "json", "--no-cache"])
    assert result.exit_code == 0, result.output
    here = routelog.analyze(SAMPLES / "collapse" / "step_000000.parquet", top_k=2).metrics
    there = routelog.analyze(run, top_k=2).metrics
    assert there.drop("run").equals(here.drop("run"))


@pytest.mark.parametrize("command", ["analyze", "inspect"])
def test_a_column_named_twice_is_one_line(tmp_path: Path, command: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dup.parquet"
    columns = [pa.array([0] * 4)] * 3 + [pa.array([[0.5, 0.5]] * 4)]
    pq.write_table(pa.table(columns, names=["step", "layer", "layer", "probs"]), path)
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip() == f"routelog: error: {path}: column 'layer' appears more than once"
    )
