"""routelog check: every rule source on hand-built frames (checked against numpy), the
configuration of ``[check]``, ``--suggest``, and every exit path of the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import routelog
from routelog.check import SEVERE_RULES, evaluate, layer_values, suggest
from routelog.cli import app
from routelog.config import Bound, CheckSettings, load_config
from routelog.errors import ConfigError, ExitCode, UsageError
from routelog.findings import Finding
from routelog.kernels import METRIC_RANGES, THRESHOLD_METRICS, TOWARDS_COLLAPSE
from routelog.options import LayerSet
from tests.conftest import REAL_LOGS, SAMPLES, WriteRun, dirichlet

runner = CliRunner()
HEALTHY = str(SAMPLES / "healthy")
COLLAPSE = str(SAMPLES / "collapse")
requires_real = pytest.mark.real_logs


def metrics_frame(values: dict[str, np.ndarray], run: str = "r") -> pl.DataFrame:
    """A metrics frame from arrays of shape (steps, layers), steps 0, 10, 20, ..."""
    n_steps, n_layers = next(iter(values.values())).shape
    steps, layers = np.meshgrid(np.arange(n_steps) * 10, np.arange(n_layers), indexing="ij")
    columns: dict[str, Any] = {
        "run": [run] * steps.size,
        "step": steps.ravel(),
        "layer": layers.ravel(),
        "n_experts": [8] * steps.size,
    }
    columns.update({name: array.ravel() for name, array in values.items()})
    return pl.DataFrame(columns)


def finding(code: str, layer: int, *, severity: str = "fail", active: bool = True) -> Finding:
    return Finding(
        code=code,
        severity=severity,  # type: ignore[arg-type]
        run="r",
        layer=layer,
        first_step=0,
        last_step=20 if active else 10,
        active=active,
        metric="token_entropy_norm",
        value=0.01,
        threshold=0.05,
        message=f"layer {layer} {code}",
    )


def verdicts(result: Any, rule: str) -> dict[int, bool]:
    return {r.layer: r.passed for r in result.rules if r.rule == rule}


# --- thresholds ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    entropy = rng.uniform(0, 1, size=(6, 5))
    share = rng.uniform(0.125, 0.5, size=(6, 5))
    metrics = metrics_frame({"token_entropy_norm": entropy, "max_load_share": share})
    settings = CheckSettings(
        bounds=(Bound("min", "token_entropy_norm", 0.4), Bound("max", "max_load_share", 0.3))
    )
    result = evaluate(metrics, [], settings)
    assert verdicts(result, "min_token_entropy_norm") == {
        layer: bool(entropy[-1, layer] >= 0.4) for layer in range(5)
    }
    assert verdicts(result, "max_max_load_share") == {
        layer: bool(share[-1, layer] <= 0.3) for layer in range(5)
    }
    expected = bool((entropy[-1] >= 0.4).all() and (share[-1] <= 0.3).all())
    assert result.passed is expected
    for rule in result.rules:
        if rule.rule in SEVERE_RULES:
            assert rule.passed  # no findings given
            continue
        assert rule.step == 50
        assert rule.value == pytest.approx(
            (entropy if rule.metric == "token_entropy_norm" else share)[-1, rule.layer]
        )


@pytest.mark.parametrize("window", [1, 2, 4, 6, 10])
def test_window_is_the_mean_of_the_last_logged_steps(window: int) -> None:
    rng = np.random.default_rng(window)
    values = rng.uniform(0, 1, size=(6, 3))
    metrics = metrics_frame({"token_entropy_norm": values}).sample(fraction=1.0, shuffle=True)
    got = layer_values(metrics, ["token_entropy_norm"], window)
    expected = values[-min(window, 6) :].mean(axis=0)
    np.testing.assert_allclose(got["token_entropy_norm"].to_numpy(), expected)
    assert got["n_steps"].to_list() == [min(window, 6)] * 3
    assert got["first_step"].to_list() == [(6 - min(window, 6)) * 10] * 3


def test_window_smooths_one_noisy_step() -> None:
    values = np.array([[0.50], [0.52], [0.49], [0.51], [0.15]])  # a dip at the latest step
    metrics = metrics_frame({"token_entropy_norm": values})
    settings = CheckSettings(bounds=(Bound("min", "token_entropy_norm", 0.3),))
    latest = evaluate(metrics, [], settings)
    assert not latest.passed
    smoothed = evaluate(metrics, [], settings, window=4)
    assert smoothed.passed
    (rule,) = [r for r in smoothed.rules if r.rule == "min_token_entropy_norm"]
    assert rule.value == pytest.approx(np.mean([0.52, 0.49, 0.51, 0.15]))
    assert "mean of the last 4 logged steps, 10-40" in rule.message


def test_window_below_one_is_refused() -> None:
    metrics = metrics_frame({"token_entropy_norm": np.ones((2, 1))})
    with pytest.raises(UsageError, match="--window"):
        evaluate(metrics, [], CheckSettings(), window=0)


def test_layer_range_threshold_wins_over_the_global_one() -> None:
    values = np.array([[0.3, 0.3, 0.3, 0.3, 0.1]])
    metrics = metrics_frame({"token_entropy_norm": values})
    settings = CheckSettings(
        bounds=(
            Bound("min", "token_entropy_norm", 0.2),
            Bound("min", "token_entropy_norm", 0.4, LayerSet.of({0, 1})),
        )
    )
    result = evaluate(metrics, [], settings)
    assert verdicts(result, "min_token_entropy_norm") == {
        0: False,
        1: False,
        2: True,
        3: True,
        4: False,
    }
    thresholds = {r.layer: r.threshold for r in result.rules if r.rule.startswith("min_")}
    assert thresholds == {0: 0.4, 1: 0.4, 2: 0.2, 3: 0.2, 4: 0.2}


def test_range_only_threshold_leaves_other_layers_unchecked() -> None:
    metrics = metrics_frame({"dead_experts": np.array([[0, 3, 5]])})
    settings = CheckSettings(bounds=(Bound("max", "dead_experts", 1, LayerSet.of({1, 2})),))
    assert verdicts(evaluate(metrics, [], settings), "max_dead_experts") == {1: False, 2: False}


def test_threshold_on_a_missing_metric_names_it() -> None:
    metrics = metrics_frame({"token_entropy_norm": np.array([[np.nan]])}).with_columns(
        pl.col("token_entropy_norm").fill_nan(None)
    )
    settings = CheckSettings(bounds=(Bound("min", "token_entropy_norm", 0.2, key="min_x"),))
    with pytest.raises(UsageError, match=r"min_x: run r layer 0 has no token_entropy_norm"):
        evaluate(metrics, [], settings)


@pytest.mark.parametrize(
    ("metric", "needs"),
    [
        ("z_loss", "router logits"),
        ("selection_mismatch", "both probabilities and the selected expert ids"),
        ("flip_rate", "token positions"),
    ],
)
def test_a_missing_metric_says_what_it_needs(metric: str, needs: str) -> None:
    metrics = metrics_frame({metric: np.array([[np.nan]])}).with_columns(
        pl.col(metric).fill_nan(None)
    )
    settings = CheckSettings(bounds=(Bound("max", metric, 0.5, key=f"max_{metric}"),))
    with pytest.raises(UsageError, match=f"has no {metric} \\(it needs {needs}"):
        evaluate(metrics, [], settings)


def test_thresholds_on_metrics_without_a_direction() -> None:
    # the routing flips and the selection mismatch take thresholds, not regression tolerances
    result = invoke(COLLAPSE, "--top-k", "2", "--max", "flip_rate=0.01")
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    assert "flip_rate" in result.output
    passed = invoke(HEALTHY, "--top-k", "2", "--max", "flip_rate=1")
    assert passed.exit_code == ExitCode.OK, passed.output
    assert "max_flip_rate" in passed.output
    regress = invoke(COLLAPSE, "--baseline", HEALTHY, "--max-regression", "flip_rate=0.1")
    assert regress.exit_code == ExitCode.BAD_INPUT
    assert "flip_rate has no direction towards collapse" in regress.output
    saturation = invoke(COLLAPSE, "--max", "saturation=0.9")
    assert saturation.exit_code == ExitCode.BAD_INPUT
    assert "saturation is 1 at the final step by definition" in saturation.output


# --- findings --------------------------------------------------------------------------------


def test_default_fails_on_active_fail_findings_only() -> None:
    metrics = metrics_frame({"token_entropy_norm": np.ones((3, 4))})
    findings = [
        finding("collapse", 0),
        finding("rigidity", 1, severity="warn"),
        finding("collapse", 2, active=False),
        finding("persistent_skew", 3, severity="warn"),
    ]
    result = evaluate(metrics, findings, CheckSettings())
    assert {r.rule for r in result.rules} == set(SEVERE_RULES)
    assert verdicts(result, "collapse") == {0: False, 1: True, 2: True, 3: True}
    assert verdicts(result, "rigidity") == {0: True, 1: True, 2: True, 3: True}
    assert "--strict" in next(r.message for r in result.rules if r.layer == 2 and r.value)


def test_strict_also_fails_on_findings_no_longer_active() -> None:
    metrics = metrics_frame({"token_entropy_norm": np.ones((3, 3))})
    findings = [finding("collapse", 0, active=False), finding("rigidity", 1, severity="warn")]
    result = evaluate(metrics, findings, CheckSettings(), strict=True)
    assert verdicts(result, "collapse") == {0: False, 1: True, 2: True}
    assert verdicts(result, "rigidity") == {0: True, 1: True, 2: True}  # warn: not listed


def test_fail_on_lists_the_failing_codes_warn_included() -> None:
    metrics = metrics_frame({"token_entropy_norm": np.ones((3, 3))})
    findings = [
        finding("collapse", 0),
        finding("persistent_skew", 1, severity="warn"),
        finding("rigidity", 2, severity="warn"),
    ]
    settings = CheckSettings(fail_on=("persistent_skew", "rigidity"))
    result = evaluate(metrics, findings, settings)
    assert {r.rule for r in result.rules} == {"persistent_skew", "rigidity"}
    assert verdicts(result, "persistent_skew") == {0: True, 1: False, 2: True}
    assert verdicts(result, "rigidity") == {0: True, 1: True, 2: False}


def test_severe_rules_are_the_rules_that_report_fail() -> None:
    samples = routelog.analyze([COLLAPSE, str(SAMPLES / "drift")], top_k=2)
    severe = {f.code for f in samples.findings if f.severity == "fail"}
    assert severe
    assert severe <= set(SEVERE_RULES)


# --- regression ------------------------------------------------------------------------------


def test_regression_towards_collapse_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    run = {m: rng.uniform(0, 1, size=(4, 6)) for m in ("token_entropy_norm", "max_load_share")}
    base = {m: rng.uniform(0, 1, size=(4, 6)) for m in run}
    tolerances = {"token_entropy_norm": 0.1, "max_load_share": 0.05}
    result = evaluate(
        metrics_frame(run),
        [],
        CheckSettings(max_regression=tolerances),
        baseline=metrics_frame(base, run="good"),
    )
    for metric, tolerance in tolerances.items():
        sign = TOWARDS_COLLAPSE[metric]
        moved = (run[metric][-1] - base[metric][-1]) * sign
        assert verdicts(result, f"max_regression.{metric}") == {
            layer: bool(moved[layer] <= tolerance) for layer in range(6)
        }
    assert not result.passed


def test_regression_direction_table() -> None:
    lower = {"token_entropy_norm", "load_entropy_norm", "assign_entropy_norm", "mutual_info"}
    higher = {"max_load_share", "max_vio", "load_cv", "dead_experts", "z_loss"}
    assert {m for m, s in TOWARDS_COLLAPSE.items() if s < 0} >= lower
    assert {m for m, s in TOWARDS_COLLAPSE.items() if s > 0} >= higher
    assert set(METRIC_RANGES) == set(THRESHOLD_METRICS) > set(TOWARDS_COLLAPSE)


def test_regression_compares_the_latest_common_step() -> None:
    run = metrics_frame({"token_entropy_norm": np.array([[0.9], [0.9], [0.2], [0.2]])})
    base = metrics_frame({"token_entropy_norm": np.array([[0.9], [0.9]])}, run="good")
    settings = CheckSettings(max_regression={"token_entropy_norm": 0.1})
    result = evaluate(run.filter(pl.col("step") <= 10), [], settings, baseline=base, enabled=())
    assert result.passed
    # common steps 0 and 10: still step 10
    result = evaluate(run, [], settings, baseline=base, enabled=())
    assert result.passed
    assert result.rules[0].step == 10
    later = base.with_columns(pl.col("step") + 20)  # baseline logged 20, 30
    result = evaluate(run, [], settings, baseline=later, enabled=())
    assert not result.passed
    assert result.rules[0].step == 30
    assert result.rules[0].threshold == pytest.approx(0.8)
    assert "fell from 0.900 (baseline good) to 0.200 at step 30" in result.rules[0].message


def test_regression_nearest_alignment() -> None:
    run = metrics_frame({"token_entropy_norm": np.array([[0.9], [0.9], [0.2], [0.2]])})
    base = metrics_frame({"token_entropy_norm": np.array([[0.9], [0.9], [0.9]])}, run="good")
    base = base.with_columns(pl.col("step") + 5)  # steps 5, 15, 25: none shared with 0-30
    settings = CheckSettings(max_regression={"token_entropy_norm": 0.1})
    with pytest.raises(UsageError, match="--align nearest"):
        evaluate(run, [], settings, baseline=base, enabled=())
    result = evaluate(run, [], settings, baseline=base, align="nearest", enabled=())
    (rule,) = result.rules
    assert rule.step == 20  # the run's latest step at or before the baseline's 25
    assert not rule.passed
    assert "(baseline good at step 25) to 0.200 at step 20" in rule.message


def test_regression_against_a_baseline_of_the_same_name() -> None:
    run = metrics_frame({"token_entropy_norm": np.array([[0.5], [0.3]])})
    base = metrics_frame({"token_entropy_norm": np.array([[0.5], [0.5]])})
    settings = CheckSettings(max_regression={"token_entropy_norm": 0.1})
    (rule,) = evaluate(run, [], settings, baseline=base, enabled=()).rules
    assert not rule.passed
    assert rule.threshold == pytest.approx(0.4)


def test_regression_without_a_common_step_or_layer() -> None:
    run = metrics_frame({"token_entropy_norm": np.full((2, 2), 0.5)})
    base = metrics_frame({"token_entropy_norm": np.full((2, 1), 0.5)}, run="good")
    settings = CheckSettings(max_regression={"token_entropy_norm": 0.1})
    result = evaluate(run, [], settings, baseline=base, enabled=())
    assert result.passed
    assert [r.layer for r in result.rules] == [0]
    assert "run r layer 1: not compared" in result.notes[0]
    with pytest.raises(UsageError, match="shares no logged step with the baseline 'good'"):
        evaluate(run, [], settings, baseline=base.with_columns(pl.col("step") + 5), enabled=())
    # a configured max_regression table without a baseline: not checked, and said so
    alone = evaluate(run, [], settings, enabled=())
    assert alone.rules == []
    assert alone.notes == ["max_regression (token_entropy_norm) not checked: no --baseline given"]


# --- configuration ---------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str, name: str = "routelog.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_table_is_read(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[check]\nmin_token_entropy_norm = 0.2\nmax_dead_experts = 0\nfail_on = ["collapse"]\n'
        '[check.layers."0-1"]\nmin_token_entropy_norm = 0.4\n'
        "[check.max_regression]\nmax_load_share = 0.05\n",
    )
    settings = load_config(path).check
    assert settings.fail_on == ("collapse",)
    assert settings.max_regression == {"max_load_share": 0.05}
    assert {(b.rule, b.value, b.layers) for b in settings.bounds} == {
        ("min_token_entropy_norm", 0.2, None),
        ("max_dead_experts", 0.0, None),
        ("min_token_entropy_norm", 0.4, LayerSet.of({0, 1})),
    }


def test_tool_routelog_table_in_any_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[tool.routelog.check]\nmax_max_vio = 1.5\n", "gate.toml")
    assert load_config(path).check.bounds[0].value == 1.5


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[check]\nmin_bogus = 0.1\n", "check.min_bogus: unknown metric 'bogus'"),
        ("[check]\nmin_token_entropy_norm = 1.2\n", "check.min_token_entropy_norm: impossible"),
        ("[check]\nmin_load_entropy_norm = -0.1\n", "check.min_load_entropy_norm: impossible"),
        ("[check]\nmax_max_load_share = 1.5\n", "check.max_max_load_share: impossible"),
        ("[check]\nmax_dead_experts = -1\n", "check.max_dead_experts: impossible"),
        ('[check]\nmax_max_vio = "big"\n', "check.max_max_vio must be a finite number"),
        ("[check]\nwindow = 3\n", "check: unknown key 'window'"),
        ('[check]\nfail_on = "collapse"\n', "check.fail_on must be a list"),
        ('[check]\nfail_on = ["nosuch"]\n', "check.fail_on: unknown rule 'nosuch'"),
        ('rules = ["rigidity"]\n[check]\nfail_on = ["collapse"]\n', "rules disables"),
        ("check = 3\n", "check must be a table"),
        ('[check.layers."a-b"]\nmin_token_entropy_norm = 0.1\n', 'check.layers."a-b"'),
        ('[check.layers."0-3"]\nfail_on = 1\n', "unknown key 'fail_on'"),
        (
            '[check.layers."0-3"]\nmin_mutual_info = 0.1\n[check.layers."3-4"]\n'
            "min_mutual_info = 0.2\n",
            'check.layers."3-4".min_mutual_info: layer 3 is also in',
        ),
        ("[check.max_regression]\nmax_vio = -0.5\n", "check.max_regression.max_vio"),
        ("[check.max_regression]\nn_tokens = 1\n", "unknown metric 'n_tokens'"),
        ("[check]\nmax_regression = 1\n", "check.max_regression must be a table"),
    ],
)
def test_bad_check_table(tmp_path: Path, text: str, key: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_flags_override_the_global_value() -> None:
    settings = CheckSettings(
        bounds=(
            Bound("min", "token_entropy_norm", 0.2),
            Bound("min", "token_entropy_norm", 0.4, LayerSet.of({0})),
        ),
        max_regression={"max_vio": 0.5},
    )
    flagged = settings.with_flags(
        minimum=["token_entropy_norm=0.3"],
        maximum=["dead_experts=1"],
        max_regression=["max_vio=0.2"],
    )
    assert {(b.rule, b.value, b.layers) for b in flagged.bounds} == {
        ("min_token_entropy_norm", 0.3, None),
        ("min_token_entropy_norm", 0.4, LayerSet.of({0})),
        ("max_dead_experts", 1.0, None),
    }
    assert flagged.max_regression == {"max_vio": 0.2}


@pytest.mark.parametrize(
    ("flag", "text", "message"),
    [
        ("minimum", "token_entropy_norm", "expected METRIC=NUMBER"),
        ("minimum", "token_entropy_norm=abc", "expected METRIC=NUMBER"),
        ("minimum", "nope=0.1", "unknown metric 'nope'"),
        ("maximum", "top1_prob=1.1", "impossible threshold"),
        ("max_regression", "max_vio=-1", "non-negative"),
    ],
)
def test_bad_flags(flag: str, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        CheckSettings().with_flags(**{flag: [text]})


# --- suggest ---------------------------------------------------------------------------------


def test_suggest_margin_rule() -> None:
    metrics = metrics_frame(
        {
            "token_entropy_norm": np.array([[0.9, 0.3, 0.02]]),
            "load_entropy_norm": np.array([[0.99, 0.95, 0.97]]),
            "assign_entropy_norm": np.array([[0.99, 0.95, 0.97]]),
            "max_load_share": np.array([[0.15, 0.9, 0.2]]),
            "max_vio": np.array([[0.2, 4.0, 0.3]]),
            "dead_experts": np.array([[0, 2, 1]]),
        }
    )
    got = {s.key: (s.value, s.layer) for s in suggest(metrics)}
    assert got["min_token_entropy_norm"] == (0.0, 2)  # 0.02 - 0.05, floored at 0
    assert got["min_load_entropy_norm"] == (pytest.approx(0.855), 1)  # 0.95 - 10%
    assert got["max_max_load_share"] == (pytest.approx(0.99), 1)  # 0.9 + 0.09
    assert got["max_max_vio"] == (pytest.approx(4.4), 1)  # 4 + 10%
    assert got["max_dead_experts"] == (2, 1)


# --- the command -----------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["check", *args])


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_pass_on_the_healthy_sample() -> None:
    result = invoke(HEALTHY, "--top-k", "2")
    assert result.exit_code == ExitCode.OK, result.output
    assert last_line(result.output) == "PASS: 2 rules passed (8 layer checks)"


def test_fail_by_finding() -> None:
    result = invoke(COLLAPSE, "--top-k", "2")
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    assert result.output.startswith("collapse  k=2 (--top-k)\n\nFAIL  collapse  2/4 layers failed")
    assert last_line(result.output) == "FAIL: 1 of 2 rules failed (2 layer checks of 8)"


@requires_real
@pytest.mark.parametrize("k", [["--top-k", "1"], ["--top-k", "2"]])
def test_real_collapsing_run_fails_with_collapse(k: list[str]) -> None:
    result = invoke(str(REAL_LOGS / "collapse"), *k, "--format", "json")
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    document = json.loads(result.output)
    assert document["passed"] is False
    failed = {(r["rule"], r["layer"]) for r in document["rules"] if not r["passed"]}
    assert ("collapse", 3) in failed


def test_fail_by_threshold() -> None:
    result = invoke(HEALTHY, "--top-k", "2", "--min", "token_entropy_norm=0.7")
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    metrics = routelog.analyze([HEALTHY], top_k=2).metrics
    latest = metrics.filter(pl.col("step") == pl.col("step").max())
    below = latest.filter(pl.col("token_entropy_norm") < 0.7)["layer"].to_list()
    assert below  # the healthy run's deeper layers sit just below 0.7
    for layer in below:
        assert f"run healthy layer {layer}: token_entropy_norm" in result.output


def test_fail_by_regression() -> None:
    args = ["--top-k", "2", "--baseline", HEALTHY, "--max-regression", "token_entropy_norm=0.1"]
    result = invoke(COLLAPSE, *args, "--format", "json")
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    rules = json.loads(result.output)["rules"]
    regression = {r["layer"]: r["passed"] for r in rules if r["rule"].startswith("max_regr")}
    assert regression == {0: True, 1: True, 2: False, 3: False}
    same = invoke(HEALTHY, *args)
    assert same.exit_code == ExitCode.OK, same.output


def test_config_file_thresholds_and_flag_override(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[check]\nmin_token_entropy_norm = 0.99\n")
    result = invoke(HEALTHY, "--top-k", "2", "--config", str(path))
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    result = invoke(
        HEALTHY, "--top-k", "2", "--config", str(path), "--min", "token_entropy_norm=0.1"
    )
    assert result.exit_code == ExitCode.OK, result.output


def test_configured_regression_waits_for_a_baseline(tmp_path: Path) -> None:
    # the README's configuration: a max_regression table used when --baseline is given
    path = write_config(tmp_path, "[check.max_regression]\ntoken_entropy_norm = 0.05\n")
    result = invoke(HEALTHY, "--top-k", "2", "--config", str(path))
    assert result.exit_code == ExitCode.OK, result.output
    assert "max_regression (token_entropy_norm) not checked: no --baseline given" in result.output
    compared = invoke(HEALTHY, "--top-k", "2", "--config", str(path), "--baseline", HEALTHY)
    assert compared.exit_code == ExitCode.OK, compared.output
    assert "max_regression" in compared.output
    assert "not checked" not in compared.output


def test_a_layer_range_beyond_the_run_is_said(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[check.layers."50-60"]\nmin_token_entropy_norm = 0.2\n')
    result = invoke(HEALTHY, "--top-k", "2", "--config", str(path))
    assert result.exit_code == ExitCode.OK, result.output
    assert (
        'note: layers."50-60".min_token_entropy_norm not checked: no layer of the run is in its '
        "range" in result.output
    )


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[check]\nmax_max_load_share = 2\n")
    result = invoke(HEALTHY, "--config", str(path))
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "check.max_max_load_share: impossible threshold 2" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/run"], "/no/such/run"),
        ([HEALTHY, "--min", "entropy=0.1"], "unknown metric 'entropy'"),
        ([HEALTHY, "--window", "0"], "--window: must be at least 1 (got 0)"),
        ([HEALTHY, "--max-regression", "max_vio=0.1"], "needs a baseline"),
        ([HEALTHY, "--baseline", "/no/such/base", "--max-regression", "max_vio=1"], "/no/such"),
        ([HEALTHY, "--github", "--format", "json"], "--github"),
        ([], "no run given"),
        ([HEALTHY, "--suggest", HEALTHY], "--suggest reads the healthy run only"),
        ([str(SAMPLES / "megatron-tpe"), "--min", "token_entropy_norm=0.1"], "no token_entr"),
    ],
)
def test_bad_input_exits_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert message in result.output


def test_bad_log_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "step_0.jsonl").write_text('{"step": 0, "layer": 0, "probs": [0.5, "x"]}\n')
    result = invoke(str(bad))
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "step_0.jsonl:1" in result.output


def test_strict_from_the_command_line(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(3)
    healthy = dirichlet(rng, 256, 8, alpha=20.0)
    collapsed = np.zeros((256, 8))
    collapsed[:, 0] = 0.97
    collapsed[:, 1:] = 0.03 / 7
    # Layer 0 collapses at steps 1 and 2 and recovers: a fail finding, no longer active.
    data = {step: {0: collapsed if step in (1, 2) else healthy} for step in range(5)}
    run = str(write_parquet_run(data))
    result = invoke(run, "--top-k", "2")
    assert result.exit_code == ExitCode.OK, result.output
    assert "no longer active" not in result.output  # passing layers print no message
    strict = invoke(run, "--top-k", "2", "--strict", "--format", "json")
    assert strict.exit_code == ExitCode.CHECK_FAILED, strict.output
    failed = [r for r in json.loads(strict.output)["rules"] if not r["passed"]]
    assert [(r["rule"], r["layer"]) for r in failed] == [("collapse", 0)]
    assert "failed by --strict" in failed[0]["message"]


def test_suggest_passes_on_its_run_and_fails_on_collapse(tmp_path: Path) -> None:
    suggested = invoke("--suggest", HEALTHY, "--top-k", "2")
    assert suggested.exit_code == ExitCode.OK, suggested.output
    assert "[tool.routelog.check]" in suggested.output
    assert "max(0.05, 10% of it)" in suggested.output
    path = write_config(tmp_path, suggested.output, "suggested.toml")
    ok = invoke(HEALTHY, "--top-k", "2", "--config", str(path))
    assert ok.exit_code == ExitCode.OK, ok.output
    assert "min_token_entropy_norm" in ok.output
    bad = invoke(COLLAPSE, "--top-k", "2", "--config", str(path))
    assert bad.exit_code == ExitCode.CHECK_FAILED, bad.output
    failed = {line.split()[1] for line in bad.output.splitlines() if line.startswith("FAIL  ")}
    assert {"collapse", "min_token_entropy_norm", "max_dead_experts"} <= failed


@requires_real
def test_suggested_config_fails_the_real_collapsing_run(tmp_path: Path) -> None:
    suggested = invoke("--suggest", HEALTHY, "--top-k", "2")
    path = write_config(tmp_path, suggested.output, "pyproject.toml")
    result = invoke(str(REAL_LOGS / "collapse"), "--top-k", "2", "--config", str(path))
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    assert "FAIL  min_token_entropy_norm" in result.output


def test_config_command_lists_the_check_table(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[check]\nmax_dead_experts = 0\n[check.layers."2"]\nmin_mutual_info = 0.1\n'
    )
    result = runner.invoke(app, ["config", "--config", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    settings = {s["key"]: s for s in json.loads(result.output)["settings"]}
    assert settings["check.max_dead_experts"]["value"] == 0
    assert settings['check.layers."2".min_mutual_info']["source"] == str(path)
