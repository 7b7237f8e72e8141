"""Words and numbers of the text reports: one number formatter, one plural helper, and a
table layout that never truncates a number.

Every renderer formats numbers with :func:`fmt` (or :func:`signed` for deltas), counts with
:func:`plural`, and lays out its tables with :func:`grid`: when a table is wider than the
console, decoration columns go first (sparklines, codes), then the table wraps into
sections that repeat its key columns. No cell is ever cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.text import Text

MISSING = "–"
"""A missing value (null) in a table cell."""


def inert(text: str | Text, *, lines: bool = False) -> Text:
    """``text`` as rich text whose control characters are shown as escapes (see
    :func:`routelog.errors.printable`), its styles kept on the characters they styled.

    A name is data: an ESC in a run name must not drive the terminal, a newline must not
    split a table cell. ``lines`` keeps newlines (a multi-line renderable built on
    purpose); the console applies that to every text it prints, the table layout the
    strict form to every cell.
    """
    from rich.text import Span, Text

    from routelog.errors import printable

    rich = text if isinstance(text, Text) else Text(text)
    plain = rich.plain
    pieces = plain.split("\n") if lines else [plain]
    if all(printable(piece) == piece for piece in pieces):
        return rich
    # where each original character starts in the escaped text, for the spans
    starts = [0]
    for char in plain:
        starts.append(starts[-1] + len(char if lines and char == "\n" else printable(char)))
    out = Text(
        "\n".join(printable(piece) for piece in pieces),
        style=rich.style,
        justify=rich.justify,
        overflow=rich.overflow,
        no_wrap=rich.no_wrap,
        end=rich.end,
    )
    out.spans = [Span(starts[span.start], starts[span.end], span.style) for span in rich.spans]
    return out


def fmt(value: float | int | None, digits: int = 3) -> str:
    """A number for a table cell: ints with thousands separators, floats with ``digits``
    decimals and never a negative zero; missing values print as an en dash.

    Examples
    --------
    >>> fmt(2048), fmt(0.12345), fmt(-0.0001), fmt(None)
    ('2,048', '0.123', '0.000', '–')
    """
    if value is None:
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    text = f"{value:.{digits}f}"
    return text[1:] if _is_negative_zero(text) else text


def signed(value: float | int | None, digits: int = 3) -> str:
    """A delta with its sign (``+0.017``, ``-0.580``, ``+2``); a delta that rounds to zero
    is ``+0.000``, never ``-0.000``.

    Examples
    --------
    >>> signed(0.0171), signed(-0.58), signed(2), signed(-0.0002)
    ('+0.017', '-0.580', '+2', '+0.000')
    """
    if value is None:
        return ""
    if isinstance(value, int):
        return f"{value:+,d}"
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if _is_negative_zero(text) else text


def _is_negative_zero(text: str) -> bool:
    return text.startswith("-") and not text.strip("-+0.")


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and the noun, in the singular for exactly one.

    Examples
    --------
    >>> plural(1, "layer"), plural(4, "layer"), plural(2048, "token"), plural(1, "entry", "entries")
    ('1 layer', '4 layers', '2,048 tokens', '1 entry')
    """
    word = noun if count == 1 else (many if many is not None else noun + "s")
    return f"{count:,} {word}"


# --- trailing whitespace -----------------------------------------------------------------------

_ANSI = r"\x1b\[[0-9;]*m"
_TRAILING = re.compile(rf"(?:[ \t]|{_ANSI})+$")


def trim_line(line: str) -> str:
    """``line`` without trailing spaces, also where they hide before closing colour codes.

    Examples
    --------
    >>> trim_line("ok  "), trim_line("\\x1b[1mok  \\x1b[0m  ")
    ('ok', '\\x1b[1mok\\x1b[0m')
    """
    return _TRAILING.sub(lambda match: "".join(re.findall(_ANSI, match.group())), line)


