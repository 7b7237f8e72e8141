from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from tests.conftest import REPO, SAMPLES

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("routelog ")


def test_analyze_json_sample() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["runs"][0]["run"] == "healthy"
    assert len(document["metrics"]) == 12 * 4


def test_csv_to_file(tmp_path: Path) -> None:
    target = tmp_path / "m.csv"
    result = runner.invoke(
        app, ["analyze", str(SAMPLES / "healthy"), "-k", "2", "--format", "csv", "-o", str(target)]
    )
    assert result.exit_code == 0, result.output
    lines = target.read_text().splitlines()
    header = "run,step,layer,n_tokens,n_experts,top_k,top_k_assumed,token_entropy,"
    assert lines[0].startswith(header)
    assert "load_share" not in lines[0].split(",")
    assert len(lines) == 1 + 12 * 4


def test_table_report() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "collapse"), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "collapse  steps 0–1100 (12 logged) · 4 layers · E=8 · k=2" in result.output
    layer_rows = [line.split() for line in result.output.splitlines() if line[:5].strip().isdigit()]
    assert [row[0] for row in layer_rows] == ["0", "1", "2", "3"]
    assert [row[5] for row in layer_rows] == ["0/8", "0/8", "6/8", "6/8"]


def test_debug_shows_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    plain = runner.invoke(app, ["analyze", missing])
    assert plain.exit_code == 2
    assert "Traceback" not in plain.output
    debug = runner.invoke(app, ["analyze", missing, "--debug"])
    assert debug.exit_code != 0
    assert isinstance(debug.exception, Exception)
    assert "no such file or directory" in str(debug.exception)


def test_usage_error_exit_code() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--layers", "x"])
    assert result.exit_code == 2
    assert "--layers: cannot read 'x'" in result.output


def test_python_dash_m() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "routelog", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("routelog ")


HEAVY = ("polars", "pyarrow", "numpy", "rich")


@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["-h"], ["analyze", "--help"], ["cache", "--help"]]
)
def test_start_up_imports_no_heavy_module(argv: list[str]) -> None:
    probe = (
        "import sys\n"
        f"sys.argv = ['routelog', *{argv!r}]\n"
        "from routelog.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


OPTIONAL = ("dask", "distributed", "torch", "transformers", "matplotlib", "tensorboard", "wandb")
"""Top-level packages of the optional worlds (extras): none is imported to read local files."""


def test_plain_commands_import_no_optional_extra(tmp_path: Path) -> None:
    """analyze, compare, check, experts and inspect on local files, through the console entry
    point in one process: after each, no module of an extra is loaded (all are installed here,
    so an import would succeed silently), and routelog's object-storage path (``pyarrow.fs``
    file systems, the ``cloud`` extra) was never taken. pyarrow.parquet imports pyarrow.fs
    itself, so the module's presence alone says nothing: the probe counts routelog's calls.
    """
    run, other = str(SAMPLES / "collapse"), str(SAMPLES / "healthy")
    commands = [
        ["analyze", run, "-k", "2", "-f", "json", "--no-cache"],
        ["analyze", run, "-k", "2", "--plot", "--no-cache"],
        ["analyze", run, "-k", "2", "-f", "html", "--no-cache"],
        ["compare", other, run, "-k", "2", "--no-cache"],
        ["check", run, "-k", "2", "--junit", str(tmp_path / "junit.xml"), "--no-cache"],
        ["experts", run, "-k", "2", "--no-cache"],
        ["inspect", run, "-f", "json"],
    ]
    probe = f"""
import contextlib, io, sys
import routelog.storage
cloud = []
real = routelog.storage._pyarrow_fs
routelog.storage._pyarrow_fs = lambda: cloud.append(1) or real()
from routelog.cli import main
for argv in {commands!r}:
    sys.argv = ["routelog", *argv]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, 1, None), (argv, exc.code)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r})
    print(argv[0], "extras:", loaded, "cloud:", len(cloud), file=sys.stderr)
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    reports = [line for line in done.stderr.splitlines() if " extras: " in line]
    assert len(reports) == len(commands), done.stderr
    assert all(line.endswith(" extras: [] cloud: 0") for line in reports), done.stderr


def test_analyze_uses_and_bypasses_the_cache(tmp_path: Path, isolated_cache: Path) -> None:
    sample = str(SAMPLES / "healthy")
    plain = runner.invoke(app, ["analyze", sample, "--format", "json", "--no-cache"])
    assert plain.exit_code == 0, plain.output
    assert list(isolated_cache.iterdir()) == []
    first = runner.invoke(app, ["analyze", sample, "--format", "json", "--jobs", "2"])
    assert first.exit_code == 0, first.output
    assert len(list(isolated_cache.glob("*.json"))) == 12
    again = runner.invoke(app, ["analyze", sample, "--format", "json", "-j", "1"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output) == json.loads(first.output) == json.loads(plain.output)
    elsewhere = tmp_path / "elsewhere"
    moved = runner.invoke(app, ["analyze", sample, "--cache-dir", str(elsewhere)])
    assert moved.exit_code == 0, moved.output
    assert len(list(elsewhere.glob("*.json"))) == 12


def test_jobs_must_be_positive() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--jobs", "0"])
    assert result.exit_code == 2
    assert "--jobs" in result.output


def test_cache_info_and_clear(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    analyzed = runner.invoke(
        app, ["analyze", str(SAMPLES / "drift"), "--cache-dir", str(directory)]
    )
    assert analyzed.exit_code == 0, analyzed.output
    info = runner.invoke(app, ["cache", "info", "--cache-dir", str(directory)])
    assert info.exit_code == 0, info.output
    assert f"directory  {directory}" in info.output
    assert "entries    12" in info.output
    cleared = runner.invoke(app, ["cache", "clear", "--cache-dir", str(directory)])
    assert cleared.exit_code == 0, cleared.output
    assert cleared.output == f"removed 12 cache entries from {directory}\n"
    assert list(directory.iterdir()) == []


def test_cache_clear_defaults_to_the_user_cache(isolated_cache: Path) -> None:
    runner.invoke(app, ["analyze", str(SAMPLES / "healthy")])
    cleared = runner.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0, cleared.output
    assert cleared.output == f"removed 12 cache entries from {isolated_cache}\n"


POOL_PROBE = """
import contextlib, io, sys
from routelog.cli import app
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    app(["analyze", sys.argv[1], "-f", "json", "--no-cache"])
import pyarrow as pa
print(pa.default_memory_pool().backend_name)
"""


def _cap_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))


@pytest.mark.parametrize(
    ("chosen", "capped", "used"),
    [
        (None, False, "jemalloc"),
        ("mimalloc", False, "mimalloc"),
        (None, True, "system"),
        ("mimalloc", True, "mimalloc"),
    ],
)
def test_the_cli_reads_with_jemalloc_unless_capped_or_the_environment_chooses(
    chosen: str | None, capped: bool, used: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jemalloc hands decoded row groups back sooner (bench (d)); under ulimit -v the system
    allocator reserves no address space ahead (tests/test_corpus.py); a user's choice stands."""
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    if chosen is not None:
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", chosen)
    done = subprocess.run(
        [sys.executable, "-c", POOL_PROBE, str(SAMPLES / "collapse")],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=_cap_address_space if capped else None,
    )
    assert done.stdout.split() == [used]
