"""Configuration: diagnosis thresholds, ``top_k``, the dead-expert fraction, enabled rules.

Read from ``[tool.routelog]`` of a ``pyproject.toml`` or from the top level of a
``routelog.toml``, found from the current directory upwards (in each directory a
``routelog.toml`` wins over a ``pyproject.toml``, and a ``pyproject.toml`` counts only when it
has a ``[tool.routelog]`` table), or from the file given with ``--config``. Every value
remembers where it came from (``default``, the file, or a command-line option), for
``routelog config``.

Example ``routelog.toml``::

    top_k = 2
    dead_fraction = 0.1
    rules = ["collapse", "rigidity", "underutilization"]

    [thresholds]
    collapse_entropy = 0.4
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from routelog.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from routelog.options import LayerSet

RULES = (
    "collapse",
    "rigidity",
    "underutilization",
    "wasted_capacity",
    "sharp_drop",
    "premature_specialization",
    "persistent_skew",
    "instability",
    "forecast",
    "early_saturation",
)
"""Every diagnosis rule, in the order the README documents them."""

MAX_COUNT = (1 << 31) - 1
"""Upper bound of the integer settings that have no natural one (step counts, windows)."""
DEFAULT = "default"
CONFIG_FILE = "routelog.toml"
PYPROJECT = "pyproject.toml"


@dataclass(frozen=True)
class Thresholds:
    """The numbers behind the diagnosis rules (see the README for each rule's rationale)."""

    collapse_entropy: float = 0.5
    collapse_dead_share: float = 0.5
    collapse_min_steps: int = 2
    rigidity_warn: float = 0.15
    rigidity_fail: float = 0.05
    underutilization_min_steps: int = 2
    wasted_entropy: float = 0.97
    wasted_mutual_info: float = 0.02
    wasted_after: float = 0.25
    sharp_drop: float = 0.2
    sharp_drop_sigmas: float = 4.0
    sharp_drop_window: int = 5
    sharp_drop_min: float = 0.1
    premature_entropy: float = 0.3
    premature_within: float = 0.2
    skew_max_vio: float = 1.0
    skew_min_steps: int = 3
    instability_changes: int = 3
    instability_amplitude: float = 0.05
    instability_window: int = 10
    forecast_window: int = 5
    forecast_horizon: float = 0.5
    forecast_min_r2: float = 0.5
    saturation: float = 0.9
    saturation_within: float = 0.3
    shift_jsd: float = 0.1


# key -> (lowest, highest) allowed, both inclusive; None leaves a side open.
THRESHOLD_RANGES: dict[str, tuple[float | None, float | None]] = {
    "collapse_entropy": (0.0, 1.0),
    "collapse_dead_share": (0.0, 1.0),
    "collapse_min_steps": (1, None),
    "rigidity_warn": (0.0, 1.0),
    "rigidity_fail": (0.0, 1.0),
    "underutilization_min_steps": (1, None),
    "wasted_entropy": (0.0, 1.0),
    "wasted_mutual_info": (0.0, 1.0),
    "wasted_after": (0.0, 1.0),
    "sharp_drop": (0.0, 1.0),
    "sharp_drop_sigmas": (0.0, None),
    "sharp_drop_window": (3, None),  # the rolling spread needs 3 earlier steps (diagnose)
    "sharp_drop_min": (0.0, 1.0),
    "premature_entropy": (0.0, 1.0),
    "premature_within": (0.0, 1.0),
    "skew_max_vio": (0.0, None),
    "skew_min_steps": (1, None),
    "instability_changes": (1, None),
    "instability_amplitude": (0.0, 1.0),
    "instability_window": (3, None),
    "forecast_window": (5, None),
    "forecast_horizon": (0.0, None),
    "forecast_min_r2": (0.0, 1.0),
    "saturation": (0.0, 1.0),
    "saturation_within": (0.0, 1.0),
    "shift_jsd": (0.0, 1.0),
}


@dataclass(frozen=True)
class Bound:
    """A threshold of ``routelog check``: ``metric`` at or above (``min``) or at or below
    (``max``) ``value``, in the given layers (None: every layer)."""

    kind: Literal["min", "max"]
    metric: str
    value: float
    layers: LayerSet | None = None
    key: str = ""
    """Where it was set, for messages: ``min_token_entropy_norm``, ``layers."0-3".min_...``."""

    @property
    def rule(self) -> str:
        return f"{self.kind}_{self.metric}"

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@dataclass(frozen=True)
class CheckSettings:
    """The ``[check]`` table: findings that fail, thresholds, regression tolerances.

    ``fail_on`` None means: every ``fail`` finding fails the check. ``bounds`` holds the
    global thresholds (``layers`` None) and the per-layer-range ones; a layer takes the value
    of its range over the global one. ``max_regression`` maps a metric to how far it may move
    towards collapse from the baseline run.
    """

    fail_on: tuple[str, ...] | None = None
    bounds: tuple[Bound, ...] = ()
    max_regression: dict[str, float] = field(default_factory=dict)

    def with_flags(
        self,
        *,
        minimum: list[str] | None = None,
        maximum: list[str] | None = None,
        max_regression: list[str] | None = None,
    ) -> CheckSettings:
        """These settings with ``--min``/``--max``/``--max-regression METRIC=VALUE`` flags.

        A flag replaces the global value of its key; per-layer-range values still apply to
        their layers.
        """
        bounds = list(self.bounds)
        for kind, flags in (("min", minimum or []), ("max", maximum or [])):
            for text in flags:
                metric, value = _flag(f"--{kind}", text)
                bound = _bound(kind, metric, value, None, f"--{kind} {text}", UsageError)  # type: ignore[arg-type]
                bounds = [b for b in bounds if not (b.layers is None and b.rule == bound.rule)]
                bounds.append(bound)
        regression = dict(self.max_regression)
        for text in max_regression or []:
            metric, value = _flag("--max-regression", text)
            regression[metric] = _tolerance(f"--max-regression {text}", metric, value, UsageError)
        return replace(self, bounds=tuple(bounds), max_regression=regression)

    def items(self) -> list[tuple[str, Any]]:
        """``check.<key>`` and value pairs, for ``routelog config``."""
        rows: list[tuple[str, Any]] = []
        if self.fail_on is not None:
            rows.append(("check.fail_on", list(self.fail_on)))
        rows += [(f"check.{b.key}", b.value) for b in self.bounds]
        rows += [(f"check.max_regression.{m}", t) for m, t in self.max_regression.items()]
        return rows


@dataclass(frozen=True)
class Config:
    """The effective configuration; ``sources`` maps each key to where its value came from.

    ``top_k`` is the k used when the data does not state its own (``--top-k`` overrides
    both). ``check`` holds the validated ``[check]`` sub-table for ``routelog check``.
    """

    top_k: int = 1
    dead_fraction: float = 0.1
    rules: tuple[str, ...] = RULES
    scheduler: str | None = None
    """Dask scheduler for the per-file reduction (``tcp://HOST:PORT`` or ``local:N``)."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    check: CheckSettings = field(default_factory=CheckSettings, compare=False)
    path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def source(self, key: str) -> str:
        """Where ``key`` (``top_k`` or ``thresholds.collapse_entropy``) came from."""
        return self.sources.get(key, DEFAULT)

    def enabled(self, rule: str) -> bool:
        return rule in self.rules

    def items(self) -> list[tuple[str, Any, str]]:
        """Every key with its effective value and source, for ``routelog config``."""
        rows: list[tuple[str, Any, str]] = [
            ("top_k", self.top_k, self.source("top_k")),
            ("dead_fraction", self.dead_fraction, self.source("dead_fraction")),
            ("rules", list(self.rules), self.source("rules")),
            ("scheduler", self.scheduler, self.source("scheduler")),
        ]
        for spec in fields(Thresholds):
            key = f"thresholds.{spec.name}"
            rows.append((key, getattr(self.thresholds, spec.name), self.source(key)))
        rows += [(key, value, self.source("check")) for key, value in self.check.items()]
        return rows


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    try:
        with path.open("rb") as stream:
            document: dict[str, Any] = tomllib.load(stream)
            return document
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "TOML files are UTF-8"
        ) from None


def _table_of(path: Path) -> dict[str, Any] | None:
    """The routelog table of a file: ``[tool.routelog]`` of a pyproject, else the top level.

    Another file holding nothing but a ``[tool.routelog]`` table (what ``routelog check
    --suggest`` prints, saved to a file) is read like a pyproject.
    """
    document = _load_toml(path)
    if path.name != PYPROJECT and set(document) != {"tool"}:
        return document
    tool = document.get("tool", {})
    table = tool.get("routelog") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.routelog] must be a table")
    return table


def find_config(start: Path | None = None) -> Path | None:
    """The configuration file for ``start`` (default: the current directory) or above it.

    The search stops at the root of the git repository ``start`` is in (a directory holding
    ``.git``), so a stray file above a project never configures it.
    """
    here = (start if start is not None else Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_FILE
        if candidate.is_file():
            return candidate
        pyproject = directory / PYPROJECT
        if pyproject.is_file() and _table_of(pyproject) is not None:
            return pyproject
        if (directory / ".git").exists():
            return None
    return None


def run_config(run: Path) -> Config | None:
    """The configuration kept in a run's own directory (``routelog.toml``, else a
    ``pyproject.toml`` with ``[tool.routelog]``), validated; None when it has none.

    Only its ``top_k`` applies to the run (between the data's own k and a model's
    ``config.json``); the directory of a file run is the file's directory.
    """
    directory = run if run.is_dir() else run.parent
    for name in (CONFIG_FILE, PYPROJECT):
        candidate = directory / name
        if candidate.is_file():
            table = _table_of(candidate)
            if table is not None:
                return from_table(table, candidate)
    return None


def load_config(path: Path | None = None, *, start: Path | None = None) -> Config:
    """The configuration from ``path`` (``--config``), else the one found upwards of ``start``.

    Unknown keys and out-of-range values raise ``ConfigError`` naming the key and the file.
    """
    if path is not None and not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    found = path if path is not None else find_config(start)
    if found is None:
        return Config()
    table = _table_of(found) or {}
    return from_table(table, found)


def from_table(table: dict[str, Any], path: Path) -> Config:
    """Validate a routelog table read from ``path``."""
    where = str(path)
    prefix = "[tool.routelog] " if path.name == PYPROJECT else ""
    thresholds_table = table.get("thresholds", {})
    check = table.get("check", {})
    for name, value in (("thresholds", thresholds_table), ("check", check)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {prefix}{name} must be a table, not {value!r}")
    top = {k: v for k, v in table.items() if k not in ("thresholds", "check")}
    values = _check_top_level(top, where, prefix)
    thresholds = _check_thresholds(thresholds_table, where, prefix)
    settings = _check_check(check, f"{where}: {prefix}check.")
    rules = values.get("rules", RULES)
    disabled = [code for code in settings.fail_on or () if code not in rules]
    if disabled:
        raise ConfigError(
            f"{where}: {prefix}check.fail_on names {disabled[0]!r}, which rules disables"
        )
    sources = dict.fromkeys(values, where)
    sources.update({f"thresholds.{key}": where for key in thresholds_table})
    if check:
        sources["check"] = where
    return Config(
        **values,
        thresholds=replace(Thresholds(), **thresholds),
        check=settings,
        path=path,
        sources=sources,
    )


# --- the [check] table -----------------------------------------------------------------------


def _check_check(table: dict[str, Any], name: str) -> CheckSettings:
    """Validate ``[check]``; ``name`` is the file and key prefix for messages."""
    fail_on: tuple[str, ...] | None = None
    bounds: list[Bound] = []
    regression: dict[str, float] = {}
    for key, value in table.items():
        if key == "fail_on":
            fail_on = _rules(f"{name}fail_on", value)
        elif key == "layers":
            bounds += _layer_bounds(value, name)
        elif key == "max_regression":
            if not isinstance(value, dict):
                raise ConfigError(f"{name}max_regression must be a table, not {value!r}")
            for metric, tolerance in value.items():
                key_name = f"{name}max_regression.{metric}"
                regression[metric] = _tolerance(key_name, metric, tolerance, ConfigError)
        elif key.startswith(("min_", "max_")):
            bounds.append(_bound_key(key, value, None, name, key))
        else:
            raise ConfigError(
                f"{name.rstrip('.')}: unknown key {key!r} (known: fail_on, min_<metric>, "
                "max_<metric>, layers, max_regression)"
            )
    return CheckSettings(fail_on, tuple(bounds), regression)


def _layer_bounds(value: Any, name: str) -> list[Bound]:
    from routelog.options import parse_layers

    if not isinstance(value, dict):
        raise ConfigError(f"{name}layers must be a table of layer ranges, not {value!r}")
    bounds: list[Bound] = []
    for span, table in value.items():
        where = f'{name}layers."{span}"'
        try:
            layers = parse_layers(span)
        except UsageError:
            layers = None
        if layers is None:
            raise ConfigError(f"{where}: cannot read the layer range (expected e.g. 0-3 or 0,5)")
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table, not {table!r}")
        for key, threshold in table.items():
            if not key.startswith(("min_", "max_")):
                raise ConfigError(
                    f"{where}: unknown key {key!r} (known: min_<metric>, max_<metric>)"
                )
            bound = _bound_key(key, threshold, layers, f"{where}.", f'layers."{span}".{key}')
            for other in bounds:
                shared = other.layers.first_shared(layers) if other.layers is not None else None
                if other.rule == bound.rule and shared is not None:
                    raise ConfigError(
                        f"{where}.{key}: layer {shared} is also in {other.key}; "
                        "a layer takes one threshold per key"
                    )
            bounds.append(bound)
    return bounds


def _bound_key(key: str, value: Any, layers: LayerSet | None, name: str, label: str) -> Bound:
    kind, _, metric = key.partition("_")
    return _bound(kind, metric, value, layers, f"{name}{key}", ConfigError, label)  # type: ignore[arg-type]


def _bound(
    kind: Literal["min", "max"],
    metric: str,
    value: Any,
    layers: LayerSet | None,
    name: str,
    error: type[ConfigError | UsageError],
    label: str | None = None,
) -> Bound:
    """A threshold, refused when its metric is unknown or the metric can never reach it."""
    from routelog.kernels import METRIC_RANGES

    _known_metric(name, metric, error, regression=False)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(float(value) if isinstance(value, float) else 0.0)
    ):
        raise error(f"{name} must be a finite number, got {value!r}")
    lo, hi = METRIC_RANGES[metric]
    if value < lo or (hi is not None and value > hi):
        span = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise error(f"{name}: impossible threshold {value!r}: {metric} is always {span}")
    return Bound(kind, metric, float(value), layers, label if label is not None else name)


def _tolerance(name: str, metric: str, value: Any, error: type[ConfigError | UsageError]) -> float:
    _known_metric(name, metric, error)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value >= 0
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise error(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _known_metric(
    name: str, metric: str, error: type[ConfigError | UsageError], *, regression: bool = True
) -> None:
    """Refuse a metric a threshold (or, with ``regression``, a tolerance) cannot name."""
    from routelog.kernels import THRESHOLD_METRICS, TOWARDS_COLLAPSE

    known = tuple(TOWARDS_COLLAPSE) if regression else THRESHOLD_METRICS
    if metric in known:
        return
    if metric == "saturation":
        raise error(
            f"{name}: saturation is 1 at the final step by definition; the early_saturation "
            "rule judges it early in the run (thresholds.saturation, saturation_within)"
        )
    if metric in THRESHOLD_METRICS:
        raise error(
            f"{name}: {metric} has no direction towards collapse to regress in; "
            f"use min_{metric} or max_{metric}"
        )
    raise error(f"{name}: unknown metric {metric!r} (known: {', '.join(known)})")


def _flag(option: str, text: str) -> tuple[str, float]:
    """``METRIC=VALUE`` of a command-line flag."""
    metric, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return metric.strip(), float(value)
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected METRIC=NUMBER") from None


def _check_top_level(values: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}: {prefix}{key}"
        if key == "top_k":
            out[key] = _number(name, value, int, 1, None)
        elif key == "dead_fraction":
            fraction = _number(name, value, float, 0.0, None)
            if fraction >= 1:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
            out[key] = fraction
        elif key == "rules":
            out[key] = _rules(name, value)
        elif key == "scheduler":
            from routelog.executor import check_scheduler

            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, not {value!r}")
            try:
                out[key] = check_scheduler(value, name)
            except UsageError as exc:
                raise ConfigError(str(exc)) from None
        else:
            raise ConfigError(f"{where}: unknown key {prefix}{key!r} (known: {_known_top()})")
    return out


def _known_top() -> str:
    return "top_k, dead_fraction, rules, scheduler, thresholds, check"


def _rules(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of rule names, got {value!r}")
    unknown = [v for v in value if v not in RULES]
    if unknown:
        raise ConfigError(f"{name}: unknown rule {unknown[0]!r} (known: {', '.join(RULES)})")
    return tuple(r for r in RULES if r in value)


def _check_thresholds(values: dict[str, Any], where: str, prefix: str) -> dict[str, Any]:
    kinds = {spec.name: spec.type for spec in fields(Thresholds)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in kinds:
            raise ConfigError(
                f"{where}: unknown key {prefix}thresholds.{key!r} (known: {', '.join(kinds)})"
            )
        lo, hi = THRESHOLD_RANGES[key]
        kind = int if kinds[key] in (int, "int") else float
        out[key] = _number(f"{where}: {prefix}thresholds.{key}", value, kind, lo, hi)
    if out.get("rigidity_fail", Thresholds.rigidity_fail) > out.get(
        "rigidity_warn", Thresholds.rigidity_warn
    ):
        raise ConfigError(
            f"{where}: {prefix}thresholds.rigidity_fail must not exceed thresholds.rigidity_warn"
        )
    return out


def _number(name: str, value: Any, kind: type, lo: float | None, hi: float | None) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if kind is int and hi is None:
        hi = MAX_COUNT  # counts of steps and windows: anything larger is a typo, not a setting
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{name} must be in {bounds}, got {value!r}")
    return int(value) if kind is int else float(value)
