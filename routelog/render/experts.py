"""``routelog experts``: one layer's experts over steps, as a heatmap in the terminal.

One row per expert, one column per logged step; a cell is the expert's share relative to the
fair share 1/E (``×`` dead, blocks up to twice the fair share, bold yellow above it). Rows are
sorted so that the experts that died come first, in the order they died; with more experts
than ``rows``, the extremes are shown (the lowest and the highest final shares) and the rest
counted in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from routelog import __version__
from routelog.render import heatmap

if TYPE_CHECKING:
    import numpy as np
    from rich.console import Console

    from routelog.experts import LayerHistory

SORTS = ("death", "final", "expert")
LABEL = 12  # room for the row label ("expert 255 ")
TAIL = 26  # room for the "dead since" and "final" columns


def experts_document(
    history: list[LayerHistory], *, dead_fraction: float, metric: str = "load_share"
) -> dict[str, Any]:
    """The JSON document of ``routelog experts --format json``: per layer, per expert, lists."""
    from routelog.render.data import clean

    layers = []
    for h in history:
        experts = []
        for expert in range(h.n_experts):
            since = int(h.dead_since[expert])
            experts.append(
                {
                    "expert": expert,
                    "load_share": h.load[:, expert].tolist(),
                    "mass_share": None if h.mass is None else h.mass[:, expert].tolist(),
                    "final_load_share": float(h.load[-1, expert]),
                    "dead_since": None if since < 0 else since,
                }
            )
        layers.append(
            {"run": h.run, "layer": h.layer, "steps": h.steps.tolist(), "experts": experts}
        )
    document: dict[str, Any] = clean(
        {
            "routelog_version": __version__,
            "dead_fraction": dead_fraction,
            "metric": metric,
            "layers": layers,
        }
    )
    return document


def order_experts(h: LayerHistory, sort: str, values: np.ndarray) -> list[int]:
    """Expert ids of one layer in display order.

    ``death``: dead experts first, earliest death first, then by final share ascending;
    ``final``: by final share ascending; ``expert``: by expert id.
    """
    import numpy as np

    ids = np.arange(h.n_experts)
    final = np.nan_to_num(values[-1], nan=np.inf)
    if sort == "expert":
        return ids.tolist()  # type: ignore[no-any-return]
    if sort == "final":
        return np.lexsort((ids, final)).tolist()  # type: ignore[no-any-return]
    since = np.where(h.dead_since >= 0, h.dead_since, np.iinfo(np.int64).max)
    return np.lexsort((ids, final, since)).tolist()  # type: ignore[no-any-return]


def print_experts(
    h: LayerHistory,
    console: Console,
    *,
    dead_fraction: float,
    sort: str = "death",
    rows: int = 40,
    metric: str = "load_share",
    why: str = "",
    notes: Sequence[str] = (),
) -> None:
    """The heatmap of one layer's experts over steps, with dead-since and final columns;
    ``notes`` (what reading the run skipped, :func:`routelog.render.report.data_notes`) last."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    values = h.load if metric == "load_share" or h.mass is None else h.mass
    steps: list[int] = h.steps.tolist()
    room = max(console.width - LABEL - TAIL, 10)
    shown = _sample(len(steps), room)
    cell = max(1, min(3, room // len(shown)))
    order = order_experts(h, sort, values)
    rows = max(rows, 2)
    picked, hidden = _extremes(order, rows, h.load[-1])
    fair = 1.0 / h.n_experts
    what = "load share f_i" if metric == "load_share" else "probability mass P_i"
    header = (
        f"[bold]{escape(h.run)}[/bold]  layer {h.layer}{why} · E={h.n_experts} · "
        f"steps {steps[0]}–{steps[-1]} "
        f"({len(steps)} logged{'' if len(shown) == len(steps) else f', {len(shown)} shown'})"
    )
    console.print(header)
    console.print(Text(f"{what} per expert over steps, relative to the fair share 1/E", "bold"))
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 1))
    table.add_column("expert", justify="right", no_wrap=True)
    table.add_column(_axis(steps, shown, cell), no_wrap=True)
    table.add_column("dead since", justify="right", no_wrap=True)
    table.add_column("final", justify="right", no_wrap=True)
    gap_at = rows - rows // 4 if hidden else -1
    for position, expert in enumerate(picked):
        if position == gap_at:  # said under the table: it would widen the heatmap column
            table.add_row("…", "", "", "")
        cells = "".join(
            _cell(float(values[i, expert]), bool(h.dead[i, expert]), fair, cell) for i in shown
        )
        since = int(h.dead_since[expert])
        last = float(values[-1, expert])
        table.add_row(
            str(expert),
            cells,
            "–" if since < 0 else f"[bold red]{since}[/bold red]",
            "–" if last != last else f"{last:.3f}",
        )
    console.print(table)
    if hidden:
        console.print(Text(f"…: {hidden}", style="dim"))
    dead = int((h.dead_since >= 0).sum())
    console.print(f"{dead} of {h.n_experts} experts dead at the latest step")
    rule = heatmap.describe_dead(dead_fraction, mass=h.mass is not None)
    for line in heatmap.legend_lines(rule, console.width):
        console.print(line)
    for note in notes:
        console.print(note, style="dim", markup=False)


def _sample(n_steps: int, room: int) -> list[int]:
    """Step positions to draw, one column each: all of them, or evenly spaced with the last."""
    if n_steps <= room:
        return list(range(n_steps))
    picked = {round(i * (n_steps - 1) / (room - 1)) for i in range(room)}
    return sorted(picked)


def _extremes(order: list[int], rows: int, final: np.ndarray) -> tuple[list[int], str]:
    """At most ``rows`` experts: the first 3/4 and the last 1/4 of the order, and what is
    hidden (a count and the range of final load shares)."""
    if len(order) <= rows:
        return order, ""
    tail = rows // 4
    head = rows - tail
    middle = final[order[head : len(order) - tail]]
    hidden = (
        f"{len(middle)} more experts, final share {float(middle.min()):.3f}–"
        f"{float(middle.max()):.3f} (--rows {len(order)} shows all)"
    )
    return order[:head] + order[len(order) - tail :], hidden


def _axis(steps: list[int], shown: list[int], cell: int) -> str:
    """The step axis: the first and last step, left and right of the cell columns."""
    first, last = str(steps[shown[0]]), str(steps[shown[-1]])
    width = len(shown) * cell
    if width < len(first) + len(last) + 1:
        return "steps"
    return first + " " * (width - len(first) - len(last)) + last


def _cell(value: float, dead: bool, fair: float, width: int) -> str:
    """One step of one expert, ``width`` characters: the glyph of the layer heatmap (``×``
    dead, else a block by share relative to the fair share), so both read alike."""
    if value != value:  # NaN: no value at this step
        return " " * width
    glyph, kind = heatmap.cell(value, round(1 / fair), dead)
    style = heatmap.STYLE[kind]
    return f"[{style}]{glyph * width}[/{style}]"


def pick_layer(history: list[LayerHistory]) -> tuple[LayerHistory, str]:
    """The layer to draw when none is named: most experts dead at the latest step, else the
    highest final max share; and the reason, for the header."""
    best = max(
        history,
        key=lambda h: (int((h.dead_since >= 0).sum()), float(h.load[-1].max()), -h.layer),
    )
    if (best.dead_since >= 0).any():
        return best, " (most dead experts; --layer N for another)"
    return best, " (busiest expert; --layer N for another)"
