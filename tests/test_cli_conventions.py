"""Command-line conventions: bare invocation, closed pipes, completion, metavars, demo, -o."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.errors import ExitCode
from routelog.samples import sample_path
from tests.conftest import SAMPLES

runner = CliRunner()
# The console script pip installed next to this interpreter: completion and help name it.
ROUTELOG = [str(Path(sys.executable).with_name("routelog"))]


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ROUTELOG, *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_no_arguments_prints_help_on_stdout_and_exits_0() -> None:
    done = _run()
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stdout.startswith("Usage: routelog [OPTIONS] COMMAND")
    for command in ("analyze", "check", "compare", "demo", "inspect"):
        assert f"  {command} " in done.stdout
    assert done.stderr == ""


def test_cache_group_without_a_command_prints_its_help() -> None:
    result = runner.invoke(app, ["cache"])
    assert result.exit_code == 0, result.output
    assert "clear" in result.stdout
    assert "info" in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", str(SAMPLES / "collapse"), "-k", "2"],
        ["analyze", str(SAMPLES / "collapse"), "-k", "2", "--plot"],
        ["analyze", str(SAMPLES / "collapse"), "--format", "json"],
        ["analyze", str(SAMPLES / "collapse"), "--format", "csv"],
        ["check", str(SAMPLES / "collapse"), "-k", "2"],
        ["inspect", str(SAMPLES / "collapse")],
    ],
)
def test_reader_gone_exits_quietly_with_the_sigpipe_code(argv: list[str]) -> None:
    """The reader closes the pipe before routelog writes: exit 141, nothing on stderr."""
    with subprocess.Popen(
        [*ROUTELOG, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == ExitCode.BROKEN_PIPE == 141
    assert stderr == ""


@pytest.mark.skipif(shutil.which("head") is None, reason="needs head(1)")
def test_head_closes_the_pipe_early() -> None:
    """`routelog analyze RUN | head -1` as a shell runs it: one line, no noise, never 1."""
    script = (
        f"{' '.join(ROUTELOG)} analyze {SAMPLES / 'collapse'} -k 2 --format json --no-cache"
        ' | head -1; echo "status=${PIPESTATUS[0]}" >&2'
    )
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.stdout == "{\n"
    status = int(done.stderr.strip().rsplit("status=", 1)[1])
    assert status in (ExitCode.OK, ExitCode.BROKEN_PIPE), done.stderr
    assert done.stderr.strip() == f"status={status}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_show_completion_prints_a_bash_script() -> None:
    # "; exit $?": bash stays routelog's parent (a lone command is exec'd in its place, and
    # the shell detection then depends on whatever started the tests)
    done = subprocess.run(
        ["bash", "-c", f"{' '.join(ROUTELOG)} --show-completion; exit $?"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "_ROUTELOG_COMPLETE=complete_bash" in done.stdout
    assert "complete -o default -F _routelog_completion routelog" in done.stdout
    named = _run(
        "--show-completion", "zsh", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    assert named.returncode == 0, named.stderr
    assert "#compdef routelog" in named.stdout


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("routelog ana", "analyze"),
        ("routelog check --for", "--format"),
        ("routelog analyze --score s", "softmax"),
        ("routelog inspect --format ", "json"),
    ],
)
def test_completion_completes(words: str, expected: str) -> None:
    """What the installed bash script asks routelog for, answered by routelog itself."""
    done = _run(
        env={
            "_ROUTELOG_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
        }
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_completion_writes_the_script(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", "-c", f"{' '.join(ROUTELOG)} --install-completion; exit $?"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    script = tmp_path / ".bash_completions" / "routelog.sh"
    assert "_ROUTELOG_COMPLETE" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _choice(option: str, choices: str) -> str:
    """``--format <a|b>`` (typer >= 0.26 with its own click) or ``--format [a|b]`` (older)."""
    return rf"{option} [<\[]{re.escape(choices)}[>\]]"


@pytest.mark.parametrize("command", ["analyze", "compare", "check"])
def test_metavars_read_as_users_expect(command: str) -> None:
    text = _help(command)
    assert re.match(rf"Usage: routelog {command} \[OPTIONS\] [\[{{]?PATH", text), text[:80]
    assert re.search(_choice("--format", "table|json|csv|markdown|html"), text)
    assert re.search(_choice("--score", "softmax|sigmoid"), text)
    assert "-k, --top-k K" in text
    assert "--steps FROM:TO" in text
    assert "-o, --output FILE" in text
    assert "<str>" not in text
    assert "<path>" not in text
    assert "<int>" not in text


def test_check_metavars() -> None:
    text = _help("check")
    assert "--min METRIC=VALUE" in text
    assert "--max METRIC=VALUE" in text
    assert "--max-regression METRIC=TOL" in text
    assert "--baseline PATH" in text
    assert "<list[str]>" not in text.split("Options:")[1]


@pytest.mark.parametrize("command", ["inspect", "config"])
def test_describe_commands_advertise_only_their_formats(command: str) -> None:
    text = _help(command)
    assert re.search(_choice("--format", "table|json"), text)
    assert "markdown" not in text
    refused = runner.invoke(app, [command, "--format", "csv"])
    assert refused.exit_code == ExitCode.BAD_INPUT
    assert re.search(r"'csv' is not one of '?table'?, '?json'?", " ".join(refused.output.split()))


def test_check_writes_to_output_and_still_fails(tmp_path: Path) -> None:
    target = tmp_path / "gate.json"
    result = runner.invoke(
        app, ["check", str(sample_path()), "-k", "2", "--format", "json", "-o", str(target)]
    )
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    assert result.stdout == ""
    document = json.loads(target.read_text())
    assert document["passed"] is False
    table = tmp_path / "gate.txt"
    result = runner.invoke(app, ["check", str(sample_path()), "-k", "2", "--output", str(table)])
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    assert "collapse" in table.read_text()


def test_check_suggest_writes_to_output(tmp_path: Path) -> None:
    target = tmp_path / "thresholds.toml"
    result = runner.invoke(
        app, ["check", "--suggest", str(SAMPLES / "healthy"), "-k", "2", "-o", str(target)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "[tool.routelog.check]" in target.read_text()


def test_github_annotations_with_a_json_report_in_a_file(tmp_path: Path) -> None:
    target = tmp_path / "gate.json"
    result = runner.invoke(
        app,
        ["check", str(sample_path()), "-k", "2", "--github", "--format", "json", "-o", str(target)],
    )
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    assert result.stdout.startswith("::error")
    assert json.loads(target.read_text())["passed"] is False


def test_demo_analyzes_the_packaged_sample() -> None:
    result = runner.invoke(app, ["demo", "--width", "100"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("collapse  steps 0–700 (8 logged) · 4 layers · E=8 · k=2")
    assert "  FAIL" in result.output
    assert "collapse  layers 2*, 3*" in result.output


def test_demo_path_is_a_run_directory_the_other_commands_read() -> None:
    result = runner.invoke(app, ["demo", "--path"])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path == sample_path()
    assert path.is_dir()
    gate = runner.invoke(app, ["check", str(path), "-k", "2"])
    assert gate.exit_code == ExitCode.CHECK_FAILED, gate.output


def test_help_texts_do_not_point_at_the_source_checkout() -> None:
    for command in ("analyze", "inspect", "compare", "check", "demo", "config"):
        assert "sample_logs" not in _help(command)


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (
            RuntimeError("a bug"),
            ExitCode.INTERNAL,
            "routelog: internal error: RuntimeError: a bug (rerun with --debug and report it)",
        ),
        (MemoryError(), ExitCode.OUT_OF_MEMORY, "routelog: error: out of memory"),
        (
            OSError(errno.ENOMEM, "Cannot allocate memory"),
            ExitCode.OUT_OF_MEMORY,
            "routelog: error: out of memory",
        ),
        (
            ImportError("libparquet.so.2600: failed to map segment from shared object"),
            ExitCode.OUT_OF_MEMORY,
            "routelog: error: out of memory",
        ),
        (
            ImportError("No module named 'x'"),
            ExitCode.INTERNAL,
            "routelog: internal error: ImportError: No module named 'x' "
            "(rerun with --debug and report it)",
        ),
    ],
)
def test_an_unexpected_failure_is_one_line_and_its_own_exit_code(
    raised: Exception, code: ExitCode, line: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug asks for a report (70); running out of memory is the machine, not routelog (71)."""
    import routelog.api

    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(routelog.api, "load_runs", fail)
    monkeypatch.delenv("ROUTELOG_DEBUG", raising=False)
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--no-cache"])
    assert (result.exit_code, result.stderr.splitlines()) == (code, [line])
    debugged = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--debug"])
    assert debugged.exception is raised


@pytest.mark.parametrize(("limit", "said"), [(3 << 30, "3.0 GiB"), (768 << 20, "768 MiB")])
def test_out_of_memory_under_ulimit_names_the_limit(
    limit: int, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    import routelog.api

    def fail(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(routelog.api, "load_runs", fail)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, resource.RLIM_INFINITY))
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")  # the CLI would set it: capped
    result = runner.invoke(app, ["analyze", str(SAMPLES / "healthy"), "--no-cache"])
    assert result.stderr.splitlines() == [
        f"routelog: error: out of memory: the address space is limited to {said} (ulimit -v)"
    ]
