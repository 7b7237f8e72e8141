"""Every console example of the README is run and its text compared, so the README cannot
drift from what routelog prints.

An example is a fenced ``console`` block right after a ``<!-- routelog-example -->`` line.
In it, ``$ routelog ...`` lines are commands and the lines under each are its output
(stdout and stderr, no colour, 100 columns); ``$ echo $?`` followed by a number states the
previous command's exit code (0 unless stated, or ``# exit N`` after a command); ``> FILE``
at the end of a command writes its output to FILE instead. Commands run in a fresh
directory holding ``sample_logs`` (a link to the checkout's), with ``HOME`` shown as
``/home/me`` and the cache under it.

After an intended change of output, rewrite every example with ``make readme``
(``ROUTELOG_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_readme.py``) and
review the diff.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from tests.conftest import REPO, SAMPLES

runner = CliRunner()
README = REPO / "README.md"
MARKER = "<!-- routelog-example -->"
BLOCK = re.compile(
    r"(?P<head><!-- routelog-example -->\n```console\n)(?P<body>.*?)(?=^```$)", re.S | re.M
)
EXTRAS = {"$ routelog plot ": "matplotlib", "--tensorboard": "tensorboard"}
"""Examples that need an optional extra, by what their command holds."""
EXIT = re.compile(r"\s+# exit (\d+)$")
HOME = "/home/me"


@dataclass
class Step:
    """One command of an example: its line, expected output and exit code."""

    line: str
    output: str
    exit_code: int = 0
    exit_stated: str = ""  # "echo" when a `$ echo $?` line states it, "comment" for "# exit N"


def parse(body: str) -> list[Step]:
    steps: list[Step] = []
    lines = body.split("\n")[:-1] if body.endswith("\n") else body.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line == "$ echo $?":
            steps[-1].exit_code = int(lines[index])
            steps[-1].exit_stated = "echo"
            index += 1
            continue
        assert line.startswith("$ routelog "), f"README example: not a routelog command: {line}"
        step = Step(line[2:], "")
        stated = EXIT.search(step.line)
        if stated:
            step.exit_code, step.exit_stated = int(stated.group(1)), "comment"
        output = []
        while index < len(lines) and not lines[index].startswith("$ "):
            output.append(lines[index])
            index += 1
        step.output = "".join(f"{text}\n" for text in output)
        steps.append(step)
    return steps


def render(steps: list[Step]) -> str:
    out = []
    for step in steps:
        out.append(f"$ {step.line}\n{step.output}")
        if step.exit_stated == "echo":
            out.append(f"$ echo $?\n{step.exit_code}\n")
    return "".join(out)


def run(step: Step, home: Path) -> Step:
    """Run one command as a user would in the example's directory; the step it gives."""
    command = EXIT.sub("", step.line)
    target = None
    if " > " in command:
        command, target = command.rsplit(" > ", 1)
    args = shlex.split(command)
    assert args[0] == "routelog"
    result = runner.invoke(app, args[1:])
    text = result.output.replace(str(home), HOME)
    if target is not None:
        Path(target).write_text(text, encoding="utf-8")
        text = ""
    return Step(step.line, text, result.exit_code, step.exit_stated)


def examples() -> list[str]:
    return [match.group("body") for match in BLOCK.finditer(README.read_text(encoding="utf-8"))]


@pytest.fixture
def example_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory with ``sample_logs``, and a fresh home holding the cache."""
    (tmp_path / "sample_logs").symlink_to(SAMPLES, target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ROUTELOG_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    return home


def test_readme_has_examples() -> None:
    assert len(examples()) >= 8


def test_every_console_example_is_checked() -> None:
    """A console block that shows a `$ routelog` command must be a checked example."""
    text = README.read_text(encoding="utf-8")
    for match in re.finditer(r"^([^\n]*)\n```console\n(.*?)^```$", text, re.S | re.M):
        if re.search(r"^\$ routelog ", match.group(2), re.M):
            assert match.group(1) == MARKER, f"unchecked README example: {match.group(2)[:80]}"


@pytest.mark.parametrize("number", range(len(examples())))
def test_readme_example(number: int, example_dir: Path) -> None:
    body = examples()[number]
    for needle, module in EXTRAS.items():  # make test-min runs without the optional worlds
        if needle in body and importlib.util.find_spec(module) is None:
            pytest.skip(f"the example needs {module}")
    expected = parse(body)
    actual = [run(step, example_dir) for step in expected]
    produced = render(actual)
    if os.environ.get("ROUTELOG_UPDATE_SNAPSHOTS"):
        _rewrite(number, produced)
        return
    for want, got in zip(expected, actual, strict=True):
        assert got.exit_code == want.exit_code, (want.line, got.output)
    assert produced == body, "README example differs from the output: run `make readme`"


def _rewrite(number: int, body: str) -> None:
    text = README.read_text(encoding="utf-8")
    match = list(BLOCK.finditer(text))[number]
    README.write_text(text[: match.start("body")] + body + text[match.end("body") :], "utf-8")
