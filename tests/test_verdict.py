"""The verdict matches the data: worst layer quoted, one status rule, router losses shown."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from routelog.cli import app
from routelog.findings import Finding, worst
from tests.conftest import REAL_LOGS

runner = CliRunner()
requires_real = pytest.mark.skipif(not REAL_LOGS.is_dir(), reason="real logs not available")


def _finding(layer: int, value: float, *, active: bool = True) -> Finding:
    return Finding(
        "collapse", "fail", "r", layer, 0, 10, active, "load_entropy_norm", value, 0.5, f"L{layer}"
    )


def test_worst_is_furthest_beyond_the_threshold_and_active_first() -> None:
    group = [_finding(0, 0.439), _finding(1, 0.2, active=False), _finding(3, 0.003)]
    assert worst(group).layer == 3
    assert worst(group[:2]).layer == 0  # an active finding before one that ended
    dead = Finding("collapse", "fail", "r", 2, 0, 1, True, "dead_experts", 7.0, 4.0, "")
    assert dead.margin == pytest.approx((4 - 7) / 4)


@requires_real
def test_check_lists_every_failing_layer_and_quotes_the_worst() -> None:
    result = runner.invoke(app, ["check", str(REAL_LOGS / "collapse"), "-k", "2"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    collapse = next(line for line in lines if line.startswith("FAIL  collapse"))
    # layer 0 is at 0.439, layer 3 at 0.003: the worst is layer 3, and all three are listed
    assert collapse.endswith(
        "fails: collapse layers 0, 2, 3 · worst layer 3  load_entropy_norm 0.003 < 0.500"
    )


@requires_real
def test_a_passing_rule_dates_an_earlier_finding() -> None:
    # k=1 on the real aux-loss run: collapse held on layer 0 at steps 100-120 only; the value
    # quoted is from step 120, so the line says so rather than passing it off as the latest
    result = runner.invoke(app, ["check", str(REAL_LOGS / "aux-loss"), "-k", "1", "--layers", "0"])
    assert result.exit_code == 0, result.output
    collapse = next(line for line in result.output.splitlines() if "collapse" in line)
    assert collapse.endswith("earlier only: aux-loss layer 0 at step 120  dead_experts 5 > 4")


@requires_real
def test_finding_sentence_quotes_the_worst_layer_with_z_loss() -> None:
    result = runner.invoke(app, ["analyze", str(REAL_LOGS / "collapse"), "-k", "2", "-f", "json"])
    document = json.loads(result.output)
    output = runner.invoke(
        app, ["analyze", str(REAL_LOGS / "collapse"), "-k", "2", "--width", "200"]
    )
    text = " ".join(output.output.split())
    assert (
        "FAIL collapse layer 0* (steps 20–300), layer 2* (step 300), layer 3* (steps 20–300)"
        in text
    )
    # the sentence under it is layer 3's (load entropy 0.003), with its losses
    z3 = next(m["z_loss"] for m in document["metrics"] if m["step"] == 300 and m["layer"] == 3)
    aux3 = next(m["aux_loss"] for m in document["metrics"] if m["step"] == 300 and m["layer"] == 3)
    assert 200 < z3 < 230  # the README's 156-220
    assert (
        f"Layer 3 routes to a few experts only (load entropy is 0.00 of its maximum; "
        f"aux loss {aux3:.2f} vs 2 balanced, z-loss {z3:.0f})"
    ) in text
    assert f"top-1 probability 0.999, z-loss {z3:.0f}) since step 20" in text


@requires_real
def test_headline_status_column_and_json_follow_one_rule() -> None:
    args = ["analyze", str(REAL_LOGS / "collapse"), "-k", "2"]
    document = json.loads(runner.invoke(app, [*args, "-f", "json"]).output)
    findings = document["findings"]
    # findings that ended before the latest step (sharp drops at step 20-60) are "earlier"
    ended = [f for f in findings if not f["active"]]
    assert ended
    assert {f["status"] for f in ended} == {"earlier"}
    statuses = {entry["layer"]: entry["status"] for entry in document["layers"]}
    assert statuses == {0: "fail", 1: "warn", 2: "fail", 3: "fail"}
    for status in ("fail", "warn", "earlier"):
        assert document["summary"][status] == sum(f["status"] == status for f in findings)
    for layer, status in statuses.items():
        own = {f["status"] for f in findings if f["layer"] == layer}
        expected = "fail" if "fail" in own else "warn" if "warn" in own else "ok"
        assert status == expected
    text = runner.invoke(app, [*args, "--width", "200"]).output
    summary = document["summary"]
    assert (
        f"findings: {summary['fail']} fail, {summary['warn']} warn, "
        f"{summary['earlier']} earlier only" in text
    )


@requires_real
def test_passing_findings_rule_names_its_warned_layers() -> None:
    args = ["check", str(REAL_LOGS / "collapse"), "-k", "2", "--format", "json"]
    document = json.loads(runner.invoke(app, args).output)
    rigidity = {r["layer"]: r["status"] for r in document["rules"] if r["rule"] == "rigidity"}
    # layers 1 and 2 carry rigidity warnings (token entropy 0.06 and 0.05 < 0.15)
    assert rigidity == {0: "fail", 1: "warn", 2: "warn", 3: "fail"}
    aux = runner.invoke(app, ["check", str(REAL_LOGS / "aux-loss"), "-k", "2"]).output
    assert "PASS  collapse" in aux
    assert "dead_experts 4 = 4" not in aux  # half of E is the threshold's last passing value


@requires_real
def test_a_fail_finding_that_ended_is_not_counted_as_fail() -> None:
    # k=1 (assumed): layer 1's collapse holds at steps 20-60 only; its layer is warn
    document = json.loads(
        runner.invoke(app, ["analyze", str(REAL_LOGS / "collapse"), "-f", "json"]).output
    )
    ended = next(f for f in document["findings"] if f["code"] == "collapse" and f["layer"] == 1)
    assert (ended["severity"], ended["last_step"], ended["status"]) == ("fail", 60, "earlier")
    assert {e["layer"]: e["status"] for e in document["layers"]}[1] == "warn"
    active_fails = sum(f["severity"] == "fail" and f["active"] for f in document["findings"])
    assert document["summary"]["fail"] == active_fails


def test_steps_window_after_the_start_skips_rules_about_the_beginning() -> None:
    from tests.conftest import SAMPLES

    healthy = str(SAMPLES / "healthy")
    full = json.loads(runner.invoke(app, ["analyze", healthy, "-k", "2", "-f", "json"]).output)
    assert full["findings"] == []  # no finding without --steps
    args = ["analyze", healthy, "-k", "2", "--steps", "1000:"]
    document = json.loads(runner.invoke(app, [*args, "-f", "json"]).output)
    # the window's first 30% is not the run's: no early_saturation from a late window
    assert [f["code"] for f in document["findings"]] == []
    assert document["notes"] == [
        "premature_specialization and early_saturation not run: --steps starts at step 1000, "
        "so the run's beginning is not in view (select from step 0 to judge it)"
    ]
    text = " ".join(runner.invoke(app, args).output.split())
    assert "premature_specialization and early_saturation not run: --steps starts" in text
    from_zero = json.loads(
        runner.invoke(app, ["analyze", healthy, "-k", "2", "--steps", "0:", "-f", "json"]).output
    )
    assert from_zero["notes"] == []


@requires_real
def test_weight_blind_counting_no_longer_hides_dead_experts() -> None:
    import numpy as np

    from routelog import api

    analysis = api.analyze([REAL_LOGS / "collapse"], top_k=2, jobs=1)
    row = analysis.metrics.filter(
        (analysis.metrics["step"] == 300) & (analysis.metrics["layer"] == 1)
    ).row(0, named=True)
    count, mass, top1 = (np.array(row[n]) for n in ("load_share", "mass_share", "top1_share"))
    # experts 2, 4, 5: chosen second (1.8-5.7% of the slots) but no top-1 token, ~0 mass
    assert (count[[2, 4, 5]] > 0.1 / 8).all()
    assert (top1[[2, 4, 5]] == 0).all()
    assert (mass[[2, 4, 5]] < 0.005).all()
    assert row["dead_experts"] == 3  # was 0/8 by count alone
    text = runner.invoke(app, ["analyze", str(REAL_LOGS / "collapse"), "-k", "2"]).output
    lines = text.splitlines()
    title = lines.index("probability mass share P_i per expert at the latest step")
    layer1 = next(line for line in lines[title:] if line.startswith("layer 1 "))
    cells = layer1[len("layer 1 ") :].split()
    assert [i for i, cell in enumerate(cells) if cell == "×"] == [2, 4, 5]
    assert "of the tokens or of the mass" in " ".join(text.split())