class TrimmedLines:
    """A text stream that writes each line without its trailing whitespace.

    rich pads table cells and wrapped text to the console width; the padding is noise in a
    file, a diff or a CI log, so the console writes through this wrapper. Whitespace at the
    end of an unfinished line is held back until the line continues.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._pending = ""

    def write(self, chunk: str) -> int:
        text = self._pending + chunk
        *lines, rest = text.split("\n")
        out = "".join(trim_line(line) + "\n" for line in lines)
        kept = trim_line(rest)
        if kept:
            # An unfinished line: write what it has, hold back only its trailing whitespace.
            out += kept
            self._pending = rest[len(kept) :] if rest.startswith(kept) else ""
        else:
            self._pending = rest
        if out:
            self._stream.write(out)
        return len(chunk)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


# --- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a :func:`grid`.

    ``drop``: 0 for a column that must stay (numbers); decoration columns get 1, 2, ...
    and the highest number is dropped first when the table is too wide. ``wrap``: a column
    of words (never numbers) whose cells may wrap onto more lines. ``key`` columns (layer,
    run, file) are repeated in every section when the table wraps.
    """

    header: str
    justify: Literal["left", "right"] = "left"
    drop: int = 0
    key: bool = False
    wrap: bool = False


def grid(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str | Text]],
    *,
    width: int,
    gap: int = 2,
) -> tuple[list[Text], list[str]]:
    """Lay out a table in ``width`` columns without truncating a cell.

    Decoration columns are dropped first (highest ``drop`` first) until the table fits;
    then ``wrap`` columns wrap their words; if it still does not fit, it wraps into
    sections of the remaining columns, each repeating the key columns, separated by a blank
    line. Returns the lines and the headers kept.
    """
    import textwrap

    from rich.cells import cell_len
    from rich.text import Text

    cells = [[inert(c) for c in row] for row in rows]
    widths = [
        max([cell_len(col.header), *(row[i].cell_len for row in cells)])
        for i, col in enumerate(columns)
    ]
    kept = list(range(len(columns)))

    def span(indexes: Sequence[int]) -> int:
        return sum(widths[i] for i in indexes) + gap * max(len(indexes) - 1, 0)

    while span(kept) > width:
        droppable = [i for i in kept if columns[i].drop > 0]
        if not droppable:
            break
        kept.remove(max(droppable, key=lambda i: (columns[i].drop, i)))
    for i in (i for i in kept if columns[i].wrap):
        excess = span(kept) - width
        if excess <= 0:
            break
        words = [len(w) for row in cells for w in row[i].plain.split()]
        widths[i] = max([widths[i] - excess, cell_len(columns[i].header), *words])
    wrapped = [
        [
            [Text(part, style=c.style) for part in textwrap.wrap(c.plain, widths[i]) or [""]]
            if columns[i].wrap
            else [c]
            for i, c in enumerate(row)
        ]
        for row in cells
    ]
    keys = [i for i in kept if columns[i].key]
    sections: list[list[int]] = []
    current: list[int] = []
    for index in (i for i in kept if not columns[i].key):
        if current and span(sorted([*keys, *current, index])) > width:
            sections.append(current)
            current = []
        current.append(index)
    sections.append(current)

    lines: list[Text] = []
    for number, section in enumerate(sections):
        shown = sorted([*keys, *section])
        if number:
            lines.append(Text(""))
        header = [Text(columns[i].header, style="bold") for i in shown]
        body = [
            [row[i][depth] if depth < len(row[i]) else Text("") for i in shown]
            for row in wrapped
            for depth in range(max(len(row[i]) for i in shown))
        ]
        for line in [header, *body]:
            out = Text()
            for position, (i, cell) in enumerate(zip(shown, line, strict=True)):
                pad = " " * (widths[i] - cell.cell_len)
                if position:
                    out.append(" " * gap)
                if columns[i].justify == "right":
                    out.append(pad)
                out.append_text(cell)
                if columns[i].justify == "left":
                    out.append(pad)
            out.rstrip()
            lines.append(out)
    return lines, [columns[i].header for i in kept]
