"""A gate never passes because the command line was misread: ``check`` on a failing run exits
1 whatever its options, in whatever order; and CI cannot silently skip the real-log tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.errors import ExitCode
from routelog.samples import sample_path
from tests.conftest import REAL_LOGS, REPO

runner = CliRunner()
RUN = str(sample_path())  # collapses in layers 2 and 3: every gate must fail on it


def _variants(tmp: Path) -> list[list[str]]:
    junit = str(tmp / "junit.xml")
    out = str(tmp / "report.txt")
    return [
        [RUN],
        [RUN, "-k", "2"],
        ["-k", "2", RUN],
        ["--top-k=2", RUN],
        [RUN, "--format", "json"],
        ["--format", "csv", RUN, "-k", "2"],
        [RUN, "-f", "markdown"],
        [RUN, "--junit", junit],
        [RUN, "--github"],
        ["--github", "-k", "2", RUN, "--junit", junit],
        [RUN, "--window", "2"],
        ["--window=3", RUN, "-k", "2"],
        [RUN, "--strict"],
        [RUN, "--no-cache"],
        ["--no-cache", "--jobs", "1", RUN],
        [RUN, "--layers", "2,3"],
        [RUN, "--layers", "0-3", "--steps", "400:"],
        [RUN, "--steps", "500:700", "-k", "2"],
        [RUN, "-o", out],
        ["-o", out, "--format", "json", RUN],
        [RUN, "--min", "token_entropy_norm=0.2"],
        [RUN, "--max", "max_load_share=0.9", "--min", "load_entropy_norm=0.1"],
        [RUN, "--score", "softmax", "--temperature", "1.0"],
        [RUN, "--skip-bad-rows", "-k", "2", "--format", "json", "--strict", "--window", "2"],
        [f"demo={RUN}", "-k", "2"],
        ["--", RUN],
    ]


@pytest.mark.parametrize("index", range(len(_variants(Path()))))
def test_check_on_a_failing_run_exits_1_whatever_the_options(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    # the sample does not state its k, which check needs: without -k, the configuration's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "routelog.toml").write_text("top_k = 2\n")
    argv = _variants(tmp_path)[index]
    result = runner.invoke(app, ["check", *argv])
    assert result.exit_code == ExitCode.CHECK_FAILED, (argv, result.output)
    assert "routelog 0." not in result.output  # never the version banner instead of a verdict
    if "--junit" in argv:
        assert 'failures="0"' not in (tmp_path / "junit.xml").read_text()


def test_check_exits_1_through_the_installed_script() -> None:
    """The same through the console script and a real process (no test runner in between)."""
    script = Path(sys.executable).with_name("routelog")
    for argv in ([RUN, "-k", "2"], ["--format", "json", RUN, "--top-k=2"]):
        done = subprocess.run(
            [str(script), "check", *argv, "--no-cache"], capture_output=True, text=True, check=False
        )
        assert done.returncode == ExitCode.CHECK_FAILED, (argv, done.stdout, done.stderr)


@pytest.mark.real_logs
@pytest.mark.parametrize(
    "options", [["-k", "2"], ["-k", "2", "--format", "json"], ["--strict", "-k", "2"]]
)
def test_real_collapsing_run_fails_the_gate(options: list[str]) -> None:
    result = runner.invoke(app, ["check", str(REAL_LOGS / "collapse"), *options])
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    if "json" in options:
        assert json.loads(result.output)["passed"] is False


def _pytest(test: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROUTELOG_RE")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", test],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**clean, **env},
    )


REACHABLE = "tests/test_check_gate.py::test_real_logs_are_reachable"


@pytest.mark.real_logs
def test_real_logs_are_reachable() -> None:
    for run in ("collapse", "aux-loss"):
        assert len(list((REAL_LOGS / run).glob("step_*.pt"))) >= 10, run


def test_real_log_tests_skip_without_the_dumps(tmp_path: Path) -> None:
    done = _pytest(REACHABLE, {"ROUTELOG_REAL_LOGS": str(tmp_path / "nowhere")})
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout
    assert "set ROUTELOG_REAL_LOGS" in done.stdout


def test_required_real_log_tests_fail_instead_of_skipping(tmp_path: Path) -> None:
    done = _pytest(
        REACHABLE,
        {"ROUTELOG_REAL_LOGS": str(tmp_path / "nowhere"), "ROUTELOG_REQUIRE_REAL_LOGS": "1"},
    )
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    assert "ROUTELOG_REQUIRE_REAL_LOGS is set" in done.stdout


def test_a_skip_written_by_hand_also_fails_when_required(tmp_path: Path) -> None:
    """A real-log test that skips its own way (not the marker) is caught at the session's end."""
    probe = REPO / "tests" / f"test_zz_probe_{os.getpid()}.py"
    probe.write_text(
        "import pytest\n\ndef test_probe():\n    pytest.skip('real logs not available')\n"
    )
    try:
        done = _pytest(str(probe.relative_to(REPO)), {"ROUTELOG_REQUIRE_REAL_LOGS": "1"})
    finally:
        probe.unlink()
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "real-log tests skipped" in done.stderr


@pytest.mark.real_logs
def test_real_logs_location_comes_from_the_environment(tmp_path: Path) -> None:
    moved = tmp_path / "dumps"
    (moved / "mixtral-e8-top2").mkdir(parents=True)
    for run in ("collapse", "aux-loss"):
        (moved / "mixtral-e8-top2" / run).symlink_to(REAL_LOGS / run)
    done = _pytest(REACHABLE, {"ROUTELOG_REAL_LOGS": str(moved), "ROUTELOG_REQUIRE_REAL_LOGS": "1"})
    assert done.returncode == 0, done.stdout
    assert "1 passed" in done.stdout
