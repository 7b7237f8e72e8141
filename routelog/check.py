"""Check: findings, thresholds and a baseline -> pass or fail per rule, run and layer.

Three sources of rules, all optional and combined (see :class:`routelog.config.CheckSettings`):

1. findings: a layer fails a diagnosis rule when it has a finding of that rule that is
   active at the run's latest step (any finding with ``strict``) and is of severity ``fail``,
   or of any severity when ``fail_on`` lists the rule. Without ``fail_on`` the rules that can
   fail (:data:`SEVERE_RULES`) are checked; with it, exactly the listed ones.
2. thresholds: ``min_<metric>`` / ``max_<metric>`` against each (run, layer)'s value at its
   latest logged step, or the mean over its last ``window`` logged steps.
3. regression: each layer against the same layer of a baseline run at the latest step both
   logged; it fails when the metric moved towards collapse
   (:data:`routelog.kernels.TOWARDS_COLLAPSE`) by more than ``max_regression[metric]``.

Nothing here prints: :mod:`routelog.render.check` does.

Examples
--------
>>> import polars as pl
>>> from routelog.config import Bound, CheckSettings
>>> metrics = pl.DataFrame({"run": ["r", "r"], "step": [0, 0], "layer": [0, 1],
...     "token_entropy_norm": [0.5, 0.1]})
>>> settings = CheckSettings(bounds=(Bound("min", "token_entropy_norm", 0.2),))
>>> result = evaluate(metrics, [], settings)
>>> [(r.rule, r.layer, r.passed) for r in result.rules if r.metric], result.passed
([('min_token_entropy_norm', 0, True), ('min_token_entropy_norm', 1, False)], False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from routelog.compare import Align, align_steps
from routelog.config import Bound, CheckSettings
from routelog.errors import UsageError
from routelog.kernels import METRIC_RANGES, NEEDS, TOWARDS_COLLAPSE

if TYPE_CHECKING:
    from routelog.api import Analysis
    from routelog.findings import Finding

KEYS = ["run", "layer"]

SEVERE_RULES = ("collapse", "rigidity")
"""The diagnosis rules that can report severity ``fail``: the default findings rules."""

SUGGEST_MIN = ("token_entropy_norm", "load_entropy_norm", "assign_entropy_norm")
SUGGEST_MAX = ("max_load_share", "max_vio", "dead_experts")
MARGIN_ABS = 0.05
MARGIN_REL = 0.10
"""``--suggest`` margin: max(MARGIN_ABS, MARGIN_REL x the observed value)."""


@dataclass(frozen=True)
class RuleResult:
    """One rule evaluated on one layer of one run.

    ``value`` and ``threshold`` are the metric and the limit it was held to (for a
    regression: the baseline's value moved by the tolerance); ``margin`` is how far inside
    the limit the value is (negative when it fails), None for findings.
    """

    rule: str
    metric: str | None
    run: str
    layer: int
    value: float | None
    threshold: float | None
    passed: bool
    message: str
    step: int | None = None
    margin: float | None = None
    warned: bool = False
    """Passed, but a finding of this rule holds at the latest step (a ``warn``)."""
    earlier: bool = False
    """A finding of this rule held at earlier steps only (``step`` is its last)."""

    @property
    def status(self) -> str:
        """``fail``, ``warn`` (passed with a finding that still holds) or ``pass``: the same
        word the analyze table's status column gives the layer for this rule."""
        if not self.passed:
            return "fail"
        return "warn" if self.warned else "pass"

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry: ``{"rule", "metric", "run", "layer", "value", "threshold",
        "passed", "status", "message"}``."""
        return {
            "rule": self.rule,
            "metric": self.metric,
            "run": self.run,
            "layer": self.layer,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
            "status": self.status,
            "message": self.message,
        }


@dataclass(frozen=True)
class RuleSummary:
    """A rule over every layer it was evaluated on: the failing (else warned) layers, all
    listed, and the worst of them."""

    rule: str
    metric: str | None
    passed: bool
    failed: int
    total: int
    worst: RuleResult | None
    affected: list[RuleResult] = field(default_factory=list)
    """The failing layers; when none fails, the warned ones (findings rules)."""


@dataclass
class CheckResult:
    """What :func:`check` returns: one :class:`RuleResult` per rule, run and layer."""

    rules: list[RuleResult]
    window: int | None = None
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    """The checked runs' summaries (:meth:`routelog.api.Run.summary`): k and its source,
    warnings."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]

    def summaries(self) -> list[RuleSummary]:
        """Per rule, in evaluation order: failed layers and the worst layer.

        The worst layer is the failing one furthest beyond its limit; when none fails, the
        warned one furthest beyond (findings rules), else the one closest to its limit
        (thresholds). Findings rules without a finding name no layer.
        """
        by_rule: dict[str, list[RuleResult]] = {}
        for result in self.rules:
            by_rule.setdefault(result.rule, []).append(result)
        out = []
        for rule, results in by_rule.items():
            failed = [r for r in results if not r.passed]
            warned = [r for r in results if r.passed and r.warned]
            affected = failed or warned
            candidates = affected or [r for r in results if r.margin is not None]
            worst = min(
                candidates,
                key=lambda r: math.inf if r.margin is None else r.margin,
                default=None,
            )
            metric = next((r.metric for r in results if r.metric), None)
            out.append(
                RuleSummary(rule, metric, not failed, len(failed), len(results), worst, affected)
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """``{"passed": bool, "runs": [...], "rules": [...], "notes": [...]}``
        (``--format json``); each run says its ``top_k`` and ``top_k_source``."""
        return {
            "passed": self.passed,
            "runs": [_run_entry(run) for run in self.runs],
            "rules": [r.to_dict() for r in self.rules],
            "notes": self.notes,
        }


RUN_KEYS = (
    "run",
    "path",
    "top_k",
    "top_k_source",
    "top_k_file",
    "rows",
    "masked_rows",
    "skipped_rows",
    "warnings",
    "merged_runs",
)


def _run_entry(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: summary.get(key) for key in RUN_KEYS}


def check(
    analysis: Analysis,
    settings: CheckSettings | None = None,
    *,
    baseline: Analysis | None = None,
    align: Align = "exact",
    window: int | None = None,
    strict: bool = False,
) -> CheckResult:
    """Evaluate the check rules on an analysis (``settings`` default: its configuration's)."""
    require_known_k(analysis)
    if baseline is not None:
        require_known_k(baseline, "--baseline ")
    settings = settings if settings is not None else analysis.config.check
    enabled = analysis.config.rules
    result = evaluate(
        analysis.metrics,
        analysis.findings,
        settings,
        baseline=None if baseline is None else baseline.metrics,
        align=align,
        window=window,
        strict=strict,
        enabled=enabled,
    )
    result.runs = [run.summary() for run in analysis.runs]
    result.notes += analysis.notes
    result.rules += merged_rules(analysis)
    return result


def require_known_k(analysis: Analysis, role: str = "") -> None:
    """Refuse to gate a run whose k (experts per token) was assumed.

    Dead experts, load and assignment entropy and the load shares count each token's top-k
    choices, so the verdict can turn on k: the real top-2 Mixtral run with an aux loss in
    this repository's tests fails ``collapse`` at an assumed k=1 and passes at k=2. A
    report may state its assumption and go on; an exit code cannot state anything.
    """
    for run in analysis.runs:
        if run.top_k_assumed:
            raise UsageError(
                f"{role}{run.path}: the logs do not state k (experts per token), and the "
                "verdict depends on it (dead experts and load shares count top-k choices): "
                "pass --top-k K, or set top_k in routelog.toml"
            )


MERGED_RULE = "merged_runs"


def merged_rules(analysis: Analysis) -> list[RuleResult]:
    """A failing ``merged_runs`` result for each layer that two files of one run log for the
    same tokens: the metrics average several runs, so no other verdict on them can be
    trusted (a collapsing run merged with a healthy one passes). Runs without such files
    get no result (the rule is not listed)."""
    out = []
    for run in analysis.runs:
        if run.merged is None:
            continue
        from routelog.api import merged_message

        full = f"run {run.name}: {merged_message(run.merged)}"
        for index, layer in enumerate(run.merged["layers"]):
            short = f"run {run.name} layer {layer}: two files log the same tokens (see above)"
            message = full if index == 0 else short
            out.append(RuleResult(MERGED_RULE, None, run.name, layer, None, None, False, message))
    return out


def evaluate(
    metrics: pl.DataFrame,
    findings: list[Finding],
    settings: CheckSettings,
    *,
    baseline: pl.DataFrame | None = None,
    align: Align = "exact",
    window: int | None = None,
    strict: bool = False,
    enabled: tuple[str, ...] | None = None,
) -> CheckResult:
    """The rules on a metrics frame (one row per run x step x layer) and its findings."""
    if window is not None and window < 1:
        raise UsageError(f"--window must be at least 1, got {window}")
    layers = metrics.select(KEYS).unique().sort(KEYS).rows()
    result = CheckResult([], window=window)
    if settings.max_regression and baseline is None:
        # the configuration's max_regression table is for runs checked against --baseline
        # (asking for it by --max-regression without one is refused before reading)
        names = ", ".join(sorted(settings.max_regression))
        result.notes.append(f"max_regression ({names}) not checked: no --baseline given")
    result.rules += _finding_rules(findings, layers, settings, strict, enabled)
    if settings.bounds:
        result.rules += _threshold_rules(metrics, settings.bounds, window)
        present = set(metrics["layer"].unique().to_list())
        for bound in settings.bounds:  # a layer range of another model: said, not ignored
            if bound.layers is not None and not any(bound.applies_to(x) for x in present):
                result.notes.append(f"{bound.key} not checked: no layer of the run is in its range")
    if baseline is not None and settings.max_regression:
        rules, notes = _regression_rules(metrics, baseline, settings.max_regression, align)
        result.rules += rules
        result.notes += notes
    return result


# --- findings --------------------------------------------------------------------------------


def _finding_rules(
    findings: list[Finding],
    layers: list[tuple[str, int]],
    settings: CheckSettings,
    strict: bool,
    enabled: tuple[str, ...] | None,
) -> list[RuleResult]:
    listed = settings.fail_on is not None
    codes = settings.fail_on if settings.fail_on is not None else SEVERE_RULES
    codes = tuple(c for c in codes if enabled is None or c in enabled)
    found = {(f.code, f.run, f.layer): f for f in findings}
    out = []
    for code in codes:
        for run, layer in layers:
            finding = found.get((code, run, layer))
            out.append(_finding_result(code, run, layer, finding, listed, strict))
    return out


def _finding_result(
    code: str, run: str, layer: int, finding: Finding | None, listed: bool, strict: bool
) -> RuleResult:
    if finding is None:
        return RuleResult(code, None, run, layer, None, None, True, f"run {run}: no {code} finding")
    severe = listed or finding.severity == "fail"
    passed = not (severe and (finding.active or strict))
    if passed and not severe:
        note = f"{finding.severity} only ({code} is not in fail_on)"
    elif passed:
        note = "no longer active at the latest step (--strict fails it)"
    else:
        note = "" if finding.active else "no longer active; failed by --strict"
    message = f"run {run}: {finding.message}" + (f" [{note}]" if note else "")
    return RuleResult(
        code,
        finding.metric,
        run,
        layer,
        finding.value,
        finding.threshold,
        passed,
        message,
        finding.last_step,
        finding.margin,
        warned=passed and finding.active,
        earlier=not finding.active,
    )


# --- thresholds ------------------------------------------------------------------------------


def layer_values(metrics: pl.DataFrame, names: list[str], window: int | None) -> pl.DataFrame:
    """Per (run, layer): each metric at the latest logged step, or its mean over the last
    ``window`` logged steps, with ``first_step``, ``step`` (the latest) and ``n_steps``.

    Examples
    --------
    >>> frame = pl.DataFrame({"run": ["r"] * 3, "step": [0, 1, 2], "layer": [0] * 3,
    ...     "x": [0.1, 0.5, 0.9]})
    >>> layer_values(frame, ["x"], 2).select("first_step", "step", "x").row(0)
    (1, 2, 0.7)
    """
    last = window if window is not None else 1
    from_end = pl.col("step").rank("ordinal", descending=True).over(KEYS)
    return (
        metrics.filter(from_end <= last)
        .group_by(KEYS)
        .agg(
            pl.col("step").min().alias("first_step"),
            pl.col("step").max(),
            pl.len().alias("n_steps"),
            *[pl.col(name).cast(pl.Float64).mean() for name in names],
        )
        .sort(KEYS)
    )


def _threshold_rules(
    metrics: pl.DataFrame, bounds: tuple[Bound, ...], window: int | None
) -> list[RuleResult]:
    names = sorted({b.metric for b in bounds})
    values = layer_values(metrics, names, window)
    out = []
    for rule in dict.fromkeys(b.rule for b in bounds):
        for row in values.iter_rows(named=True):
            bound = _bound_for(bounds, rule, row["layer"])
            if bound is not None:
                out.append(_threshold_result(bound, row, window))
    return out


def _bound_for(bounds: tuple[Bound, ...], rule: str, layer: int) -> Bound | None:
    """The layer's own range value wins over the global one."""
    matching = [b for b in bounds if b.rule == rule and b.applies_to(layer)]
    return min(matching, key=lambda b: b.layers is None, default=None)


def _threshold_result(bound: Bound, row: dict[str, Any], window: int | None) -> RuleResult:
    value = row[bound.metric]
    where = f"run {row['run']} layer {row['layer']}"
    if value is None or math.isnan(value):
        needs = NEEDS.get(bound.metric, "what it is computed from")
        raise UsageError(
            f"{bound.key}: {where} has no {bound.metric} (it needs {needs}); remove the "
            "threshold or check other metrics"
        )
    margin = value - bound.value if bound.kind == "min" else bound.value - value
    passed = margin >= 0
    at = _at(row, window)
    if passed:
        verdict = "at or above the minimum" if bound.kind == "min" else "at or below the maximum"
    else:
        verdict = "below the minimum" if bound.kind == "min" else "above the maximum"
    message = (
        f"{where}: {bound.metric} {_num(value)} {at} is {verdict} {_num(bound.value)} ({bound.key})"
    )
    return RuleResult(
        bound.rule,
        bound.metric,
        row["run"],
        row["layer"],
        value,
        bound.value,
        passed,
        message,
        row["step"],
        margin,
    )


def _at(row: dict[str, Any], window: int | None) -> str:
    if window is None or row["n_steps"] == 1:
        return f"at step {row['step']}"
    return f"(mean of the last {row['n_steps']} logged steps, {row['first_step']}-{row['step']})"


def _num(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}"


# --- regression against a baseline ----------------------------------------------------------


def aligned(
    metrics: pl.DataFrame, baseline: pl.DataFrame, names: list[str], align: Align = "exact"
) -> pl.DataFrame:
    """Each (run, layer) of ``metrics`` next to the baseline's layer, at the steps
    :func:`routelog.compare.align_steps` pairs: the latest step both logged, or with
    ``align="nearest"`` the baseline's latest step and the run's latest one at or before it.

    Columns: run, layer, step, the metrics, ``baseline``, ``baseline_step``, and each metric
    as ``baseline_<metric>``. Layers the baseline lacks, or with another expert count, are
    left out. Raises ``UsageError`` when a run cannot be aligned with the baseline.
    """
    base_name = baseline["run"][0]
    columns = ["run", "step", "layer", "n_experts", *names]
    parts = []
    for run in metrics["run"].unique(maintain_order=True).to_list():
        rows = metrics.filter(pl.col("run") == run).select(columns)
        label = base_name if base_name != run else f"{base_name} (baseline)"
        both = pl.concat([baseline.select(columns).with_columns(run=pl.lit(label)), rows])
        try:
            base_group, run_group = align_steps(both, [label, run], None, align, what="run")
        except UsageError:
            if align == "nearest":
                raise
            raise UsageError(
                f"run {run!r} (steps {_steps(rows)}) shares no logged step with the baseline "
                f"{base_name!r} (steps {_steps(baseline)}): pair the baseline's latest step "
                "with each run's latest earlier one with --align nearest"
            ) from None
        base = baseline.filter(pl.col("step") == base_group.step).select(
            "layer",
            "n_experts",
            pl.lit(base_name).alias("baseline"),
            pl.col("step").alias("baseline_step"),
            *[pl.col(n).alias(f"baseline_{n}") for n in names],
        )
        here = rows.filter(pl.col("step") == run_group.step)
        parts.append(here.join(base, on=["layer", "n_experts"], how="inner"))
    return pl.concat(parts).sort(KEYS)


def _steps(frame: pl.DataFrame) -> str:
    steps = frame["step"].to_list()
    return f"{min(steps)}-{max(steps)}"


def _regression_rules(
    metrics: pl.DataFrame, baseline: pl.DataFrame, tolerances: dict[str, float], align: Align
) -> tuple[list[RuleResult], list[str]]:
    if baseline["run"].n_unique() != 1:
        raise UsageError("--baseline must be one run")
    names = list(tolerances)
    pairs = aligned(metrics, baseline, names, align)
    compared = set(pairs.select(KEYS).rows())
    notes = [
        f"run {run} layer {layer}: not compared with the baseline (the baseline lacks the "
        "layer at the common step, or it has another expert count)"
        for run, layer in metrics.select(KEYS).unique().sort(KEYS).rows()
        if (run, layer) not in compared
    ]
    if pairs.height == 0:
        raise UsageError("no layer of the checked runs can be compared with the baseline")
    out = []
    for metric, tolerance in tolerances.items():
        for row in pairs.iter_rows(named=True):
            out.append(_regression_result(metric, tolerance, row))
    return out, notes


def _regression_result(metric: str, tolerance: float, row: dict[str, Any]) -> RuleResult:
    value, base = row[metric], row[f"baseline_{metric}"]
    where = f"run {row['run']} layer {row['layer']}"
    if value is None or base is None:
        raise UsageError(
            f"max_regression.{metric}: {where} or the baseline has no {metric} at step "
            f"{row['step']} (it needs {NEEDS.get(metric, 'what it is computed from')})"
        )
    sign = TOWARDS_COLLAPSE[metric]
    moved = (value - base) * sign
    limit = base + sign * tolerance
    lo, hi = METRIC_RANGES[metric]
    limit = max(limit, lo) if hi is None else min(max(limit, lo), hi)
    passed = moved <= tolerance
    direction = "fell" if value < base else "rose" if value > base else "stayed"
    worse = "towards collapse" if moved > 0 else "away from collapse"
    message = (
        f"{where}: {metric} {direction} from {_num(base)} (baseline {row['baseline']}"
        + ("" if row["baseline_step"] == row["step"] else f" at step {row['baseline_step']}")
        + f") to {_num(value)} at step {row['step']}"
        + (
            f", {_num(abs(value - base))} {worse}; "
            f"{'within' if passed else 'more than'} the tolerance {_num(tolerance)}"
            if value != base
            else ""
        )
    )
    return RuleResult(
        f"max_regression.{metric}",
        metric,
        row["run"],
        row["layer"],
        float(value),
        float(limit),
        passed,
        message,
        row["step"],
        tolerance - moved,
    )


# --- suggest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """A threshold suggested from a healthy run: ``key = value``, from ``observed`` in
    ``layer`` (the layer closest to the threshold)."""

    key: str
    value: float
    observed: float
    layer: int


def suggest(metrics: pl.DataFrame, window: int | None = None) -> list[Suggestion]:
    """Thresholds a margin outside what a healthy run shows at its latest step (or window).

    ``min_<metric>``: the lowest value over layers minus max(0.05, 10% of it), floored at 0;
    ``max_<metric>``: the highest value plus max(0.05, 10% of it), capped at the metric's
    maximum; ``max_dead_experts``: the highest count (a dead expert is a whole expert: no
    margin). Values are rounded outwards to 3 decimals, so the run passes its own check.
    Metrics the data cannot give (null) are left out.
    """
    names = [*SUGGEST_MIN, *SUGGEST_MAX]
    values = layer_values(metrics, names, window)
    out = []
    for metric in names:
        column = values.select("layer", metric).drop_nulls().drop_nans()
        if column.height == 0:
            continue
        lowest = metric in SUGGEST_MIN
        row = column.sort(metric, descending=not lowest).row(0)
        layer, observed = int(row[0]), float(row[1])
        lo, hi = METRIC_RANGES[metric]
        value: float
        if metric == "dead_experts":
            value = math.ceil(observed)
        elif lowest:
            value = max(math.floor((observed - _margin(observed)) * 1000) / 1000, lo)
        else:
            value = math.ceil((observed + _margin(observed)) * 1000) / 1000
            value = min(value, hi) if hi is not None else value
        out.append(Suggestion(f"{'min' if lowest else 'max'}_{metric}", value, observed, layer))
    return out


def _margin(observed: float) -> float:
    return max(MARGIN_ABS, MARGIN_REL * abs(observed))
