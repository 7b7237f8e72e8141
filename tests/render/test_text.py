"""Clean text output: one number formatter, one plural helper, trailing whitespace, colour,
and tables that never cut a number (routelog/render/text.py, routelog/render/__init__.py)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.render import make_console, use_color
from routelog.render.text import Column, TrimmedLines, fmt, grid, plural, signed, trim_line
from tests.conftest import SAMPLES, WriteRun, dirichlet

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COMMANDS = {
    "analyze": ["analyze", str(SAMPLES / "collapse"), "-k", "2"],
    "analyze --plot --values": [
        "analyze",
        str(SAMPLES / "collapse"),
        "-k",
        "2",
        "--plot",
        "--values",
    ],
    "compare": ["compare", str(SAMPLES / "healthy"), str(SAMPLES / "collapse"), "-k", "2"],
    "compare --plot": ["compare", str(SAMPLES / "healthy"), str(SAMPLES / "drift"), "--plot"],
    "check": ["check", str(SAMPLES / "collapse"), "-k", "2", "--min", "token_entropy_norm=0.2"],
    "inspect": ["inspect", str(SAMPLES / "megatron-tpe"), str(SAMPLES / "drift")],
    "config": ["config"],
    "cache info": ["cache", "info"],
}


def test_fmt_has_no_negative_zero() -> None:
    assert fmt(-0.0) == "0.000"
    assert fmt(-0.0004) == "0.000"
    assert fmt(-0.0006) == "-0.001"
    assert fmt(-1e-12, 1) == "0.0"
    assert fmt(12345) == "12,345"
    assert signed(-0.0004) == "+0.000"
    assert signed(-0.0006) == "-0.001"
    assert signed(0) == "+0"
    assert signed(-3) == "-3"


def test_plural() -> None:
    assert plural(0, "layer") == "0 layers"
    assert plural(1, "layer") == "1 layer"
    assert plural(1, "token") == "1 token"
    assert plural(1024, "token") == "1,024 tokens"
    assert plural(2, "entry", "entries") == "2 entries"


def test_trim_line_keeps_colour_codes() -> None:
    assert trim_line("a b   ") == "a b"
    assert trim_line("\x1b[31mred  \x1b[0m \x1b[0m") == "\x1b[31mred\x1b[0m\x1b[0m"
    assert trim_line("   ") == ""


def test_trimmed_lines_holds_back_whitespace_until_the_line_goes_on() -> None:
    out = io.StringIO()
    stream = TrimmedLines(out)
    stream.write("ab  ")
    stream.write("cd  \nef \n")
    assert out.getvalue() == "ab  cd\nef\n"


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("width", ["60", "100"])
def test_text_output_is_clean(name: str, width: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No trailing whitespace, no blank last line, no -0.000, no "1 layers"."""
    monkeypatch.setenv("COLUMNS", width)
    result = runner.invoke(app, COMMANDS[name])
    assert result.exit_code in (0, 1), result.output
    lines = result.output.split("\n")
    assert lines[-1] == "", "output ends with a newline"
    assert lines[-2].strip(), "no blank last line"
    bad = [line for line in lines if line != line.rstrip()]
    assert not bad, f"trailing whitespace on {len(bad)} lines, first {bad[0]!r}"
    assert "-0.000" not in result.output
    assert not re.search(r"\b1 (layers|tokens|files|rules|experts|layer checks)\b", result.output)


