"""Usage errors: one line on stderr and exit 2, for every command and every bad option value.

click prints a usage block over four lines; routelog turns every usage error into one line
naming the command, the option, what is wrong and where to look (``routelog/cli.py``
``_Group.main``). The walk below covers every command's options (issue 11 §2, §3: absurd
sizes and out-of-range integers are one-line errors).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from routelog.cli import app
from routelog.errors import ExitCode
from tests.conftest import SAMPLES

runner = CliRunner()
ROUTELOG = [str(Path(sys.executable).with_name("routelog"))]

# option -> values that must be refused, and a word the error must hold for each
BAD_VALUES: dict[str, list[tuple[str, str]]] = {
    "--jobs": [("0", "must be at least 1 (got 0)"), ("-3", "at least 1"), ("x", "whole number")],
    "--num-experts": [("1e12", "must be a whole number (got 1e12)"), ("2.5", "whole number")],
    "--top-k": [("two", "whole number"), ("1.5", "whole number")],
    "--width": [("1000000000", "must be at most 1000 (got 1000000000)"), ("10", "at least 40")],
    "--format": [("xml", "'xml' is not one of")],
    "--color": [("rainbow", "'rainbow' is not one of")],
    "--score": [("tanh", "'tanh' is not one of")],
    "--temperature": [("warm", "must be a number")],
    "--interval": [("0", "at least 0.1")],
    "--fail-on": [("error", "is not one of")],
    "--rows": [("1", "at least 2")],
    "--dpi": [("5", "at least 50"), ("100000", "at most 1200")],
    "--layer": [("first", "whole number")],
    "--step": [("last", "whole number")],
    "--window": [("0", "must be at least 1 (got 0)")],
    "--by": [("model", "is not one of")],
    "--align": [("closest", "is not one of")],
    "--sort": [("random", "is not one of")],
    "--share": [("all", "is not one of")],
    "--kind": [("pie", "is not one of")],
    "--shift-threshold": [("high", "must be a number")],
}


def _commands() -> dict[str, Any]:
    """Every command as its words (``cache clear``) -> its click command."""
    out: dict[str, Any] = {}
    for name, command in get_command(app).commands.items():  # type: ignore[attr-defined]
        for sub, leaf in getattr(command, "commands", {}).items():
            out[f"{name} {sub}"] = leaf
        if not getattr(command, "commands", None):
            out[name] = command
    return out


COMMANDS = _commands()


def _base(words: str) -> list[str]:
    """The command with its required arguments, so that only the option under test is bad."""
    command = COMMANDS[words]
    args = words.split()
    if any(p.param_type_name == "argument" and p.required for p in command.params):
        args.append(str(SAMPLES / "collapse"))
    if words == "plot":
        args += ["-o", "figure.png"]
    if words == "export":
        args += ["--tensorboard", "tb"]
    return args


def _options(words: str) -> set[str]:
    return {o for p in COMMANDS[words].params for o in p.opts if o.startswith("--")}


CASES = [
    pytest.param(words, option, value, expected, id=f"{words}-{option}={value}")
    for words in COMMANDS
    for option, values in BAD_VALUES.items()
    if option in _options(words)
    for value, expected in values
]


def _one_line_usage_error(result: Any, words: str) -> str:
    assert result.exit_code == ExitCode.BAD_INPUT, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith(f"routelog {words}: error: ".replace("routelog : ", "routelog: ")), line
    assert line.endswith(f"; see 'routelog {words} --help'".replace("routelog  ", "routelog ")), (
        line
    )
    assert "Traceback" not in line
    assert "Usage:" not in line
    return line


def test_the_walk_covers_every_command() -> None:
    walked = {case.values[0] for case in CASES}
    # demo and config take only flags and choices; cache info/clear only --color
    assert walked >= set(COMMANDS) - {"demo", "config", "cache info", "cache clear"}
    assert {"demo", "config", "cache info", "cache clear"} <= walked


@pytest.mark.parametrize(("words", "option", "value", "expected"), CASES)
def test_a_bad_option_value_is_one_line(words: str, option: str, value: str, expected: str) -> None:
    result = runner.invoke(app, [*_base(words), option, value])
    line = _one_line_usage_error(result, words)
    assert f"{option}: " in line, line
    assert expected in line, line


@pytest.mark.parametrize("words", list(COMMANDS))
def test_an_unknown_option_is_one_line(words: str) -> None:
    result = runner.invoke(app, [*_base(words), "--no-such-option"])
    line = _one_line_usage_error(result, words)
    assert "no such option: --no-such-option" in line


@pytest.mark.parametrize(
    "words",
    [w for w, c in COMMANDS.items() if any(p.required for p in c.params)],
)
def test_a_missing_argument_is_one_line(words: str) -> None:
    result = runner.invoke(app, words.split())
    line = _one_line_usage_error(result, words)
    assert "missing " in line


def test_an_option_without_its_value_is_one_line() -> None:
    line = _one_line_usage_error(runner.invoke(app, ["check", "run", "--junit"]), "check")
    assert "option '--junit' requires an argument" in line


def test_a_mistyped_command_suggests_the_right_one() -> None:
    result = runner.invoke(app, ["anlyze", "run"])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert result.stderr == (
        "routelog: error: no such command 'anlyze' (did you mean 'analyze'?); "
        "see 'routelog --help'\n"
    )
    line = _one_line_usage_error(runner.invoke(app, ["cache", "purge"]), "cache")
    assert "no such command 'purge'" in line


def test_a_close_option_is_suggested() -> None:
    line = _one_line_usage_error(
        runner.invoke(app, ["analyze", "run", "--frmat", "json"]), "analyze"
    )
    assert "no such option: --frmat (possible options: --format)" in line


def test_what_the_user_typed_reaches_stderr_escaped() -> None:
    result = runner.invoke(app, ["analyze", "run", "--jobs", "\x1b[2J\nx"])
    line = _one_line_usage_error(result, "analyze")
    assert "\x1b" not in line
    assert "(got \\x1b[2J\\nx)" in line


def test_bare_routelog_with_a_bad_option_is_one_line() -> None:
    result = runner.invoke(app, ["--bogus"])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert result.stderr == "routelog: error: no such option: --bogus; see 'routelog --help'\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["analyze", "--jobs", "0"], "routelog analyze: error: --jobs: must be at least 1 (got 0)"),
        (["analyze", "--num-experts", "1e12"], "--num-experts: must be a whole number"),
        (["analyze", "--width", "1000000000"], "--width: must be at most 1000"),
        (["watch", "--width", "1000000000"], "--width: must be at most 1000"),
        (["experts", "--width", "1000000000"], "--width: must be at most 1000"),
        # values the parser accepts but the data cannot: the core's one-line errors
        (["analyze", "--num-experts", "1000000000000"], "beyond the 65536 experts"),
        (["analyze", "--top-k", str(2**70)], "beyond the 65536 experts"),
        (["analyze", "--steps", "500:100"], "--steps: range '500:100' is empty"),
        (["analyze", "--steps", "0:" + str(2**70)], "--steps"),
        (["analyze", "--layers", "3-1"], "--layers"),
    ],
)
def test_out_of_range_integers_in_a_subprocess(argv: list[str], expected: str) -> None:
    """The console script itself, as a user runs it: one line, exit 2, no traceback."""
    command, *options = argv
    done = subprocess.run(
        [*ROUTELOG, command, str(SAMPLES / "collapse"), *options, "--no-cache"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert expected in done.stderr


def test_a_huge_layer_range_is_not_materialised() -> None:
    """``--layers 0-2000000000`` keeps the layers the data holds, at once."""
    result = runner.invoke(
        app,
        [
            "analyze",
            str(SAMPLES / "collapse"),
            "--layers",
            "0-2000000000",
            "-f",
            "json",
            "--no-cache",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert '"layer": 3' in result.stdout


def test_help_is_unchanged_by_the_one_line_errors() -> None:
    result = runner.invoke(app, ["analyze", "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: routelog analyze [OPTIONS]")
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["analyze", "{run}", "--steps", "abc"], "--steps: cannot read 'abc'"),
        (["check", "{run}", "--layers", "5-3"], "--layers: range '5-3' is empty"),
        (
            ["analyze", "{run}", "--temperature", "-1"],
            "--temperature: must be a finite number of at least",
        ),
        (["compare", "{run}", "--by", "dataset", "--shift-threshold", "nan"], "[0, 1] (got nan)"),
    ],
)
def test_a_bad_option_value_is_the_commands_usage_error(args: list[str], problem: str) -> None:
    # read with the command line, before any file: the same line as click's own value errors
    result = runner.invoke(app, [a.format(run=SAMPLES / "shift") for a in args])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    command = args[0]
    line = result.output.strip()
    assert line.startswith(f"routelog {command}: error: ")
    assert problem in line
    assert line.endswith(f"; see 'routelog {command} --help'")
