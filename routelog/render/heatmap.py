"""The layer x expert heatmap: one glyph per expert, readable from E=8 to E=256.

Each cell is a glyph for the expert's share relative to the fair share 1/E, so the map
means the same at any E and without colour: ``×`` dead, ``▁ ▂ ▃ ▄`` below, near and above
fair, ``▆ █`` dominant (more than twice, more than four times the fair share). Colour
repeats what the glyph says (red dead, yellow dominant). Small E gets spaced cells under
their expert numbers; large E gets dense one-character cells in groups of 8 under a
ruler, and when a row does not fit the width, the experts wrap into blocks (0–63,
64–127, ...), each with its ruler.

What the cells show (which share) and which experts are dead are the caller's: the map is
a function of the per-layer share lists, the dead masks and the words of the legend.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.text import Text

DEAD_GLYPH = "×"
LEVELS = (0.5, 0.8, 1.25, 2.0, 4.0)
"""Upper bounds (included) of share / fair share for the glyphs of :data:`GLYPHS`."""
GLYPHS = "▁▂▃▄▆█"
DOMINANT = 2.0
"""A share above this multiple of the fair share is dominant (``▆``, ``█``)."""
STYLE = {"dead": "bold red", "dominant": "bold yellow", "other": "green"}
GROUP = 8  # dense cells come in groups of 8 experts, one space apart
SPACED, VALUES = 3, 7  # cell widths: glyph under its expert number; glyph and share


@dataclass(frozen=True)
class HeatRow:
    """One row of the map: its label (``layer 3``), each expert's share and dead mark."""

    label: str
    shares: Sequence[float] | None
    dead: Sequence[bool] = ()


def cell(share: float, n_experts: int, dead: bool) -> tuple[str, str]:
    """The glyph of one expert and its kind (``dead``, ``dominant`` or ``other``).

    Examples
    --------
    >>> cell(0.125, 8, False), cell(0.5, 8, False), cell(0.0, 8, True)
    (('▃', 'other'), ('▆', 'dominant'), ('×', 'dead'))
    """
    if dead:
        return DEAD_GLYPH, "dead"
    ratio = share * n_experts
    glyph = GLYPHS[bisect.bisect_left(LEVELS, ratio)]
    return glyph, "dominant" if ratio > DOMINANT else "other"


def describe_dead(dead_fraction: float, *, mass: bool) -> str:
    """What makes a cell dead, in the legend's words: few tokens, or (with probabilities)
    little mass (``kernels.dead_mask``)."""
    of = "of the tokens or of the mass" if mass else "of the tokens"
    return f"< {dead_fraction:g} of the fair share {of}"


def legend_lines(rule: str, width: int, note: str = "") -> list[Text]:
    """The legend, wrapped between items to ``width`` (an item is never split)."""
    from rich.text import Text

    return [Text(line, style="dim") for line in _wrap(legend(rule, note), width)]


def legend(dead_rule: str, note: str = "") -> list[str]:
    """The legend's items: what each glyph means (the same words with or without colour)."""
    return [
        "share / fair share 1/E:",
        f"{DEAD_GLYPH} dead ({dead_rule})",
        "▁ ≤ 0.5",
        "▂ ≤ 0.8",
        "▃ ≤ 1.25",
        "▄ ≤ 2",
        "▆ > 2 dominant",
        "█ > 4 dominant",
        *([note] if note else []),
    ]


def _wrap(items: list[str], width: int) -> list[str]:
    """Items joined by two spaces into lines of at most ``width``; an item is never split."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += "  " + item
        else:
            lines.append(item)
    return lines


def _layout(n_experts: int, room: int, values: bool) -> tuple[str, int]:
    """The mode (``values``, ``spaced`` or ``dense``) and the experts per block."""
    if values:
        return "values", max(room // VALUES, 1)
    if n_experts * SPACED <= room and n_experts <= 32:
        return "spaced", n_experts
    groups = max((room + 1) // (GROUP + 1), 1)
    return "dense", groups * GROUP


def heatmap(
    rows: Sequence[HeatRow],
    *,
    n_experts: int,
    width: int,
    title: str,
    dead_rule: str,
    note: str = "",
    values: bool = False,
) -> list[Text]:
    """The map as lines of rich text: the title, per block a ruler and one line per row,
    then the legend wrapped to ``width`` (``note`` ends it).

    ``n_experts`` is the widest row's E; a row with fewer experts ends early, a row
    without shares says so.
    """
    from rich.text import Text

    label_width = max((len(row.label) for row in rows), default=0) + 2
    mode, most = _layout(n_experts, width - label_width, values)
    blocks = math.ceil(n_experts / most) if n_experts else 1
    size = math.ceil(n_experts / blocks) if n_experts else 0
    if mode == "dense":
        size = math.ceil(size / GROUP) * GROUP

    lines = [Text(title, style="bold")]
    for start in range(0, max(n_experts, 1), max(size, 1)):
        experts = range(start, min(start + size, n_experts))
        if start:
            lines.append(Text(""))
        lines.append(Text((" " * label_width + _ruler(experts, mode)).rstrip()))
        for row in rows:
            line = Text(row.label.ljust(label_width))
            if row.shares is None:
                line.append("no tokens", style="dim")
            else:
                e = len(row.shares)
                for position, expert in enumerate(experts):
                    if expert >= e:
                        break
                    dead = bool(row.dead[expert]) if expert < len(row.dead) else False
                    glyph, kind = cell(row.shares[expert], e, dead)
                    text = _cell_text(glyph, row.shares[expert], mode)
                    if mode == "dense" and position and position % GROUP == 0:
                        line.append(" ")
                    line.append(text, style=STYLE[kind])
            line.rstrip()
            lines.append(line)
    lines.extend(legend_lines(dead_rule, width, note))
    return lines


def _cell_text(glyph: str, share: float, mode: str) -> str:
    if mode == "values":
        return f" {glyph}{share:.3f}"
    if mode == "spaced":
        return f" {glyph} "
    return glyph


def _ruler(experts: range, mode: str) -> str:
    """Expert numbers over the cells: every expert (spaced, values) or every group of 8."""
    if mode == "values":
        return "".join(f"{e:>{VALUES}}" for e in experts)
    if mode == "spaced":
        return "".join(f"{e:^{SPACED}}" for e in experts)
    out = ""
    for e in experts:
        if (e - experts.start) % GROUP == 0:
            out += f"{e:<{GROUP + 1}}"
    return out
