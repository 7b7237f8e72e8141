"""``routelog plot``: matplotlib figures in PNG, SVG and PDF, checked for size and content."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.render import palette
from tests.conftest import REPO, SAMPLES

pytest.importorskip("matplotlib")

runner = CliRunner()


def _plot(out: Path, *args: str) -> None:
    result = runner.invoke(
        app, ["plot", str(SAMPLES / "collapse"), "-k", "2", "-o", str(out), *args]
    )
    assert result.exit_code == 0, result.output


def _pixels(path: Path) -> np.ndarray:
    from matplotlib import image

    pixels: np.ndarray = image.imread(str(path))[..., :3]
    return pixels


def test_png_is_a_real_figure(tmp_path: Path) -> None:
    out = tmp_path / "fig.png"
    _plot(out, "--dpi", "100")
    assert out.stat().st_size > 30_000
    pixels = _pixels(out)
    height, width, _ = pixels.shape
    assert width >= 600
    assert height >= 4 * 200
    assert float(pixels.var()) > 0.01, "blank image"
    # the heatmap colours of the palette are in the picture: dead red, overloaded orange
    for color in (palette.FAIL, palette.WARN):
        rgb = np.array(palette.hex_rgb(color)) / 255
        close = np.abs(pixels - rgb).max(axis=2) < 0.02
        assert close.mean() > 0.005, color


def test_svg_and_pdf(tmp_path: Path) -> None:
    svg, pdf = tmp_path / "fig.svg", tmp_path / "fig.pdf"
    _plot(svg)
    _plot(pdf)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    paths = [e for e in root.iter() if e.tag.endswith("path")]
    assert len(paths) > 100
    text = svg.read_text(encoding="utf-8")
    assert palette.layer_color(0) in text  # token entropy line in the palette's first colour
    head = pdf.read_bytes()
    assert head.startswith(b"%PDF-")
    assert pdf.stat().st_size > 10_000


def test_grid_and_per_layer(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    _plot(grid, "--kind", "entropy", "--dpi", "80")
    h, w, _ = _pixels(grid).shape
    assert w > h  # four entropy panels in one row
    per = tmp_path / "each.png"
    _plot(per, "--per-layer", "--dpi", "80", "--layers", "2,3")
    written = sorted(p.name for p in tmp_path.glob("each_layer*.png"))
    assert written == ["each_layer02.png", "each_layer03.png"]
    assert float(_pixels(tmp_path / "each_layer02.png").var()) > 0.01


def test_bad_suffix_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plot", str(SAMPLES / "collapse"), "-o", str(tmp_path / "f.gif")])
    assert result.exit_code == 2
    assert "routelog plot writes .png, .svg or .pdf, not '.gif'" in result.output


def test_missing_extra_names_the_install(tmp_path: Path) -> None:
    """With matplotlib blocked, one line says what to install (exit 2, no traceback)."""
    probe = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        f"sys.argv = ['routelog', 'plot', {str(SAMPLES / 'collapse')!r}, '-o', "
        f"{str(tmp_path / 'f.png')!r}]\n"
        "from routelog.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "routelog: error: routelog plot needs the plot extra (matplotlib is not installed): "
        "pip install 'routelog[plot]'"
    )


def _with_a_bad_row(tmp_path: Path) -> Path:
    """The collapsing sample plus one JSONL file with a good and a bad line, no k stated."""
    run = tmp_path / "run"
    run.mkdir()
    for file in (SAMPLES / "collapse").glob("*.parquet"):
        (run / file.name).symlink_to(file)
    good = '{"step": 1200, "layer": 0, "probs": [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}'
    (run / "step_001200.jsonl").write_text(f'{good}\n{{"step": 1200, "layer": 0, "probs": 1}}\n')
    return run


def test_plot_says_what_reading_left_out(tmp_path: Path) -> None:
    """A figure cannot say it: stderr does, as the text reports do."""
    run = _with_a_bad_row(tmp_path)
    out = tmp_path / "fig.svg"
    result = runner.invoke(app, ["plot", str(run), "-o", str(out), "--skip-bad-rows"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"wrote {out}",
        "run: k=1 (assumed: the logs do not say; pass --top-k)",
        "run: 1 bad row skipped (--skip-bad-rows)",
    ]
