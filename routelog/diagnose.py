"""Diagnose: the metrics frame -> findings, one per rule, run and layer.

Every rule is a Polars expression over the metrics of :func:`routelog.api.metrics_of` (one row
per run x step x layer), evaluated per (run, layer) with window expressions. A rule that holds
over several separate spans of steps is reported once, for its *latest* span: that is the
span a person acts on (it is the one still going on, when ``active``), and earlier spans of
the same problem would repeat the same advice. The README documents each rule, its default
and why.

Runs with a single logged step get the level rules only (``collapse``, ``rigidity``); the
trend rules need at least two steps.

Examples
--------
>>> import polars as pl
>>> from routelog.config import Config
>>> metrics = pl.DataFrame({"run": ["r"], "step": [0], "layer": [0], "n_experts": [8],
...     "token_entropy_norm": [0.02], "load_entropy_norm": [0.9], "assign_entropy_norm": [0.9],
...     "mutual_info": [1.0], "max_vio": [0.5], "dead_experts": [0]})
>>> [(f.code, f.severity) for f in diagnose(metrics, Config())]
[('rigidity', 'fail')]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import polars as pl

from routelog.config import Config, Thresholds
from routelog.experts import dead_at
from routelog.findings import Finding, Severity, sort_findings

KEYS = ["run", "layer"]
LEVEL_RULES = ("collapse", "rigidity")
BEGINNING_RULES = ("premature_specialization", "early_saturation")
"""Rules about the first part of a run: they run only when the run's beginning is in view."""
TREND_NOTE = "trends need at least two logged steps: only level rules (collapse, rigidity) ran"

_Row = dict[str, Any]


NAMES_EXPERTS = ("collapse", "underutilization")
"""Rules whose findings list the dead experts (``Finding.dead_experts``)."""


def diagnose(
    metrics: pl.DataFrame,
    config: Config | None = None,
    *,
    dead_fraction: float | None = None,
    beginning: bool = True,
) -> list[Finding]:
    """Findings of every enabled rule, sorted fail first, then by run and layer.

    ``dead_fraction`` (default: the configuration's) is the one the metrics' ``dead_experts``
    were counted with; ``collapse`` and ``underutilization`` findings name those experts.
    ``beginning`` False (a ``--steps`` selection that starts after step 0) skips
    :data:`BEGINNING_RULES`: "the first 20% of the run" of a window is not the run's start.
    """
    config = config if config is not None else Config()
    if metrics.height == 0:
        return []
    fraction = config.dead_fraction if dead_fraction is None else dead_fraction
    names = "load_share" in metrics.columns
    frame = _prepare(metrics)
    trend = frame.filter(pl.col("_run_steps") >= 2)
    t = config.thresholds
    findings: list[Finding] = []
    for code, (rule, message) in _RULES.items():
        if not config.enabled(code) or (not beginning and code in BEGINNING_RULES):
            continue
        source = frame if code in LEVEL_RULES else trend
        if source.height == 0:
            continue
        for row in rule(source, t).iter_rows(named=True):
            if code in NAMES_EXPERTS and names:
                row["_dead"] = dead_at(
                    metrics, row["run"], row["layer"], row["last_step"], fraction
                )
            findings.append(_finding(code, row, message(row, t)))
    return sort_findings(findings)


def named_experts(dead: list[dict[str, int]] | None, most: int = 8) -> str:
    """``experts 5 since step 600; 7 since step 800``: the first ``most`` of them.

    Examples
    --------
    >>> named_experts([{"expert": 5, "since_step": 600}, {"expert": 7, "since_step": 600}])
    'experts 5, 7 since step 600'
    """
    if not dead:
        return ""
    by_step: dict[int, list[int]] = {}
    for item in dead:
        by_step.setdefault(item["since_step"], []).append(item["expert"])
    shown = 0
    parts = []
    for since, ids in sorted(by_step.items()):
        room = most - shown
        if room <= 0:
            break
        parts.append(f"{', '.join(map(str, ids[:room]))} since step {since}")
        shown += min(len(ids), room)
    more = f" and {len(dead) - shown} more" if shown < len(dead) else ""
    noun = "expert" if len(dead) == 1 else "experts"
    return f"{noun} {'; '.join(parts)}{more}"


def _prepare(metrics: pl.DataFrame) -> pl.DataFrame:
    return metrics.sort(*KEYS, "step").with_columns(
        pl.col("step").min().over("run").alias("_run_first"),
        pl.col("step").max().over("run").alias("_run_last"),
        pl.col("step").n_unique().over("run").alias("_run_steps"),
        pl.int_range(pl.len()).over(KEYS).alias("_index"),
        pl.len().over(KEYS).alias("_count"),
    )


