"""--plot charts (routelog/render/plot.py): thresholds beneath the data, one marker per
layer with 16 layers, the x axis labelled to the last step."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from routelog.cli import app
from routelog.render.plot import Series, axis_ticks, line_chart, panels
from tests.conftest import WriteRun, dirichlet

runner = CliRunner()


def test_threshold_is_drawn_beneath_a_series_on_it() -> None:
    """A series lying on a threshold line stays visible (layer 0 of the real collapse run
    sat under the rigidity line and never appeared)."""
    chart = line_chart(
        [Series("layer 0", [0, 100, 200], [0.15, 0.15, 0.15], "0")],
        title="t",
        width=60,
        height=10,
        thresholds=[("rigidity", 0.15)],
    )
    body = chart.splitlines()[:-1]
    assert any("0000" in line for line in body)
    assert not any("----" in line for line in body)


def test_x_axis_is_labelled_up_to_the_last_step() -> None:
    assert axis_ticks(0, 1100, 8)[-1] == 1100
    assert axis_ticks(20, 300, 6)[0] == 20
    chart = line_chart([Series("a", [0, 550, 1100], [0.1, 0.5, 0.9])], title="t", width=60)
    labels = chart.splitlines()[-2]
    assert labels.split()[0] == "0"
    assert labels.split()[-1] == "1100"


def test_panels() -> None:
    assert panels(16) == [range(0, 8), range(8, 16)]
    assert panels(3) == [range(0, 3)]
    assert sum(len(p) for p in panels(37)) == 37


def test_sixteen_layers_each_get_their_own_marker(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    run = write_parquet_run(
        {step: {layer: dirichlet(rng, 32, 4) for layer in range(16)} for step in (0, 10)}
    )
    result = runner.invoke(app, ["analyze", str(run), "-k", "1", "--plot", "--width", "100"])
    assert result.exit_code == 0, result.output
    legends = [
        line for line in result.output.splitlines() if "layer 0 " in line or "layer 8" in line
    ]
    legends = [line for line in legends if line.split()[:2] in (["0", "layer"], ["8", "layer"])]
    markers = []
    for line in legends[:2]:  # the token entropy chart: two panels of 8 layers
        items = line.split("   ")
        markers += [item.split()[0] for item in items if " layer " in f" {item}"]
    assert markers == list("0123456789abcdef")
    assert "token entropy (normalised) over steps (layers 0–7)" in result.output
    assert "token entropy (normalised) over steps (layers 8–15)" in result.output
