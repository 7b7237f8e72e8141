"""The Python API as a user meets it: routelog.analyze / compare / check, findings as a frame,
short reprs, the terminal report as a string, dir(routelog), lazy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import routelog
from routelog.cli import app
from routelog.errors import UsageError
from tests.conftest import REPO, SAMPLES

runner = CliRunner()
COLLAPSE = SAMPLES / "collapse"
HEALTHY = SAMPLES / "healthy"


@pytest.fixture(scope="module")
def collapse() -> routelog.Analysis:
    return routelog.analyze(str(COLLAPSE), top_k=2)


def test_analyze_takes_one_path_or_a_list(collapse: routelog.Analysis) -> None:
    assert [r.name for r in collapse.runs] == ["collapse"]
    from_path = routelog.analyze(COLLAPSE, top_k=2)
    from_list = routelog.analyze([str(COLLAPSE)], top_k=2)
    assert from_path.metrics.equals(collapse.metrics)
    assert from_list.metrics.equals(collapse.metrics)
    named = routelog.analyze(f"mine={COLLAPSE}", top_k=2)
    assert named.runs[0].name == "mine"


def test_analyze_reads_the_configuration_the_cli_reads(tmp_path: Path) -> None:
    """routelog.toml in the current directory (the test's own project) applies to both."""
    (tmp_path / "routelog.toml").write_text("top_k = 2\nrules = ['collapse']\n")
    api = routelog.analyze(COLLAPSE)
    assert set(api.metrics["top_k"].to_list()) == {2}
    assert {f.code for f in api.findings} == {"collapse"}
    cli = runner.invoke(app, ["analyze", str(COLLAPSE), "--format", "json"])
    assert cli.exit_code == 0, cli.output
    import json

    document = json.loads(cli.output)
    assert {f["code"] for f in document["findings"]} == {"collapse"}
    assert len(document["findings"]) == len(api.findings)


def test_analyze_takes_config_as_a_file_or_a_value(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "gate.toml"
    path.parent.mkdir()
    path.write_text("rules = ['rigidity']\n")
    from_file = routelog.analyze(COLLAPSE, top_k=2, config=path)
    assert {f.code for f in from_file.findings} == {"rigidity"}
    assert routelog.analyze(COLLAPSE, top_k=2, config=from_file.config).findings == (
        from_file.findings
    )
    default = routelog.analyze(COLLAPSE, top_k=2, config=routelog.Config())
    assert len(default.findings) > len(from_file.findings)


def test_options_and_option_keywords_are_exclusive() -> None:
    options = routelog.make_options(top_k=2)
    with pytest.raises(UsageError, match="either options= or option keywords"):
        routelog.analyze(COLLAPSE, options=options, top_k=2)


def test_findings_frame(collapse: routelog.Analysis) -> None:
    frame = collapse.findings_frame()
    assert frame.height == len(collapse.findings) > 0
    assert frame["code"].to_list() == [f.code for f in sorted(collapse.findings, key=_key)]
    assert frame.schema["layer"] == pl.Int64
    assert frame.schema["value"] == pl.Float64
    assert frame.schema["active"] == pl.Boolean
    fails = frame.filter(pl.col("severity") == "fail")
    assert sorted(set(fails["layer"].to_list())) == [2, 3]


def _key(finding: routelog.Finding) -> tuple[int, str, int, str, int]:
    return finding.sort_key()


def test_findings_frame_without_findings_keeps_its_columns() -> None:
    healthy = routelog.analyze(HEALTHY, top_k=2, config=routelog.Config(rules=()))
    frame = healthy.findings_frame()
    assert frame.height == 0
    assert frame.columns[:4] == ["code", "severity", "run", "layer"]
    assert frame.schema["first_step"] == pl.Int64


def test_short_reprs(collapse: routelog.Analysis) -> None:
    text = repr(collapse)
    assert text == (
        "<Analysis of 1 run 'collapse': 48 metrics rows, findings 2 fail, 6 warn, 2 earlier only>"
    ), text
    assert repr(collapse.runs[0]) == "<Run 'collapse': 12 files, steps 0–1100, 4 layers>"


def test_report_is_the_cli_report(collapse: routelog.Analysis) -> None:
    text = collapse.report(width=100)
    cli = runner.invoke(app, ["analyze", str(COLLAPSE), "-k", "2", "--width", "100"])
    assert cli.exit_code == 0, cli.output
    assert text == cli.output
    assert "\x1b[" not in text
    coloured = collapse.report(width=100, color=True)
    assert "\x1b[" in coloured
    assert max(len(line) for line in collapse.report(width=80).splitlines()) <= 80


def test_compare_at_top_level() -> None:
    result = routelog.compare([f"base={HEALTHY}", str(COLLAPSE)], top_k=2)
    assert result.baseline == "base"
    assert set(result.table["run"].to_list()) == {"base", "collapse"}
    shift = routelog.compare(SAMPLES / "shift", by="dataset", top_k=2)
    assert {f.code for f in shift.findings} == {"distribution_shift"}
    with pytest.raises(UsageError, match="one run"):
        routelog.compare([HEALTHY, COLLAPSE], by="dataset")


def test_check_at_top_level(collapse: routelog.Analysis) -> None:
    failed = routelog.check(COLLAPSE, top_k=2)
    assert not failed.passed
    assert {r.layer for r in failed.failures} == {2, 3}
    assert not routelog.check(collapse).passed  # an Analysis is checked as it is
    healthy = routelog.check(HEALTHY, top_k=2, minimum={"token_entropy_norm": 0.2})
    assert healthy.passed
    strict = routelog.check(HEALTHY, top_k=2, minimum={"token_entropy_norm": 0.99})
    assert not strict.passed
    regressed = routelog.check(
        COLLAPSE, top_k=2, baseline=HEALTHY, max_regression={"token_entropy_norm": 0.05}
    )
    assert any(r.rule.startswith("max_regression") and not r.passed for r in regressed.rules)
    with pytest.raises(UsageError, match="baseline"):
        routelog.check(COLLAPSE, top_k=2, max_regression={"token_entropy_norm": 0.05})


def test_api_functions_survive_importing_the_modules_of_the_same_name() -> None:
    import routelog.check
    import routelog.compare

    assert callable(routelog.compare)
    assert callable(routelog.check)
    assert routelog.compare.__module__ == "routelog.api"
    from routelog.compare import compare_runs

    assert compare_runs.__module__ == "routelog.compare"


def test_dir_lists_the_api() -> None:
    listed = dir(routelog)
    for name in (
        "analyze",
        "compare",
        "check",
        "Analysis",
        "Run",
        "Config",
        "Finding",
        "load_config",
        "make_options",
        "sample_path",
        "__version__",
    ):
        assert name in listed
        assert getattr(routelog, name) is not None
    assert "_Package" not in listed


def test_sample_path_is_a_run() -> None:
    result = routelog.analyze(routelog.sample_path(), top_k=2)
    assert result.metrics["layer"].n_unique() == 4
    assert {f.layer for f in result.findings if f.severity == "fail"} == {2, 3}


def test_import_routelog_imports_no_polars() -> None:
    probe = (
        "import sys, routelog\n"
        "names = dir(routelog)\n"
        "print(sorted(m for m in ('polars', 'numpy', 'pyarrow', 'rich', 'typer') "
        "if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == "[]", done.stdout
