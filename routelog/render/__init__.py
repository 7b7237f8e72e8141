"""Render: results -> table, JSON, CSV or Markdown. The only stage that prints.

Pretty output (colour, box drawing) only when the destination is a terminal; ``NO_COLOR``
and ``--width`` are respected. JSON and CSV are written from frames, with no markup.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


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


def make_console(stream: IO[str] | None = None, *, width: int | None = None) -> Console:
    """A rich console for ``stream``: colour only on a terminal and without ``NO_COLOR``."""
    from rich.console import Console

    out = stream if stream is not None else sys.stdout
    terminal = out.isatty()
    color = terminal and "NO_COLOR" not in os.environ

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits with status 1 here, the code of a failed check; the CLI turns a
            # closed pipe into its own quiet exit instead.
            self.quiet = True
            raise BrokenPipeError

    return _Console(
        file=out,
        width=width if width is not None else (None if terminal else _pipe_width()),
        color_system="auto" if color else None,
        no_color=not color,
        force_terminal=terminal,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )
