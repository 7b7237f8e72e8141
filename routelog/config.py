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

import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from routelog.errors import ConfigError

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
_RANGES: dict[str, tuple[float | None, float | None]] = {
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
    "sharp_drop_window": (2, None),
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
class Config:
    """The effective configuration; ``sources`` maps each key to where its value came from.

    ``top_k`` is the k used when the data does not state its own (``--top-k`` overrides
    both). ``check`` keeps the raw ``[check]`` sub-table for ``routelog check``.
    """

    top_k: int = 1
    dead_fraction: float = 0.1
    rules: tuple[str, ...] = RULES
    thresholds: Thresholds = field(default_factory=Thresholds)
    check: dict[str, Any] = field(default_factory=dict, compare=False)
    path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def source(self, key: str) -> str:
        """Where ``key`` (``top_k`` or ``thresholds.collapse_entropy``) came from."""
        return self.sources.get(key, DEFAULT)

    def enabled(self, rule: str) -> bool:
        return rule in self.rules

    def with_option(self, key: str, value: Any, option: str) -> Config:
        """This configuration with a top-level value set by a command-line option."""
        checked = _check_top_level({key: value}, f"option {option}")
        return replace(self, **checked, sources={**self.sources, key: f"option {option}"})

    def items(self) -> list[tuple[str, Any, str]]:
        """Every key with its effective value and source, for ``routelog config``."""
        rows: list[tuple[str, Any, str]] = [
            ("top_k", self.top_k, self.source("top_k")),
            ("dead_fraction", self.dead_fraction, self.source("dead_fraction")),
            ("rules", list(self.rules), self.source("rules")),
        ]
        for spec in fields(Thresholds):
            key = f"thresholds.{spec.name}"
            rows.append((key, getattr(self.thresholds, spec.name), self.source(key)))
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


def _table_of(path: Path) -> dict[str, Any] | None:
    """The routelog table of a file: ``[tool.routelog]`` of a pyproject, else the top level."""
    document = _load_toml(path)
    if path.name != PYPROJECT:
        return document
    tool = document.get("tool", {})
    table = tool.get("routelog") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.routelog] must be a table")
    return table


def find_config(start: Path | None = None) -> Path | None:
    """The configuration file for ``start`` (default: the current directory) or above it."""
    here = (start if start is not None else Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_FILE
        if candidate.is_file():
            return candidate
        pyproject = directory / PYPROJECT
        if pyproject.is_file() and _table_of(pyproject) is not None:
            return pyproject
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
    sources = dict.fromkeys(values, where)
    sources.update({f"thresholds.{key}": where for key in thresholds_table})
    return Config(
        **values,
        thresholds=replace(Thresholds(), **thresholds),
        check=dict(check),
        path=path,
        sources=sources,
    )


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
        else:
            raise ConfigError(f"{where}: unknown key {prefix}{key!r} (known: {_known_top()})")
    return out


def _known_top() -> str:
    return "top_k, dead_fraction, rules, thresholds, check"


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
        lo, hi = _RANGES[key]
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
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{name} must be in {bounds}, got {value!r}")
    return int(value) if kind is int else float(value)
