"""One palette for every report that draws: the HTML report, the matplotlib figures.

Colours carry meaning and are the same everywhere: layers get the categorical colours in order,
thresholds are drawn in the severity colour of the rule they belong to, and heatmaps map an
expert's share relative to the fair share 1/E on one sequential scale, with dead experts in
the fail colour and overloaded experts (more than twice the fair share) in the warn colour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

OK = "#2e7d32"
WARN = "#e69f00"
FAIL = "#c62828"
MUTED = "#6b7280"
INK = "#1f2937"
GRID = "#e5e7eb"

SEVERITY = {"ok": OK, "warn": WARN, "fail": FAIL}

LAYERS = [
    "#0072b2",
    "#d55e00",
    "#009e73",
    "#cc79a7",
    "#56b4e9",
    "#e69f00",
    "#000000",
    "#f0e442",
]
"""Okabe-Ito colours (distinguishable with colour-vision deficiencies), one per layer."""

HEAT_LOW = (247, 251, 255)
HEAT_HIGH = (8, 48, 107)
"""Ends of the sequential scale: an expert with no share is HEAT_LOW, one at the top of the
scale (HOT_RATIO times the fair share) HEAT_HIGH."""

HOT_RATIO = 2.0
"""Share / fair share above which an expert is overloaded (drawn in WARN)."""


def layer_color(index: int) -> str:
    """The colour of the ``index``-th layer's line (cycling through :data:`LAYERS`)."""
    return LAYERS[index % len(LAYERS)]


def threshold_color(label: str) -> str:
    """Threshold lines: a ``fail`` threshold in the fail colour, every other in warn."""
    return FAIL if "fail" in label or "collapse" in label else WARN


def heat_rgb(ratio: float) -> tuple[int, int, int]:
    """The colour of a share that is ``ratio`` times the fair share, on the sequential scale.

    Examples
    --------
    >>> heat_rgb(0.0), heat_rgb(2.0)
    ((247, 251, 255), (8, 48, 107))
    """
    frac = min(max(ratio / HOT_RATIO, 0.0), 1.0)
    low, high = HEAT_LOW, HEAT_HIGH
    r, g, b = (round(lo + (hi - lo) * frac) for lo, hi in zip(low, high, strict=True))
    return (r, g, b)


def hex_rgb_float(color: str) -> tuple[float, float, float]:
    """``#rrggbb`` as (r, g, b) in 0..1 (matplotlib's colour tuples)."""
    r, g, b = hex_rgb(color)
    return (r / 255, g / 255, b / 255)


def hex_rgb(color: str) -> tuple[int, int, int]:
    """``#rrggbb`` as an (r, g, b) tuple."""
    return (int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16))


CODE_TOP = 4.0
"""Share / fair share at the top cell code: ratios up to 4x are told apart, above saturate."""


def cell_codes(ratio: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """Heatmap cells as one byte each: 0 no data (NaN), 1 dead, else 2 + the ratio to the
    fair share scaled linearly from 0..CODE_TOP to 0..253 (saturating).

    Examples
    --------
    >>> import numpy as np
    >>> cell_codes(np.array([np.nan, 0.0, 2.0, 9.0]), np.array([0, 1, 0, 0])).tolist()
    [0, 1, 128, 255]
    """
    import numpy as np

    clipped = np.clip(np.nan_to_num(ratio, nan=0.0), 0, CODE_TOP)
    codes: np.ndarray = (2 + np.rint(clipped / CODE_TOP * 253)).astype(np.uint8)
    codes[dead.astype(bool)] = 1
    codes[np.isnan(ratio)] = 0
    return codes


def code_ratio(code: int) -> float:
    """The ratio to the fair share a cell code stands for (codes 2..255)."""
    return (code - 2) / 253 * CODE_TOP


def lut() -> list[str]:
    """The colour of each cell code, as ``#rrggbb``: white for no data, FAIL for dead, the
    sequential scale up to HOT_RATIO, WARN above it."""
    colors = ["#ffffff", FAIL]
    for code in range(2, 256):
        ratio = code_ratio(code)
        if ratio > HOT_RATIO:
            colors.append(WARN)
        else:
            colors.append("#{:02x}{:02x}{:02x}".format(*heat_rgb(ratio)))
    return colors
