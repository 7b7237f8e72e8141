"""Compare routing side by side: runs against a baseline run, or datasets within one run.

The first run (or dataset group) is the baseline. Runs are aligned on (layer, step): by
default the latest step every run logged; ``step=N`` picks another; ``align="nearest"`` pairs
the baseline's step with each run's latest logged step at or before it. Per layer and run:
the run's normalised token and load entropy, max load share and dead experts, their
difference from the baseline (run minus baseline), and ``jsd``, the Jensen-Shannon
divergence (bits, in [0, 1]) between the two expert load distributions f. When both routed
the same tokens, also ``agreement_top1`` and ``overlap_topk`` (:mod:`routelog.tokens`).

What cannot be compared (a layer one run lacks, a layer with a different expert count, token
metrics without the same tokens) is left out and listed with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from routelog import api, kernels, tokens
from routelog.errors import InputError, UsageError
from routelog.findings import Finding

if TYPE_CHECKING:
    from routelog.options import Options

Align = Literal["exact", "nearest"]
By = Literal["run", "dataset"]

SHIFT_THRESHOLD = 0.1
"""JSD from the baseline dataset above which a layer gets a ``distribution_shift`` finding."""

COMPARED = ["token_entropy_norm", "load_entropy_norm", "max_load_share", "dead_experts"]
"""Metrics shown per run, each with its difference from the baseline."""

COLUMNS = [
    "layer",
    "step",
    "baseline_step",
    "run",
    "baseline",
    "n_experts",
    *[name for metric in COMPARED for name in (metric, f"delta_{metric}")],
    "jsd",
    "agreement_top1",
    "overlap_topk",
]
"""Columns of :attr:`Comparison.table`, in output order."""

NO_DATASET = "(no dataset)"
"""Group name of rows that name no dataset, in ``by="dataset"`` comparisons."""


@dataclass(frozen=True)
class LeftOut:
    """Something that was not compared, and why; ``layer`` None means every layer."""

    run: str
    layer: int | None
    what: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Group:
    """One compared run (or dataset): its logged steps and the step compared."""

    name: str
    steps: list[int]
    step: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "first_step": self.steps[0],
            "last_step": self.steps[-1],
            "logged_steps": len(self.steps),
            "compared_step": self.step,
        }


@dataclass
class Comparison:
    """What ``compare`` returns.

    ``table`` has one row per layer and compared group (baseline first, its deltas null);
    ``metrics`` has every step of every group (``run`` names the group) for plots.
    """

    by: By
    baseline: str
    align: Align
    runs: list[api.Run]
    groups: list[Group]
    table: pl.DataFrame
    metrics: pl.DataFrame
    left_out: list[LeftOut] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def compare_runs(
    runs: list[api.Run],
    options: Options,
    *,
    step: int | None = None,
    align: Align = "exact",
) -> Comparison:
    """Compare runs with the first one, layer by layer at one aligned step."""
    if len(runs) < 2:
        raise UsageError("compare needs at least two runs (or one run with --by dataset)")
    metrics = api.metrics_of(runs, options)
    names = [r.name for r in runs]
    selections = {r.name: r.selections for r in runs}
    groups = align_steps(metrics, names, step, align, what="run")
    table, left_out = _compare(metrics, groups, selections)
    return Comparison("run", names[0], align, runs, groups, table, metrics, left_out)


def compare_datasets(
    run: api.Run,
    options: Options,
    *,
    base: str | None = None,
    step: int | None = None,
    align: Align = "exact",
    threshold: float = SHIFT_THRESHOLD,
) -> Comparison:
    """Compare the dataset groups of one run with the first (or ``base``) group.

    A layer whose load distribution diverges from the baseline's by more than ``threshold``
    (JSD, bits) gets a ``distribution_shift`` finding.
    """
    metrics = (
        api.metrics_by_dataset([run], options)
        .with_columns(pl.col("dataset").fill_null(NO_DATASET))
        .drop("run")
        .rename({"dataset": "run"})
    )
    names = run.stats["dataset"].fill_null(NO_DATASET).unique(maintain_order=True).to_list()
    if len(names) < 2:
        found = "no dataset column" if names == [NO_DATASET] else f"only dataset {names[0]!r}"
        raise UsageError(f"{run.path}: --by dataset needs two or more datasets, found {found}")
    if base is not None:
        if base not in names:
            raise UsageError(
                f"--base {base!r} is not a dataset of {run.path} (datasets: {', '.join(names)})"
            )
        names = [base, *[n for n in names if n != base]]
    groups = align_steps(metrics, names, step, align, what="dataset")
    table, left_out = _compare(metrics, groups, {})
    left_out.append(
        LeftOut(run.name, None, "agreement_top1, overlap_topk", "datasets route different tokens")
    )
    comparison = Comparison("dataset", names[0], align, [run], groups, table, metrics, left_out)
    comparison.findings = shift_findings(comparison, run.name, threshold)
    return comparison


def align_steps(
    metrics: pl.DataFrame, names: list[str], step: int | None, align: Align, *, what: str
) -> list[Group]:
    """The step compared in each group (``routelog check --baseline`` aligns with it too);
    errors name every group's step range."""
    logged = {
        name: sorted(metrics.filter(pl.col("run") == name)["step"].unique().to_list())
        for name in names
    }
    ranges = ", ".join(f"{name}: {_span(steps)}" for name, steps in logged.items())
    if align == "nearest":
        target = step if step is not None else logged[names[0]][-1]
        groups = []
        for name, steps in logged.items():
            earlier = [s for s in steps if s <= target]
            if not earlier:
                raise UsageError(f"{what} {name!r} logged no step at or before {target} ({ranges})")
            groups.append(Group(name, steps, earlier[-1]))
        return groups
    common = set.intersection(*(set(steps) for steps in logged.values()))
    if step is not None:
        if step not in common:
            raise UsageError(
                f"step {step} is not logged in every {what} ({ranges}); "
                "pick a shared step, or pair nearest earlier steps with --align nearest"
            )
        return [Group(name, steps, step) for name, steps in logged.items()]
    if not common:
        raise UsageError(
            f"no step is logged in every {what} ({ranges}); "
            "pair nearest earlier steps with --align nearest, or pick one with --step N"
        )
    latest = max(common)
    return [Group(name, steps, latest) for name, steps in logged.items()]


def _span(steps: list[int]) -> str:
    if len(steps) == 1:
        return f"step {steps[0]}"
    return f"steps {steps[0]}–{steps[-1]} ({len(steps)} logged)"


def _compare(
    metrics: pl.DataFrame,
    groups: list[Group],
    selections: dict[str, pl.DataFrame | None],
) -> tuple[pl.DataFrame, list[LeftOut]]:
    """The comparison table at the aligned steps, and what was left out."""
    base = groups[0]
    at_step = pl.concat(
        [metrics.filter((pl.col("run") == g.name) & (pl.col("step") == g.step)) for g in groups]
    ).select("run", "step", "layer", "n_experts", *COMPARED, "load_share")
    baseline = at_step.filter(pl.col("run") == base.name)
    left_out = _mismatches(at_step, baseline, groups)
    others = at_step.filter(pl.col("run") != base.name).join(
        baseline.select(
            "layer",
            pl.col("step").alias("baseline_step"),
            pl.col("n_experts").alias("_base_experts"),
            *[pl.col(m).alias(f"_base_{m}") for m in COMPARED],
            pl.col("load_share").alias("_base_share"),
        ),
        on="layer",
        how="inner",
    )
    others = others.filter(pl.col("n_experts") == pl.col("_base_experts"))
    if others.height == 0:
        raise InputError(
            "nothing to compare: no layer is logged with the same expert count in the "
            f"baseline {base.name!r} and any other "
            f"({'; '.join(f'{o.run} layer {o.layer}: {o.reason}' for o in left_out[:3])})"
        )
    others = others.with_columns(
        *[(pl.col(m) - pl.col(f"_base_{m}")).alias(f"delta_{m}") for m in COMPARED],
        pl.Series("jsd", _jsd(others["load_share"], others["_base_share"]), dtype=pl.Float64),
    )
    agreement, token_notes = _token_agreement(others, base, selections)
    left_out.extend(token_notes)
    others = others.join(agreement, on=["run", "layer"], how="left")
    compared_layers = others["layer"].unique()
    base_rows = baseline.filter(pl.col("layer").is_in(compared_layers.implode())).with_columns(
        pl.col("step").alias("baseline_step")
    )
    order = {g.name: i for i, g in enumerate(groups)}
    table = (
        pl.concat([base_rows, others], how="diagonal_relaxed")
        .with_columns(pl.lit(base.name).alias("baseline"))
        .sort(pl.col("layer"), pl.col("run").replace_strict(order, return_dtype=pl.Int32))
    )
    for name in COLUMNS:
        if name not in table.columns:
            table = table.with_columns(pl.lit(None, pl.Float64).alias(name))
    return table.select(COLUMNS), left_out


def _mismatches(
    at_step: pl.DataFrame, baseline: pl.DataFrame, groups: list[Group]
) -> list[LeftOut]:
    """Layers one side lacks at the compared step, and layers whose expert count differs."""
    base = groups[0].name
    base_experts = dict(baseline.select("layer", "n_experts").iter_rows())
    left_out = []
    for group in groups[1:]:
        rows = at_step.filter(pl.col("run") == group.name)
        experts = dict(rows.select("layer", "n_experts").iter_rows())
        for layer in sorted(set(base_experts) | set(experts)):
            if layer not in experts:
                reason = f"not logged at step {group.step} (baseline {base!r} has it)"
            elif layer not in base_experts:
                reason = f"baseline {base!r} has no layer {layer} at step {groups[0].step}"
            elif experts[layer] != base_experts[layer]:
                reason = (
                    f"E={experts[layer]} experts, baseline {base!r} has E={base_experts[layer]}"
                )
            else:
                continue
            left_out.append(LeftOut(group.name, layer, "layer", reason))
    return left_out


def _jsd(shares: pl.Series, base_shares: pl.Series) -> np.ndarray:
    """JSD per row between two list columns of equal-length load distributions."""
    out = np.full(len(shares), np.nan)
    lengths = shares.list.len().to_numpy()
    base_lengths = base_shares.list.len().to_numpy()
    for width in np.unique(lengths):
        rows = np.flatnonzero((lengths == width) & (base_lengths == width))
        if width == 0 or rows.size == 0:
            continue
        p = np.array(shares.gather(rows).to_list(), dtype=np.float64)
        q = np.array(base_shares.gather(rows).to_list(), dtype=np.float64)
        out[rows] = kernels.js_divergence(p, q)
    return out


def _token_agreement(
    others: pl.DataFrame, base: Group, selections: dict[str, pl.DataFrame | None]
) -> tuple[pl.DataFrame, list[LeftOut]]:
    """``agreement_top1`` and ``overlap_topk`` per (run, layer) where the tokens are the same."""
    schema = {
        "run": pl.String(),
        "layer": pl.Int32(),
        "agreement_top1": pl.Float64(),
        "overlap_topk": pl.Float64(),
    }
    base_selections = selections.get(base.name)
    if not selections:
        return pl.DataFrame(schema=schema), []
    rows: list[dict[str, Any]] = []
    notes = []
    what = "agreement_top1, overlap_topk"
    base_layers = _by_layer(base_selections, base.step) if base_selections is not None else {}
    for (name,), pairs in others.group_by("run", maintain_order=True):
        own = selections.get(str(name))
        if own is None or base_selections is None:
            missing = base.name if base_selections is None else name
            notes.append(LeftOut(str(name), None, what, f"{missing!r} logged no token positions"))
            continue
        own_layers = _by_layer(own, int(pairs["step"][0]))
        other_tokens = []
        for layer in pairs["layer"].to_list():
            aligned = tokens.same_tokens(
                own_layers.get(layer, _EMPTY), base_layers.get(layer, _EMPTY)
            )
            if aligned is None:
                other_tokens.append(layer)
                continue
            rows.append(
                {
                    "run": name,
                    "layer": layer,
                    "agreement_top1": float(tokens.agreement_top1(*aligned)),
                    "overlap_topk": float(tokens.overlap_topk(*aligned)),
                }
            )
        reason = f"routed other tokens than {base.name!r}"
        if len(other_tokens) == pairs.height:
            notes.append(LeftOut(str(name), None, what, reason))
        else:
            notes.extend(LeftOut(str(name), layer, what, reason) for layer in other_tokens)
    return pl.DataFrame(rows, schema=schema), notes


_EMPTY = pl.DataFrame()


def _by_layer(selections: pl.DataFrame, step: int) -> dict[int, pl.DataFrame]:
    at_step = selections.filter(pl.col("step") == step)
    return {int(key[0]): part for key, part in at_step.partition_by("layer", as_dict=True).items()}


def shift_findings(
    comparison: Comparison, run: str, threshold: float = SHIFT_THRESHOLD
) -> list[Finding]:
    """``distribution_shift`` (warn) for each dataset and layer whose JSD exceeds ``threshold``."""
    shifted = comparison.table.filter(pl.col("jsd") > threshold)
    return [
        Finding(
            code="distribution_shift",
            severity="warn",
            run=run,
            layer=row["layer"],
            first_step=row["step"],
            last_step=row["step"],
            active=row["step"] == _last_step(comparison, row["run"]),
            metric="jsd",
            value=row["jsd"],
            threshold=threshold,
            message=(
                f"layer {row['layer']}: expert load on dataset {row['run']!r} diverges from "
                f"{row['baseline']!r} (JSD {row['jsd']:.3f} > {threshold:g}) at step {row['step']}"
            ),
        )
        for row in shifted.iter_rows(named=True)
    ]


def _last_step(comparison: Comparison, name: str) -> int:
    return next(g.steps[-1] for g in comparison.groups if g.name == name)