def _step_fraction() -> pl.Expr:
    """Where a step lies in its run's step range: 0 at the first step, 1 at the last."""
    span = pl.col("_run_last") - pl.col("_run_first")
    return pl.when(span > 0).then((pl.col("step") - pl.col("_run_first")) / span).otherwise(0.0)


def _latest_span(frame: pl.DataFrame, hit: pl.Expr, min_steps: int = 1) -> pl.DataFrame:
    """The latest run of consecutive logged steps where ``hit`` holds, per (run, layer).

    Returns the row at the span's last step (``step`` renamed ``last_step``) with
    ``first_step``, ``n_steps`` and ``active``. A span shorter than ``min_steps`` counts only
    when it reaches the run's latest step: it is still going on, and waiting for a second
    step would hide the start of a collapse.
    """
    marked = frame.with_columns(hit.fill_null(False).alias("_hit")).with_columns(
        (pl.col("_hit") != pl.col("_hit").shift(1))
        .fill_null(True)
        .cum_sum()
        .over(KEYS)
        .alias("_span")
    )
    spans = (
        marked.filter(pl.col("_hit"))
        .group_by(*KEYS, "_span")
        .agg(
            pl.col("step").min().alias("first_step"),
            pl.len().alias("n_steps"),
            pl.all().exclude(*KEYS, "_span").sort_by("step").last(),
        )
        .rename({"step": "last_step"})
        .with_columns((pl.col("last_step") == pl.col("_run_last")).alias("active"))
        .filter((pl.col("n_steps") >= min_steps) | pl.col("active"))
    )
    return (
        spans.filter(pl.col("last_step") == pl.col("last_step").max().over(KEYS))
        .drop("_span")
        .sort(KEYS)
    )


def _with_verdict(
    spans: pl.DataFrame,
    metric: str | pl.Expr,
    value: pl.Expr,
    threshold: float | pl.Expr,
    severity: Severity | pl.Expr = "warn",
) -> pl.DataFrame:
    def lit(x: Any) -> pl.Expr:
        return x if isinstance(x, pl.Expr) else pl.lit(x)

    return spans.with_columns(
        lit(metric).alias("_metric"),
        value.cast(pl.Float64).alias("_value"),
        lit(threshold).cast(pl.Float64).alias("_threshold"),
        lit(severity).alias("_severity"),
    )


# --- level rules -----------------------------------------------------------------------------


