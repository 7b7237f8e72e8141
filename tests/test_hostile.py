"""Hostile input across commands (issue 11): output paths, names with control characters,
absurd sizes and integers, configuration values. Reader-specific cases live in
tests/ingest/; the regression corpus in tests/test_corpus.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.errors import printable
from tests.conftest import SAMPLES, WriteRun

runner = CliRunner()


def _one_line_error(args: list[str], fragment: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(SAMPLES / "collapse", target)
    return target


def test_output_onto_an_input_log_is_refused(run: Path) -> None:
    log = run / "step_000100.parquet"
    before = log.read_bytes()
    _one_line_error(["analyze", str(log), "-o", str(log)], "would write into the input")
    _one_line_error(["analyze", str(run), "-o", str(run / "report.txt")], "into the input")
    _one_line_error(["inspect", str(run), "-o", str(log)], "into the input")
    _one_line_error(["compare", str(run), str(run), "-o", str(log)], "into the input")
    assert log.read_bytes() == before
    assert not (run / "report.txt").exists()


WRITERS: dict[str, list[str]] = {
    # every command that writes a file (-o/--output), with what it needs besides
    "analyze": [],
    "watch": ["--interval", "0.1"],
    "experts": [],
    "inspect": [],
    "compare": ["{run}"],
    "check": [],
    "plot": [],
}


def test_every_command_that_writes_is_listed() -> None:
    import typer.main

    group = typer.main.get_command(app)
    writing = {
        name
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        if any("--output" in p.opts for p in command.params)
    }
    assert writing == set(WRITERS)


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_no_command_writes_into_a_run(run: Path, command: str) -> None:
    log = run / "step_000100.parquet"
    before = sorted((p.name, p.read_bytes()) for p in run.iterdir())
    extra = [a.format(run=run) for a in WRITERS[command]]
    inside = run / "figure.png" if command == "plot" else log
    _one_line_error([command, str(run), *extra, "-o", str(inside)], "into the input")
    if command == "check":
        _one_line_error(["check", "--suggest", str(run), "-o", str(log)], "into the input")
        line = _one_line_error(["check", str(run), "--junit", str(log)], "into the input")
        assert "--junit would write" in line
    assert sorted((p.name, p.read_bytes()) for p in run.iterdir()) == before


def test_no_cache_or_step_summary_inside_a_run(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sorted((p.name, p.read_bytes()) for p in run.iterdir())
    line = _one_line_error(["analyze", str(run), "--cache-dir", str(run / "cache")], "into")
    assert "--cache-dir would write into the input" in line
    monkeypatch.setenv("ROUTELOG_CACHE_DIR", str(run / "cache"))
    _one_line_error(["check", str(run), "-k", "2"], "--cache-dir would write into the input")
    monkeypatch.delenv("ROUTELOG_CACHE_DIR")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(run / "step_000100.parquet"))
    line = _one_line_error(["check", str(run), "-k", "2", "--github", "--no-cache"], "into")
    assert "GITHUB_STEP_SUMMARY would write into the input" in line
    assert sorted((p.name, p.read_bytes()) for p in run.iterdir()) == before


def test_export_writes_no_event_files_into_a_run(run: Path) -> None:
    line = _one_line_error(["export", str(run), "--tensorboard", str(run / "tb")], "into the")
    assert "--tensorboard would write" in line
    assert not (run / "tb").exists()


def test_an_interrupted_report_leaves_the_old_file(tmp_path: Path) -> None:
    from routelog import cli

    (tmp_path / "out").mkdir()
    report = tmp_path / "out" / "report.txt"
    report.write_text("the previous report\n")

    def interrupted(stream: object) -> None:
        stream.write("half a rep")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli._emit(report, interrupted)
    assert report.read_text() == "the previous report\n"
    assert [p.name for p in report.parent.iterdir()] == ["report.txt"]
    cli._emit(report, lambda stream: stream.write("new\n"))  # type: ignore[attr-defined]
    assert report.read_text() == "new\n"


def test_reports_go_through_links_and_into_pipes(tmp_path: Path) -> None:
    import os
    import threading

    from routelog import cli

    link = tmp_path / "latest.txt"
    link.symlink_to(tmp_path / "report-1.txt")
    cli._emit(link, lambda stream: stream.write("one\n"))  # type: ignore[attr-defined]
    assert link.is_symlink()
    assert (tmp_path / "report-1.txt").read_text() == "one\n"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    cli._emit(fifo, lambda stream: stream.write("two\n"))  # type: ignore[attr-defined]
    reader.join(timeout=10)
    assert got == ["two\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".git",
        "latest.txt",
        "pipe",
        "report-1.txt",
    ]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [(".", "names a directory"), ("missing/x.txt", "does not exist"), ("/proc/version", "")],
)
def test_output_that_cannot_be_written(run: Path, target: str, fragment: str) -> None:
    if target == "/proc/version" and not Path(target).exists():
        pytest.skip("no /proc")
    line = _one_line_error(["analyze", str(run), "-o", target, "--no-cache"], fragment)
    assert target.split("/")[-1] in line


def test_printable_escapes_control_characters() -> None:
    assert printable("a\x1b[2Jb\nc\td\x7f\x9b\u2028") == "a\\x1b[2Jb\\nc\\td\\x7f\\x9b\\u2028"
    assert printable("plain name-1.parquet ü") == "plain name-1.parquet ü"


def test_names_with_escapes_reach_no_terminal_raw(tmp_path: Path) -> None:
    evil = tmp_path / "ev\x1b[2Jil\nname"
    shutil.copytree(SAMPLES / "collapse", evil)
    for args in (
        ["analyze", str(evil), "--no-cache"],
        ["inspect", str(evil)],
        ["compare", str(evil), str(evil), "--no-cache"],
        ["analyze", str(evil), "--steps", "99999", "--no-cache"],  # an error naming it
    ):
        result = runner.invoke(app, args)
        assert result.exit_code in (0, 2), result.output
        assert "\x1b" not in result.output, args
        assert "ev\\x1b[2Jil\\nname" in result.output, args


def test_absurd_sizes_are_one_line_errors(run: Path, tmp_path: Path) -> None:
    _one_line_error(["analyze", str(run), "--num-experts", "1000000000000"], "--num-experts")
    _one_line_error(["analyze", str(run), "--top-k", "99999999999999999999"], "--top-k")
    _one_line_error(["analyze", str(run), "--steps", "99999999999999999999:"], "64-bit")
    wide = tmp_path / "wide" / "step_1.parquet"
    wide.parent.mkdir()
    pl.DataFrame({"layer": [0], "p_0": [0.5], "p_1000000000": [0.5]}).write_parquet(wide)
    _one_line_error(["analyze", str(wide), "--no-cache"], "p_1000000000 is beyond")
    result = runner.invoke(app, ["analyze", str(run), "--width", "1000000000"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_huge_layer_range_is_kept_as_an_interval(run: Path) -> None:
    result = runner.invoke(
        app, ["analyze", str(run), "--layers", "2-2000000000", "-f", "json", "--no-cache"]
    )
    assert result.exit_code == 0, result.output
    assert '"layer": 1' not in result.output
    assert '"layer": 3' in result.output
    _one_line_error(["analyze", str(run), "--layers", "0-99999999999"], "--layers")


def test_huge_layer_range_in_configuration(run: Path, tmp_path: Path) -> None:
    config = tmp_path / "routelog.toml"
    config.write_text(
        '[check.layers."0-2000000000"]\nmin_token_entropy_norm = 0.01\n'
        '[check.layers."5-7"]\nmin_token_entropy_norm = 0.02\n'
    )
    _one_line_error(["check", str(run), "--config", str(config)], "layer 5 is also in")
    config.write_text('[check.layers."0-2000000000"]\nmin_token_entropy_norm = 0.01\n')
    argv = ["check", str(run), "--config", str(config), "--no-cache", "-k", "2"]
    result = runner.invoke(app, argv)
    assert result.exit_code in (0, 1), result.output


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[thresholds]\ncollapse_entropy = nan\n", "thresholds.collapse_entropy must be a finite"),
        ("[thresholds]\nskew_max_vio = inf\n", "thresholds.skew_max_vio must be a finite"),
        ("dead_fraction = nan\n", "dead_fraction must be a finite"),
        ("[check]\nmin_token_entropy_norm = nan\n", "must be a finite number"),
        ("[check]\nmax_max_vio = inf\n", "must be a finite number"),
        ("[check.max_regression]\ntoken_entropy_norm = inf\n", "non-negative finite"),
        ("[thresholds]\ninstability_window = 99999999999999\n", "instability_window must be"),
        ("top_k = 9223372036854775807\n", "top_k"),
    ],
)
def test_non_finite_and_absurd_settings(
    run: Path, tmp_path: Path, text: str, fragment: str
) -> None:
    config = tmp_path / "routelog.toml"
    config.write_text(text)
    _one_line_error(["analyze", str(run), "--config", str(config), "--no-cache"], fragment)


def test_configuration_that_is_not_utf8(run: Path, tmp_path: Path) -> None:
    config = tmp_path / "routelog.toml"
    config.write_bytes(b"# caf\xe9\ntop_k = 2\n")
    line = _one_line_error(["config", "--config", str(config)], "not UTF-8")
    assert str(config) in line
    assert "byte 5" in line


def test_count_sums_that_overflow_int64_are_refused(tmp_path: Path) -> None:
    big = 1 << 52
    path = tmp_path / "counts.jsonl"
    lines = [f'{{"step": 1, "layer": 0, "tpe": [[{big}, 1], [{big}, 1]]}}'] * 700
    path.write_text("\n".join(lines) + "\n")
    _one_line_error(["analyze", str(path), "--no-cache"], "beyond the 2^62")
    # split over two files of one run, so that only the merge can see the total
    run = tmp_path / "split"
    run.mkdir()
    for name in ("a_step_1.jsonl", "b_step_1.jsonl"):
        (run / name).write_text(f'{{"layer": 0, "tpe": [{1 << 52}, {(1 << 53) - 1}]}}\n' * 600)
    _one_line_error(["analyze", str(run), "--no-cache"], "beyond the 2^62")


def test_sigmoid_of_very_negative_logits(write_parquet_run: WriteRun) -> None:
    logits = np.array([[-800.0, -801.0, -803.0], [-50.0, -52.0, -49.0]])
    root = write_parquet_run({1: {0: logits}}, payload="logits")
    result = runner.invoke(app, ["analyze", str(root), "--score", "sigmoid", "-f", "json"])
    assert result.exit_code == 0, result.output
    import json

    (row,) = json.loads(result.output)["metrics"]
    # log sigmoid(x) = x for x << 0: the normalised scores are a softmax of the logits
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    entropy = -(expected * np.log(expected)).sum(axis=1).mean()
    assert row["token_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert row["load_share"] == [0.5, 0.0, 0.5]  # top-1: expert 0 and expert 2


def test_one_expert_layers_are_analysed_without_entropy_findings(tmp_path: Path) -> None:
    import json

    path = tmp_path / "step_1.jsonl"
    path.write_text('{"layer": 0, "probs": [1.0]}\n' * 5)
    result = runner.invoke(app, ["analyze", str(path), "-f", "json", "--no-cache"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    (row,) = document["metrics"]
    assert row["n_experts"] == 1
    assert row["token_entropy"] == 0.0
    assert row["token_entropy_norm"] is None  # H / ln 1 is undefined, not "collapsed"
    assert document["findings"] == []


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "{loop}"],
        ["experts", "{loop}"],
        ["compare", "{run}", "{loop}"],
        ["check", "{run}", "--baseline", "{loop}", "--max-regression", "max_vio=1"],
        ["analyze", "{run}", "-o", "{loop}"],
    ],
)
def test_a_link_loop_is_one_line(run: Path, tmp_path: Path, args: list[str]) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    line = _one_line_error([a.format(loop=loop, run=run) for a in args], "a symbolic link loop")
    assert line == f"routelog: error: {loop}: a symbolic link loop"


def test_every_report_says_what_was_skipped(tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [[0.25] * 4 for _ in range(10)]
    rows[4][0] = float("nan")
    log = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"step": [0] * 10, "layer": [0] * 10, "probs": rows}), log)
    common = ["--skip-bad-rows", "-k", "2", "--no-cache"]
    said = "1 bad row skipped (--skip-bad-rows)"
    for args in (["check", str(log)], ["compare", f"a={log}", f"b={log}"]):
        result = runner.invoke(app, [*args, *common])
        assert said in result.output, (args, result.output)
    document = json.loads(runner.invoke(app, ["check", str(log), *common, "-f", "json"]).output)
    assert document["runs"][0]["skipped_rows"] == 1


def test_a_one_expert_share_has_entropy_zero_not_minus_zero() -> None:
    import math

    from routelog.kernels import entropy

    value = float(entropy(np.array([1.0, 0.0, 0.0])))
    assert value == 0.0
    assert math.copysign(1.0, value) == 1.0


@pytest.mark.parametrize("command", ["analyze", "inspect", "experts"])
def test_an_empty_path_is_not_the_current_directory(command: str) -> None:
    _one_line_error([command, ""], "an empty path: give a log file or a run directory")
