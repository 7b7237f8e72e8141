"""The layer x expert heatmap at E=8, 64 and 256 and 60, 100 and 200 columns
(routelog/render/heatmap.py). Snapshots in tests/render/snapshots/heatmap_E*_W*.txt."""

from __future__ import annotations

import numpy as np
import pytest

from routelog.render.heatmap import GLYPHS, HeatRow, cell, heatmap
from tests.render.test_report import check_snapshot


def _rows(n_experts: int, layers: int = 4) -> list[HeatRow]:
    """Layer 0 balanced; layer 1 random; layer 2 half dead; layer 3 two dominant experts."""
    rng = np.random.default_rng(n_experts)
    rows = []
    for layer in range(layers):
        if layer % 4 == 0:
            shares = np.full(n_experts, 1 / n_experts)
        elif layer % 4 == 1:
            shares = rng.dirichlet(np.full(n_experts, 4.0))
        elif layer % 4 == 2:
            shares = np.where(np.arange(n_experts) % 2 == 0, 2.0 / n_experts, 0.0)
        else:
            shares = np.full(n_experts, 0.2 / (n_experts - 2))
            shares[[1, n_experts - 1]] = 0.4
        dead = list(shares < 0.1 / n_experts)
        rows.append(HeatRow(f"layer {layer}", [float(s) for s in shares], dead))
    return rows


def _render(n_experts: int, width: int, values: bool = False) -> str:
    lines = heatmap(
        _rows(n_experts),
        n_experts=n_experts,
        width=width,
        title="load share f_i per expert at the latest step",
        dead_rule="< 0.1 of the fair share",
        values=values,
    )
    return "\n".join(line.plain for line in lines) + "\n"


@pytest.mark.parametrize("n_experts", [8, 64, 256])
@pytest.mark.parametrize("width", [60, 100, 200])
def test_heatmap_snapshot(n_experts: int, width: int) -> None:
    text = _render(n_experts, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    assert all(line == line.rstrip() for line in lines)
    body = [line for line in lines if line.startswith("layer ")]
    # layer 2: every other expert dead, the rest at exactly twice the fair share (not dominant)
    layer2 = "".join(line[len("layer 2") :] for line in body if line.startswith("layer 2"))
    assert set(layer2.replace(" ", "")) == {"×", "▄"}
    # every expert has one glyph whatever the width: a layer's glyphs over all blocks are
    # its experts in order
    for layer in range(4):
        rows = [line for line in body if line.startswith(f"layer {layer}")]
        glyphs = "".join(c for row in rows for c in row[len("layer 0") :] if c in GLYPHS + "×")
        assert len(glyphs) == n_experts
        expected = [
            cell(s, n_experts, d)[0] for s, d in zip(*_share_dead(n_experts, layer), strict=True)
        ]
        assert glyphs == "".join(expected)
    check_snapshot(f"heatmap_E{n_experts}_W{width}.txt", text)


def _share_dead(n_experts: int, layer: int) -> tuple[list[float], list[bool]]:
    row = _rows(n_experts)[layer]
    assert row.shares is not None
    return list(row.shares), list(row.dead)


def test_dense_cells_stay_apart_at_e64_and_100_columns() -> None:
    """At E=64 in 100 columns each expert is one character, in groups of 8 under a ruler."""
    lines = _render(64, 100).splitlines()
    ruler = lines[1]
    assert ruler.split() == [str(e) for e in range(0, 64, 8)]
    balanced = next(line for line in lines if line.startswith("layer 0"))
    assert balanced.split()[2:] == ["▃" * 8] * 8


def test_e256_wraps_into_blocks_with_their_own_ruler() -> None:
    lines = _render(256, 100).splitlines()
    rulers = [line for line in lines if line.strip().split()[:1] and line.startswith(" ")]
    starts = [int(line.split()[0]) for line in rulers]
    assert starts == [0, 64, 128, 192]


def test_dominant_and_dead_marked_without_colour() -> None:
    assert cell(0.5, 8, False) == ("▆", "dominant")  # 4x fair
    assert cell(0.6, 8, False) == ("█", "dominant")  # 4.8x fair
    assert cell(0.3, 8, False) == ("▆", "dominant")  # 2.4x fair
    assert cell(0.25, 8, False) == ("▄", "other")  # exactly 2x fair: not more than twice
    assert cell(0.125, 8, False) == ("▃", "other")
    assert cell(0.001, 8, True) == ("×", "dead")
    text = _render(8, 100)
    assert "▆ > 2 dominant" in text
    assert "█ > 4 dominant" in text
    assert "× dead (< 0.1 of the fair share)" in text


def test_values_mode_keeps_the_glyph_next_to_the_number() -> None:
    text = _render(8, 100, values=True)
    assert "×0.000" in text
    assert "▆0.400" in text


def test_report_heatmap_marks_dominant_experts_without_colour() -> None:
    """NO_COLOR loses nothing: the collapsed layers' two busy experts carry a glyph the
    legend names as dominant (before, only bold yellow marked them). The map shows the
    probability mass share: expert 0 holds over half of it (more than 4x the fair share)."""
    from typer.testing import CliRunner

    from routelog.cli import app
    from tests.conftest import SAMPLES

    result = CliRunner().invoke(app, ["analyze", str(SAMPLES / "collapse"), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "bold yellow" not in result.output
    layer2 = [line for line in result.output.splitlines() if line.startswith("layer 2 ")]
    assert layer2[-1].split()[2:] == ["█", "▆", "×", "×", "×", "×", "×", "×"]
    assert "▆ > 2 dominant" in result.output
    assert "█ > 4 dominant" in result.output


def test_rows_of_other_widths_and_without_shares() -> None:
    """A layer with fewer experts ends early; a layer without shares says so."""
    rows = [
        HeatRow("layer 0", [0.25] * 4, [False] * 4),
        HeatRow("layer 1", [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [False, False, *[True] * 6]),
        HeatRow("layer 2", None),
    ]
    lines = [
        line.plain
        for line in heatmap(rows, n_experts=8, width=80, title="t", dead_rule="< 0.1 of fair")
    ]
    assert lines[2].split() == ["layer", "0", "▃", "▃", "▃", "▃"]
    assert lines[3].split() == ["layer", "1", "▆", "▆", *["×"] * 6]
    assert lines[4].split() == ["layer", "2", "no", "tokens"]
