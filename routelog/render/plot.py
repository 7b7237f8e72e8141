"""Line charts in the terminal (plotext), reusable by ``analyze --plot`` and ``compare --plot``.

Each series is drawn with its own one-character marker (``0``, ``1``, ... or a letter), so
lines stay apart without colour; threshold lines are drawn with ``-``, ``=`` and ``~``,
beneath the series (a series on a threshold stays visible). The x axis is labelled from the
first to the last step of the data. Callers split many series into panels of at most
:data:`PANEL` so that every marker in a chart is distinct and readable.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from routelog.errors import printable

MARKERS = "0123456789abcdefghijklmnopqrstuvwxyz"
THRESHOLD_MARKERS = "-=~"
MIN_WIDTH = 30
PANEL = 8
"""Most series in one chart: more lines than this overlap into noise."""


@dataclass(frozen=True)
class Series:
    """One line: its label, x (steps) and y values; missing y values are left out."""

    label: str
    x: Sequence[int | float]
    y: Sequence[float | None]
    marker: str = ""


def marker_for(index: int) -> str:
    """The marker of the ``index``-th series: 0-9, then a-z, then wrapping around."""
    return MARKERS[index % len(MARKERS)]


def panels(count: int, size: int = PANEL) -> list[range]:
    """``count`` series split into panels of at most ``size``, as even as possible.

    Examples
    --------
    >>> panels(4), panels(16), panels(20)
    ([range(0, 4)], [range(0, 8), range(8, 16)], [range(0, 7), range(7, 13), range(13, 20)])
    """
    groups = max(-(-count // size), 1)
    bounds = [round(i * count / groups) for i in range(groups + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def axis_ticks(lo: float, hi: float, most: int) -> list[float]:
    """Round ticks over [lo, hi] that always include both ends, so the labels span the data.

    A round tick too close to an end (less than half a spacing) gives way to the end.

    Examples
    --------
    >>> axis_ticks(0, 1100, 8)
    [0, 200, 400, 600, 800, 1000, 1100]
    >>> axis_ticks(20, 300, 6)
    [20, 100, 200, 300]
    """
    ticks = step_ticks(lo, hi, most)
    if hi <= lo:
        return ticks
    spacing = ticks[1] - ticks[0] if len(ticks) > 1 else hi - lo
    inner = [t for t in ticks if t - lo >= spacing / 2 and hi - t >= spacing / 2]
    return [lo, *inner, hi]


def step_ticks(lo: float, hi: float, most: int) -> list[float]:
    """At most ``most`` round tick positions (1, 2 or 5 times a power of ten) in [lo, hi].

    Examples
    --------
    >>> step_ticks(100, 300, 8)
    [100, 150, 200, 250, 300]
    """
    import math

    if hi <= lo:
        return [float(lo)]
    raw = (hi - lo) / max(most - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    spacing = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / spacing) * spacing
    count = int((hi - first) // spacing) + 1
    return [round(first + i * spacing, 10) for i in range(count)]


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    width: int,
    height: int = 14,
    thresholds: Sequence[tuple[str, float]] = (),
    ylim: tuple[float, float] | None = (0.0, 1.0),
    color: bool = False,
) -> str:
    """A chart of ``series`` as text (with ANSI colour codes when ``color``), then a legend.

    ``thresholds`` are ``(label, y)`` horizontal lines across the x range of the data.
    """
    import plotext as plt

    fig = plt.figure
    fig.clear()
    fig.theme("simple" if color else "colorless")  # no canvas background: the terminal's own
    plt.terminal.limit(False, False)
    fig.plot_size(max(width, MIN_WIDTH), height)
    xs = [float(x) for s in series for x in s.x]
    legend = []
    if xs:
        # Thresholds first: what is drawn later covers it, and the data must stay visible.
        for index, (label, y) in enumerate(thresholds):
            marker = THRESHOLD_MARKERS[index % len(THRESHOLD_MARKERS)]
            rule = fig.signal([min(xs), max(xs)], [y, y], marker=marker)
            rule.label(label)
            rule.lines()
            fig.draw(rule)
            legend.append(f"{marker} {label} ({y:g})")
    lines = []
    for index, line in enumerate(series):
        points = [(x, y) for x, y in zip(line.x, line.y, strict=True) if y is not None]
        if not points:
            continue
        marker = line.marker or marker_for(index)
        signal = fig.signal([p[0] for p in points], [p[1] for p in points], marker=marker)
        signal.label(printable(line.label))  # run names: escaped
        signal.lines()
        fig.draw(signal)
        lines.append(f"{marker} {printable(line.label)}")
    legend = lines + legend
    if xs:
        ticks = axis_ticks(min(xs), max(xs), max(2, max(width, MIN_WIDTH) // 12))
        fig.ruler("x").ticks(ticks, [f"{t:g}" for t in ticks])
    if ylim is not None:
        fig.ruler("y").lim(*ylim)
    fig.legend(False)
    fig.title(printable(title))
    chart: str = fig.build().string(colorless=not color)
    fig.clear()
    body = "\n".join(row.rstrip() for row in chart.rstrip("\n").split("\n"))
    return body + "\n" + "   ".join(legend)