def test_singular_counts_in_the_header(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    run = write_parquet_run({0: {0: dirichlet(rng, 1, 4)}, 1: {0: dirichlet(rng, 1, 4)}})
    result = runner.invoke(app, ["analyze", str(run), "-k", "1"])
    assert result.exit_code == 0, result.output
    assert "· 1 layer ·" in result.output
    assert "1 token/layer at the latest step" in result.output


def test_no_negative_zero_in_compare_deltas(write_parquet_run: WriteRun) -> None:
    """Two runs a hair apart: their deltas round to zero and print as +0.000."""
    rng = np.random.default_rng(1)
    probs = dirichlet(rng, 64, 4)
    nudged = probs * (1 + 1e-6 * rng.standard_normal(probs.shape))
    nudged /= nudged.sum(axis=1, keepdims=True)
    a = write_parquet_run({0: {0: probs}}, name="a")
    b = write_parquet_run({0: {0: nudged}}, name="b")
    result = runner.invoke(app, ["compare", str(a), str(b), "-k", "1"])
    assert result.exit_code == 0, result.output
    assert "-0.000" not in result.output
    assert "+0.000" in result.output


# --- colour ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "env", "terminal", "expected"),
    [
        ("auto", {}, True, True),
        ("auto", {}, False, False),
        ("auto", {"NO_COLOR": "1"}, True, False),
        ("auto", {"NO_COLOR": ""}, True, True),  # empty NO_COLOR does not count (no-color.org)
        ("auto", {"FORCE_COLOR": "1"}, False, True),
        ("auto", {"FORCE_COLOR": "0"}, True, False),
        ("auto", {"FORCE_COLOR": "1", "NO_COLOR": "1"}, False, False),
        ("always", {"NO_COLOR": "1"}, False, True),
        ("never", {"FORCE_COLOR": "1"}, True, False),
    ],
)
def test_use_color(
    choice: str,
    env: dict[str, str],
    terminal: bool,
    expected: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert use_color(choice, terminal) is expected


@pytest.mark.parametrize("name", ["analyze", "compare", "check", "inspect", "config", "cache info"])
def test_color_option_on_every_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    always = runner.invoke(app, [*COMMANDS[name], "--color", "always"])
    assert always.exit_code in (0, 1), always.output
    assert "\x1b[" in always.output
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR")
    forced = runner.invoke(app, COMMANDS[name])
    assert "\x1b[" in forced.output
    never = runner.invoke(app, [*COMMANDS[name], "--color", "never"])
    assert "\x1b[" not in never.output
    # colour adds codes, never words: without them the text is the same
    assert ANSI.sub("", always.output) == never.output


def test_bad_color_value_is_a_usage_error() -> None:
    result = runner.invoke(app, [*COMMANDS["analyze"], "--color", "sometimes"])
    assert result.exit_code == 2


def test_console_pads_nothing_even_in_colour() -> None:
    out = io.StringIO()
    console = make_console(out, width=40, color="always")
    console.print("[red]x[/red]", justify="center")
    assert out.getvalue().rstrip("\n") == out.getvalue().rstrip("\n").rstrip(" ")
    assert ANSI.sub("", out.getvalue()) == " " * 19 + "x\n"


# --- tables never cut a number ---------------------------------------------------------------


def test_grid_drops_decoration_then_wraps_into_sections() -> None:
    columns = [
        Column("key", key=True),
        Column("a", "right"),
        Column("b", "right"),
        Column("spark", drop=1),
    ]
    rows = [["row", "1.234567", "7.654321", "▁▂▃▄▅▆▇█"]]
    lines, kept = grid(columns, rows, width=40)
    assert kept == ["key", "a", "b", "spark"]
    assert len(lines) == 2
    lines, kept = grid(columns, rows, width=23)
    assert kept == ["key", "a", "b"]
    assert [line.plain for line in lines] == ["key         a         b", "row  1.234567  7.654321"]
    lines, kept = grid(columns, rows, width=15)
    assert [line.plain for line in lines] == [
        "key         a",
        "row  1.234567",
        "",
        "key         b",
        "row  7.654321",
    ]


NARROW = {
    "analyze": (COMMANDS["analyze"], ["0.723", "0.106", "0.092", "0.500", "6/8", "fail"]),
    "compare": (
        [*COMMANDS["compare"], "--layers", "1-2"],
        ["-0.580 ✗", "+0.357 ✗", "6/8 +6 ✗", "0.567", "0.109", "0.235"],
    ),
    "check": (
        [*COMMANDS["check"], "--max", "dead_experts=0"],
        ["0.272 < 0.500", "6 > 0", "6 layer checks of 16"],
    ),
    "inspect": (COMMANDS["inspect"], ["0–1100 (12)", "tokens-per-expert", "2,048", "48"]),
}


@pytest.mark.parametrize("name", list(NARROW))
def test_numbers_survive_60_columns(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    args, numbers = NARROW[name]
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    assert "…" not in result.output
    for number in numbers:
        assert number in result.output, number
    if name == "compare":
        # every row keeps its layer and run, in every section of the table
        rows = [line.split() for line in result.output.splitlines() if "0.1" in line]
        assert all(row[0] in {"1", "2", "healthy", "collapse"} for row in rows)
        assert result.output.count("layer  run") >= 2
    if name == "analyze":
        # the sparkline goes before any number: the table fits and says what it left out
        table = [line for line in result.output.splitlines() if "/8" in line]
        assert all(len(line) <= 60 for line in table)
        assert "▇" not in "".join(table)
        assert "trend column is left out" in " ".join(result.output.split())


def test_markdown_counts_one_layer(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(2)
    run = write_parquet_run({0: {0: dirichlet(rng, 8, 4)}, 1: {0: dirichlet(rng, 8, 4)}})
    result = runner.invoke(app, ["analyze", str(run), "-k", "1", "-f", "markdown"])
    assert result.exit_code == 0, result.output
    assert "(2 logged), 1 layer, k=1 (--top-k)." in result.output
