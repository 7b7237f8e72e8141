"""Render: results -> table, JSON, CSV or Markdown. The only stage that prints.

Pretty output (colour, box drawing) only when the destination is a terminal; ``NO_COLOR``
and ``--width`` are respected. JSON and CSV are written from frames, with no markup.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


class Format(str, enum.Enum):
    """The one ``--format`` option."""

    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


PIPE_WIDTH = 120
"""Width when stdout is not a terminal (a file, a pipe, CI logs) and COLUMNS is not set."""


def _pipe_width() -> int:
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


def _console_class() -> type[Console]:
    """A rich Console whose strings reach the terminal with control characters escaped: file
    and run names are data, and a name holding ESC[2J must not drive the terminal."""
    from rich.console import Console

    from routelog.errors import printable

    class SafeConsole(Console):
        def render_str(self, text: str, **kwargs: Any) -> Text:
            return super().render_str(printable(text), **kwargs)

    return SafeConsole


def make_console(stream: IO[str] | None = None, *, width: int | None = None) -> Console:
    """A rich console for ``stream``: colour only on a terminal and without ``NO_COLOR``."""
    out = stream if stream is not None else sys.stdout
    terminal = out.isatty()
    color = terminal and "NO_COLOR" not in os.environ
    return _console_class()(
        file=out,
        width=width if width is not None else (None if terminal else _pipe_width()),
        color_system="auto" if color else None,
        no_color=not color,
        force_terminal=terminal,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )
