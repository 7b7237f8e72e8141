"""Render: results -> table, JSON, CSV, Markdown or HTML. The only stage that prints.

Every text report goes through one console, built by :func:`make_console`: colour by
``--color auto|always|never``, ``NO_COLOR`` and ``FORCE_COLOR``; the width of ``--width``,
the terminal, or ``COLUMNS``; lines written without trailing whitespace. JSON and CSV are
written from frames, with no markup.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console
    from rich.segment import Segment
    from rich.text import Text


class Format(str, enum.Enum):
    """The one ``--format`` option."""

    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"
    html = "html"


class Color(str, enum.Enum):
    """The one ``--color`` option."""

    auto = "auto"
    always = "always"
    never = "never"


PIPE_WIDTH = 120
"""Width when stdout is not a terminal (a file, a pipe, CI logs) and COLUMNS is not set."""


def _pipe_width() -> int:
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


def use_color(choice: Color | str, terminal: bool) -> bool:
    """Whether to colour: ``always``/``never`` decide; with ``auto``, a non-empty
    ``NO_COLOR`` turns colour off, else ``FORCE_COLOR`` turns it on (``0`` or ``false``: off),
    else colour on a terminal only.

    Examples
    --------
    >>> use_color("always", terminal=False), use_color("never", terminal=True)
    (True, False)
    """
    choice = Color(choice)
    if choice is not Color.auto:
        return choice is Color.always
    if os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR")
    if force is not None and force != "":
        return force.lower() not in ("0", "false")
    return terminal


def make_console(
    stream: IO[str] | None = None, *, width: int | None = None, color: Color | str = Color.auto
) -> Console:
    """The console every text report prints to (see :func:`use_color` for colour)."""
    from rich.console import Console

    from routelog.render.text import TrimmedLines

    out = stream if stream is not None else sys.stdout
    terminal = out.isatty()
    colored = use_color(color, terminal)
    # Forced colour (a pipe, a CI log, TERM=dumb) gets the 16 standard colours every
    # terminal and log viewer understands.
    dumb = os.environ.get("TERM", "") in ("dumb", "unknown")
    system = ("auto" if terminal and not dumb else "standard") if colored else None
    if width is None and not terminal:
        width = _pipe_width()

    from rich.text import Text

    from routelog.errors import printable
    from routelog.render.text import inert

    class _Console(Console):
        """Strings and rich texts reach the terminal with control characters escaped (file
        and run names are data: a name holding ESC[2J must not drive the terminal); a
        closed pipe raises."""

        def render_str(self, text: str, **kwargs: Any) -> Text:
            return super().render_str(printable(text), **kwargs)

        def render(self, renderable: Any, options: Any = None) -> Iterable[Segment]:
            # every renderable, nested ones included (table cells, padding, groups), is
            # rendered through here: the one place a Text built from a name is made inert
            if isinstance(renderable, Text):
                renderable = inert(renderable, lines=True)
            return super().render(renderable, options)

        def on_broken_pipe(self) -> None:
            # rich exits with status 1 here, the code of a failed check; the CLI turns a
            # closed pipe into its own quiet exit instead.
            self.quiet = True
            raise BrokenPipeError

    return _Console(
        file=TrimmedLines(out),  # type: ignore[arg-type]
        width=width,
        # Both set, or rich takes a forced "terminal" with TERM=dumb to be 80 columns wide.
        height=None if width is None else 25,
        color_system=system,  # type: ignore[arg-type]
        no_color=not colored,
        force_terminal=colored or terminal,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )
