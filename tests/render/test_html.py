"""``--format html``: one self-contained file, checked as text and in headless Chromium.

The browser tests load each report in a real Chromium over the DevTools protocol
(tests/render/browser.py): no exception or console error, no network request of any kind,
every chart drawn; a screenshot goes to build/artifacts/ (git-ignored) for CI to keep.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from routelog import api, kernels
from routelog.cli import app
from routelog.config import Config
from routelog.diagnose import diagnose
from routelog.render import html
from tests.conftest import REAL_LOGS, REPO, SAMPLES
from tests.render import browser

runner = CliRunner()
ARTIFACTS = REPO / "build" / "artifacts"

needs_chromium = pytest.mark.skipif(
    browser.chromium() is None and not os.environ.get("CI"),
    reason="chromium not installed (make test installs it with apt-get)",
)

RESOURCE = re.compile(
    r"(\b(src|href|srcset|action|poster|formaction)\s*=|url\(|@import|https?:|<link|<iframe|"
    r"<object|<embed|\bfetch\(|XMLHttpRequest|WebSocket|EventSource|sendBeacon|importScripts)",
    re.IGNORECASE,
)

COUNTS = {
    "canvases": "document.querySelectorAll('canvas[data-heat]').length",
    "drawn": "document.querySelectorAll('canvas[data-drawn]').length",
    "charts": "document.querySelectorAll('svg[data-chart]').length",
    "hoverable": "document.querySelectorAll('svg[data-ready]').length",
    "lines": "document.querySelectorAll('svg[data-chart] polyline').length",
    "thresholds": "document.querySelectorAll('svg[data-chart] line.threshold').length",
    "findings": "document.querySelectorAll('li.finding').length",
    "layer_rows": "document.querySelectorAll('table.layers tbody tr').length",
    "rule_rows": "document.querySelectorAll('table.rules tbody tr').length",
    "ready": "document.body.dataset.ready || ''",
    # a drawn heatmap has coloured pixels: not all white
    "painted": (
        "Array.from(document.querySelectorAll('canvas[data-heat]')).every(function(c){"
        "var d=c.getContext('2d').getImageData(0,0,c.width,c.height).data;"
        "for(var i=0;i<d.length;i+=4){if(d[i]<240||d[i+1]<240){return true;}}return false;})"
    ),
}


def _write(args: list[str], out: Path) -> str:
    result = runner.invoke(app, [*args, "--format", "html", "-o", str(out)])
    assert result.exit_code in (0, 1), result.output
    return out.read_text(encoding="utf-8")


def _assert_offline(text: str) -> None:
    found = RESOURCE.search(text)
    assert found is None, (
        f"external resource reference: {text[found.start() - 60 : found.end() + 60]!r}"
    )


def _open(path: Path, screenshot: str) -> browser.PageLoad:
    if browser.chromium() is None:
        pytest.fail("chromium is required on CI (make test installs it)")
    page = browser.load(path, COUNTS)
    assert page.errors == [], page.errors
    assert page.requests == [], page.requests
    assert page.values["ready"] == "1"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / screenshot).write_bytes(page.screenshot)
    assert page.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    return page


def test_analyze_html_is_self_contained(tmp_path: Path) -> None:
    text = _write(["analyze", str(SAMPLES / "collapse"), "-k", "2"], tmp_path / "r.html")
    assert text.startswith("<!DOCTYPE html>")
    _assert_offline(text)
    for part in (
        "findings",
        "layers at the latest step",
        "entropy over steps",
        "load share per layer and expert at the latest step",
        "layer 3: load share of each expert over steps",
        "dead at the latest step: 2 (since 500), 3 (since 500)",
    ):
        assert part in text, part


def test_offline_check_catches_a_resource() -> None:
    """The text check is not vacuous: each kind of outside reference is caught."""
    for bad in ('<img src="x.png">', "<style>a{background:url(x.png)}</style>", "https://x"):
        with pytest.raises(AssertionError):
            _assert_offline(f"<html>{bad}</html>")


@needs_chromium
def test_analyze_html_in_chromium(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    _write(["analyze", str(SAMPLES / "collapse"), "-k", "2"], report)
    page = _open(report, "report.png")
    layers = 4
    assert page.values["canvases"] == page.values["drawn"] == layers + 1
    assert page.values["charts"] == page.values["hoverable"] == layers
    assert page.values["lines"] == 3 * layers  # H_token, H_load, H_assign per layer
    assert page.values["thresholds"] == 3 * layers
    assert page.values["findings"] == 10
    assert page.values["layer_rows"] == layers
    assert page.values["painted"] is True


@needs_chromium
def test_compare_and_check_html_in_chromium(tmp_path: Path) -> None:
    compared = tmp_path / "compare.html"
    _write(
        ["compare", f"base={SAMPLES / 'healthy'}", str(SAMPLES / "collapse"), "-k", "2"], compared
    )
    _assert_offline(compared.read_text(encoding="utf-8"))
    page = _open(compared, "compare.png")
    assert page.values["charts"] == 4
    assert page.values["lines"] == 8  # one line per run per layer
    assert page.values["layer_rows"] == 8
    assert page.values["canvases"] == page.values["drawn"] == 2 * (1 + 4)  # per run

    checked = tmp_path / "check.html"
    result = runner.invoke(
        app,
        ["check", str(SAMPLES / "collapse"), "-k", "2", "-f", "html", "-o", str(checked)],
    )
    assert result.exit_code == 1, result.output  # the collapse run fails its check
    text = checked.read_text(encoding="utf-8")
    _assert_offline(text)
    assert "FAIL" in text
    page = _open(checked, "check.png")
    assert page.values["rule_rows"] > 0
    assert page.values["drawn"] == 5


@needs_chromium
def test_browser_check_detects_errors_and_requests(tmp_path: Path) -> None:
    """The browser harness is not vacuous: a script error, a console error and a request to
    a local server the test started are all reported."""
    import http.server
    import threading

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        bad = tmp_path / "bad.html"
        port = server.server_address[1]
        bad.write_text(
            "<!DOCTYPE html><html><body><p>x</p>"
            f'<img src="http://127.0.0.1:{port}/pixel.png">'
            "<script>console.error('deliberate');</script>"
            "<script>document.body.dataset.ready='1'; notAFunction();</script>"
            "</body></html>",
            encoding="utf-8",
        )
        page = browser.load(bad, {"ready": "document.body.dataset.ready"})
    finally:
        server.shutdown()
        server.server_close()
    assert any("notAFunction" in e for e in page.errors), page.errors
    assert any("deliberate" in e for e in page.errors), page.errors
    assert any(f"127.0.0.1:{port}/pixel.png" in url for url in page.requests), page.requests
    assert hits == ["/pixel.png"]


def _big_analysis(layers: int, experts: int, steps: int) -> api.Analysis:
    """A counts-and-probabilities run of the given size, built as statistics directly."""
    rng = np.random.default_rng(0)
    n = layers * steps
    counts = rng.integers(0, 200, size=(n, experts))
    counts[: n // 2, : experts // 8] = 0  # some dead experts
    probs = rng.dirichlet(np.ones(experts), size=n) * 1000
    step = np.repeat(np.arange(steps) * 10, layers)
    layer = np.tile(np.arange(layers), steps)
    stats = pl.DataFrame(
        {
            "run": "big",
            "step": step,
            "layer": layer,
            "dataset": None,
            "n_experts": experts,
            "top_k": 8,
            "n_tokens": 1000,
            "sum_entropy": 1000 * np.log(experts) * 0.8,
            "sum_top1": 100.0,
            "n_selected": 1000,
            "sum_lse_sq": 0.0,
            "n_lse": 0,
            "sum_probs": probs,
            "counts": counts,
        }
    )
    missing = [name for name in kernels.STATS_SCHEMA if name not in stats.columns]
    stats = stats.with_columns(  # statistics this test does not need: zero
        pl.Series(name, np.zeros_like(counts) if name.endswith("counts") else np.zeros(n))
        for name in missing
    ).cast(dict(kernels.STATS_SCHEMA.items()))  # type: ignore[arg-type]
    run = api.Run("big", "big", [], [], stats, None)
    options = api.make_options(top_k=8)
    metrics = api.metrics_of([run], options)
    return api.Analysis([run], metrics, options, diagnose(metrics, Config()), Config())


def test_html_size_64_layers_256_experts_100_steps(tmp_path: Path) -> None:
    analysis = _big_analysis(64, 256, 100)
    start = time.perf_counter()
    text = html.analysis_html(analysis)
    seconds = time.perf_counter() - start
    size = len(text.encode("utf-8"))
    assert size < 4_000_000, f"{size / 1e6:.2f} MB"
    assert seconds < 30, seconds
    _assert_offline(text)
    assert text.count("data-heat=") == 65
    (tmp_path / "big.html").write_text(text, encoding="utf-8")


def test_cells_round_trip() -> None:
    """Codes: 0 missing, 1 dead, then the ratio to the fair share on a linear scale."""
    import base64

    ratio = np.array([[np.nan, 0.0, 1.0, 2.0, 4.0, 9.0]])
    dead = np.array([[False, True, False, False, False, False]])
    codes = list(base64.b64decode(html.encode_cells(ratio, dead)))
    assert codes == [0, 1, 2 + round(253 / 4), 2 + round(253 / 2), 255, 255]


@needs_chromium
@pytest.mark.skipif(not REAL_LOGS.exists(), reason="real logs not present")
def test_real_logs_report_in_chromium(tmp_path: Path) -> None:
    report = tmp_path / "real.html"
    _write(["analyze", str(REAL_LOGS / "aux-loss"), "-k", "2"], report)
    page = _open(report, "report-real.png")
    assert page.values["drawn"] == 5
    assert page.values["painted"] is True
    assert len(page.screenshot) > 20_000