def _collapse(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    load = pl.col("load_entropy_norm") < t.collapse_entropy
    assign = pl.col("assign_entropy_norm") < t.collapse_entropy
    dead_limit = pl.col("n_experts") * t.collapse_dead_share
    dead = pl.col("dead_experts") > dead_limit  # a threshold is the last value that passes
    spans = _latest_span(
        frame, load.fill_null(False) | assign.fill_null(False) | dead, t.collapse_min_steps
    )
    return _with_verdict(
        spans,
        pl.when(load)
        .then(pl.lit("load_entropy_norm"))
        .when(assign)
        .then(pl.lit("assign_entropy_norm"))
        .otherwise(pl.lit("dead_experts")),
        pl.when(load)
        .then(pl.col("load_entropy_norm"))
        .when(assign)
        .then(pl.col("assign_entropy_norm"))
        .otherwise(pl.col("dead_experts")),
        pl.when(load | assign).then(t.collapse_entropy).otherwise(dead_limit),
        "fail",
    )


def _rigidity(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    spans = _latest_span(frame, pl.col("token_entropy_norm") < t.rigidity_warn)
    failing = pl.col("token_entropy_norm") < t.rigidity_fail
    return _with_verdict(
        spans,
        "token_entropy_norm",
        pl.col("token_entropy_norm"),
        pl.when(failing).then(t.rigidity_fail).otherwise(t.rigidity_warn),
        pl.when(failing).then(pl.lit("fail")).otherwise(pl.lit("warn")),
    )


# --- trend rules -----------------------------------------------------------------------------


def _underutilization(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    spans = _latest_span(frame, pl.col("dead_experts") >= 1, t.underutilization_min_steps)
    spans = spans.filter(pl.col("n_steps") >= t.underutilization_min_steps)
    return _with_verdict(spans, "dead_experts", pl.col("dead_experts"), 0.0)


def _wasted_capacity(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    mi_norm = pl.col("mutual_info") / pl.col("n_experts").cast(pl.Float64).log()
    frame = frame.with_columns(mi_norm.alias("mutual_info_norm"))
    hit = (
        (_step_fraction() > t.wasted_after)
        & (pl.col("token_entropy_norm") > t.wasted_entropy)
        & (pl.col("mutual_info_norm") < t.wasted_mutual_info)
    )
    spans = _latest_span(frame, hit)
    return _with_verdict(
        spans, "token_entropy_norm", pl.col("token_entropy_norm"), t.wasted_entropy
    )


def _sharp_drop(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    columns = []
    for name, short in (("token_entropy_norm", "tok"), ("load_entropy_norm", "load")):
        change = pl.col(name) - pl.col(name).shift(1)
        # The series' own recent step-to-step changes, before this one: a drop counts when it
        # departs from their mean by more than sharp_drop_sigmas of their spread, so a steady
        # decay (large but regular changes) is not a sharp drop.
        recent = change.shift(1)
        columns += [
            (-change).over(KEYS).alias(f"_drop_{short}"),
            recent.rolling_std(t.sharp_drop_window, min_samples=3)
            .over(KEYS)
            .alias(f"_noise_{short}"),
            recent.rolling_mean(t.sharp_drop_window, min_samples=3)
            .over(KEYS)
            .alias(f"_trend_{short}"),
        ]
    frame = frame.with_columns(columns)
    hits = {}
    for short in ("tok", "load"):
        drop, noise = pl.col(f"_drop_{short}"), pl.col(f"_noise_{short}")
        surprise = drop + pl.col(f"_trend_{short}")
        hits[short] = (
            (drop > t.sharp_drop)
            | ((surprise > t.sharp_drop_sigmas * noise) & (drop > t.sharp_drop_min))
        ).fill_null(False)
    frame = frame.with_columns(
        hits["tok"].alias("_hit_tok"),
        hits["load"].alias("_hit_load"),
        pl.col("step").shift(1).over(KEYS).alias("_prev_step"),
    )
    spans = _latest_span(frame, pl.col("_hit_tok") | pl.col("_hit_load"))
    tok = pl.col("_hit_tok")
    drop = pl.when(tok).then(pl.col("_drop_tok")).otherwise(pl.col("_drop_load"))
    noise = pl.when(tok).then(pl.col("_noise_tok")).otherwise(pl.col("_noise_load"))
    trend = pl.when(tok).then(pl.col("_trend_tok")).otherwise(pl.col("_trend_load"))
    spans = spans.with_columns(drop.alias("_drop"))
    return _with_verdict(
        spans,
        pl.when(tok).then(pl.lit("token_entropy_norm")).otherwise(pl.lit("load_entropy_norm")),
        pl.when(tok).then(pl.col("token_entropy_norm")).otherwise(pl.col("load_entropy_norm")),
        pl.when(drop > t.sharp_drop)
        .then(t.sharp_drop)
        .otherwise(
            pl.max_horizontal(t.sharp_drop_sigmas * noise - trend, pl.lit(t.sharp_drop_min))
        ),
    )


def _premature_specialization(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    hit = (_step_fraction() <= t.premature_within) & (
        pl.col("token_entropy_norm") < t.premature_entropy
    )
    spans = _latest_span(frame, hit)
    return _with_verdict(
        spans, "token_entropy_norm", pl.col("token_entropy_norm"), t.premature_entropy
    )


def _early_saturation(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    if "saturation" not in frame.columns:  # token positions unknown: no saturation series
        return frame.head(0)
    hit = (_step_fraction() <= t.saturation_within) & (pl.col("saturation") > t.saturation)
    spans = _latest_span(frame, hit)
    return _with_verdict(spans, "saturation", pl.col("saturation"), t.saturation)


def _persistent_skew(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    spans = _latest_span(frame, pl.col("max_vio") > t.skew_max_vio, t.skew_min_steps)
    spans = spans.filter(pl.col("n_steps") >= t.skew_min_steps)
    return _with_verdict(spans, "max_vio", pl.col("max_vio"), t.skew_max_vio)


def _instability(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    window = frame.filter(pl.col("_index") >= pl.col("_count") - t.instability_window)
    diff = (pl.col("token_entropy_norm") - pl.col("token_entropy_norm").shift(1)).over(KEYS)
    window = window.with_columns(diff.alias("_diff")).with_columns(
        pl.col("_diff").shift(1).over(KEYS).alias("_prev_diff")
    )
    big = (pl.col("_diff").abs() > t.instability_amplitude) & (
        pl.col("_prev_diff").abs() > t.instability_amplitude
    )
    swing = (big & (pl.col("_diff").sign() != pl.col("_prev_diff").sign())).fill_null(False)
    spans = (
        window.with_columns(swing.alias("_swing"))
        .group_by(KEYS)
        .agg(
            pl.col("step").min().alias("first_step"),
            pl.col("_swing").sum().alias("swings"),
            pl.all().exclude(*KEYS).sort_by("step").last(),
        )
        .rename({"step": "last_step"})
        .filter(pl.col("swings") >= t.instability_changes)
        .with_columns((pl.col("last_step") == pl.col("_run_last")).alias("active"))
        .sort(KEYS)
    )
    return _with_verdict(
        spans, "token_entropy_norm", pl.col("token_entropy_norm"), t.instability_amplitude
    )


def _forecast(frame: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    window = frame.filter(
        (pl.col("_count") >= t.forecast_window)
        & (pl.col("_index") >= pl.col("_count") - t.forecast_window)
    ).drop_nulls("token_entropy_norm")
    x, y = pl.col("step").cast(pl.Float64), pl.col("token_entropy_norm")
    fits = (
        window.group_by(KEYS)
        .agg(
            pl.col("step").min().alias("first_step"),
            (pl.cov(x, y) / x.var()).alias("slope"),
            (pl.corr(x, y) ** 2).alias("r2"),
            (y.mean() - pl.cov(x, y) / x.var() * x.mean()).alias("intercept"),
            pl.all().exclude(*KEYS).sort_by("step").last(),
        )
        .rename({"step": "last_step"})
        .with_columns(
            ((t.rigidity_warn - pl.col("intercept")) / pl.col("slope"))
            .ceil()
            .cast(pl.Int64, strict=False)
            .alias("predicted_step"),
            (pl.col("last_step") == pl.col("_run_last")).alias("active"),
        )
    )
    horizon = t.forecast_horizon * (pl.col("_run_last") - pl.col("_run_first"))
    spans = fits.filter(
        (pl.col("slope") < 0)
        & (pl.col("r2") >= t.forecast_min_r2)
        & (pl.col("token_entropy_norm") > t.rigidity_warn)
        & (pl.col("predicted_step") > pl.col("last_step"))
        & (pl.col("predicted_step") <= pl.col("last_step") + horizon)
    ).sort(KEYS)
    return _with_verdict(spans, "token_entropy_norm", pl.col("token_entropy_norm"), t.rigidity_warn)


# --- messages --------------------------------------------------------------------------------


def _span(row: _Row) -> str:
    if row["first_step"] == row["last_step"]:
        return f"at step {row['last_step']}"
    return f"from step {row['first_step']} to {row['last_step']}"


def _since(row: _Row) -> str:
    return f"since step {row['first_step']}" if row["active"] else _span(row)


def _number(value: float) -> str:
    """A loss for a sentence: 3 significant figures, no exponent (``220``, ``7.47``)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _losses(row: _Row, *names: str) -> str:
    """``; aux loss 8.00 vs 2 balanced, z-loss 220``: the router losses and confidence
    that explain a finding, where the data has them (z-loss needs logits)."""
    parts = []
    for name in names:
        value = row.get(name)
        if value is None or value != value:
            continue
        if name == "aux_loss":
            balanced = row.get("top_k")
            when = f" vs {balanced} balanced" if balanced else ""
            parts.append(f"aux loss {_number(value)}{when}")
        elif name == "z_loss":
            parts.append(f"z-loss {_number(value)}")
        elif name == "top1_prob":
            parts.append(f"top-1 probability {value:.3f}")
    return "; " + ", ".join(parts) if parts else ""


def _collapse_message(row: _Row, t: Thresholds) -> str:
    metric = row["_metric"]
    if metric == "dead_experts":
        dead = f"{row['dead_experts']} of {row['n_experts']}"
        what = f"{dead} experts receive almost no tokens or weight"
        if row.get("_dead"):
            what += f": {named_experts(row['_dead'])}"
    elif metric == "load_entropy_norm":
        what = f"load entropy is {row['load_entropy_norm']:.2f} of its maximum"
    else:
        what = f"assignment entropy is {row['assign_entropy_norm']:.2f} of its maximum"
    losses = _losses(row, "aux_loss", "z_loss")
    return (
        f"Layer {row['layer']} routes to a few experts only ({what}{losses}) {_since(row)}: "
        "check its load-balancing loss and router initialisation."
    )


def _rigidity_message(row: _Row, t: Thresholds) -> str:
    losses = _losses(row, "top1_prob", "z_loss")
    return (
        f"Layer {row['layer']}'s router is nearly deterministic (token entropy "
        f"{row['token_entropy_norm']:.3f}{losses}) {_since(row)}: look at router logit scale, "
        "z-loss and learning rate."
    )


def _underutilization_message(row: _Row, t: Thresholds) -> str:
    return (
        f"Layer {row['layer']} leaves {row['dead_experts']} of {row['n_experts']} experts "
        f"without tokens or weight {_span(row)}{_named(row)}: check its load balance and "
        "capacity factor."
    )


def _named(row: _Row) -> str:
    names = named_experts(row.get("_dead"))
    return f" ({names})" if names else ""


def _wasted_capacity_message(row: _Row, t: Thresholds) -> str:
    return (
        f"Layer {row['layer']}'s router still spreads every token almost uniformly "
        f"(token entropy {row['token_entropy_norm']:.3f}, mutual information "
        f"{row['mutual_info_norm']:.3f} of ln E) {_span(row)}: its experts never specialised; "
        "check the router's learning rate and gradients."
    )


def _sharp_drop_message(row: _Row, t: Thresholds) -> str:
    name = "token" if row["_metric"] == "token_entropy_norm" else "load"
    return (
        f"Layer {row['layer']}'s {name} entropy fell by {row['_drop']:.2f} from step "
        f"{row['_prev_step']} to {row['last_step']}: an early sign of collapse; look at "
        "what changed then (learning rate, data, loss spikes)."
    )


def _premature_message(row: _Row, t: Thresholds) -> str:
    return (
        f"Layer {row['layer']}'s router was already nearly decided (token entropy "
        f"{row['token_entropy_norm']:.3f}) {_span(row)}, in the first "
        f"{t.premature_within:.0%} of the run: check router initialisation and warm-up."
    )


def _early_saturation_message(row: _Row, t: Thresholds) -> str:
    return (
        f"Layer {row['layer']}'s top-k choices already overlap {row['saturation']:.0%} with "
        f"the final step's {_span(row)}, in the first {t.saturation_within:.0%} of the run: "
        "the router stopped exploring early."
    )


def _persistent_skew_message(row: _Row, t: Thresholds) -> str:
    losses = _losses(row, "aux_loss")
    return (
        f"Layer {row['layer']}'s busiest expert gets {row['max_vio'] + 1:.1f} times the mean "
        f"load{f' ({losses[2:]})' if losses else ''} {_span(row)}: strengthen load balancing "
        "for this layer."
    )


def _instability_message(row: _Row, t: Thresholds) -> str:
    return (
        f"Layer {row['layer']}'s token entropy swings up and down ({row['swings']} reversals "
        f"larger than {t.instability_amplitude}) {_span(row)}: look at learning rate and "
        "router gradient noise."
    )


def _forecast_message(row: _Row, t: Thresholds) -> str:
    return (
        f"Layer {row['layer']}'s token entropy falls steadily "
        f"({row['slope'] * 100:+.4f} per 100 steps) and will cross the rigidity threshold "
        f"{t.rigidity_warn} around step {row['predicted_step']}: act before then."
    )


Rule = Callable[[pl.DataFrame, Thresholds], pl.DataFrame]
Message = Callable[[_Row, Thresholds], str]

_RULES: dict[str, tuple[Rule, Message]] = {
    "collapse": (_collapse, _collapse_message),
    "rigidity": (_rigidity, _rigidity_message),
    "underutilization": (_underutilization, _underutilization_message),
    "wasted_capacity": (_wasted_capacity, _wasted_capacity_message),
    "sharp_drop": (_sharp_drop, _sharp_drop_message),
    "premature_specialization": (_premature_specialization, _premature_message),
    "persistent_skew": (_persistent_skew, _persistent_skew_message),
    "instability": (_instability, _instability_message),
    "forecast": (_forecast, _forecast_message),
    "early_saturation": (_early_saturation, _early_saturation_message),
}


def _finding(code: str, row: _Row, message: str) -> Finding:
    value = row["_value"]
    return Finding(
        code=code,
        severity=row["_severity"],
        run=row["run"],
        layer=row["layer"],
        first_step=row["first_step"],
        last_step=row["last_step"],
        active=bool(row["active"]),
        metric=row["_metric"],
        value=None if value is None or math.isnan(value) else float(value),
        threshold=row["_threshold"],
        message=message,
        predicted_step=row.get("predicted_step"),
        dead_experts=row.get("_dead"),
    )
