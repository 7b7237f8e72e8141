"""Options the core needs, as one frozen value built from CLI arguments and configuration."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from routelog.errors import UsageError

if TYPE_CHECKING:
    import polars as pl

Score = Literal["softmax", "sigmoid"]

DEFAULT_TOP_K = 1
DEFAULT_DEAD_FRACTION = 0.1
MAX_EXPERTS = 1 << 16
"""Largest expert count E routelog accepts (from data or ``--num-experts``): per-group
statistics hold E numbers, so a file claiming E = 2^40 is refused instead of allocated."""
MAX_LAYER = (1 << 31) - 1
"""Layer numbers are stored as int32."""
MAX_STEP = (1 << 63) - 1
"""Steps and token positions are stored as int64."""


@dataclass(frozen=True)
class LayerSet:
    """Selected layers as sorted, disjoint inclusive intervals: ``0-2000000000`` is one pair,
    never two billion numbers.

    Examples
    --------
    >>> selection = parse_layers("0,3-5,4-9")
    >>> selection.spans, 7 in selection, 2 in selection
    (((0, 0), (3, 9)), True, False)
    """

    spans: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, layers: Iterable[int] | Iterable[tuple[int, int]]) -> LayerSet:
        """From single layers or (lo, hi) pairs, merged into disjoint intervals."""
        pairs = sorted((v, v) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in layers)
        merged: list[tuple[int, int]] = []
        for lo, hi in pairs:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return cls(tuple(merged))

    def __contains__(self, layer: object) -> bool:
        if not isinstance(layer, int):
            return False
        return any(lo <= layer <= hi for lo, hi in self.spans)

    def first_shared(self, other: LayerSet) -> int | None:
        """The smallest layer in both selections, or None."""
        shared = [
            max(lo, other_lo)
            for lo, hi in self.spans
            for other_lo, other_hi in other.spans
            if max(lo, other_lo) <= min(hi, other_hi)
        ]
        return min(shared, default=None)

    def expression(self, column: str) -> pl.Expr:
        """A Polars predicate: ``column`` lies in one of the intervals."""
        import polars as pl

        predicate = pl.lit(False)
        for lo, hi in self.spans:
            predicate = predicate | pl.col(column).is_between(lo, hi)
        return predicate


TopKSource = Literal["option", "data", "run_config", "model_config", "config", "assumed"]
"""Where a run's k came from, highest precedence first: ``--top-k``; the data's own k (a
payload's ``top_k``, the width of ``topk_ids``); ``top_k`` of a ``routelog.toml`` (or
``[tool.routelog]``) in the run directory; a model's ``config.json`` found upwards of the run;
``top_k`` of the configuration found from the current directory; else k=1 is assumed."""

ASSUMED_K_TEXT = "k=1 (assumed: the logs do not say; pass --top-k)"
"""What every report says when k is a guess."""


@dataclass(frozen=True)
class StepRange:
    """An inclusive range of training steps; either end may be open."""

    start: int | None = None
    stop: int | None = None

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):
            return False
        return (self.start is None or step >= self.start) and (
            self.stop is None or step <= self.stop
        )


@dataclass(frozen=True)
class Options:
    """How to read and reduce routing logs.

    ``top_k=None`` means: the k stated by the data (a .pt payload's ``top_k``, the width of
    ``topk_ids``), else ``default_top_k``, which came from ``default_top_k_source`` (a file
    named by ``default_top_k_file``; ``assumed`` when nothing stated it).
    """

    top_k: int | None = None
    default_top_k: int = DEFAULT_TOP_K
    default_top_k_source: TopKSource = "assumed"
    default_top_k_file: str | None = None
    layers: LayerSet | None = None
    steps: StepRange | None = None
    skip_bad_rows: bool = False
    temperature: float | None = None
    score: Score = "softmax"
    dead_fraction: float = DEFAULT_DEAD_FRACTION
    num_experts: int | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {self.top_k}")
        check_temperature(self.temperature)
        if not 0 <= self.dead_fraction < 1:
            raise UsageError(f"dead_fraction must be in [0, 1), got {self.dead_fraction}")
        if self.num_experts is not None and self.num_experts < 1:
            raise UsageError(f"--num-experts must be at least 1, got {self.num_experts}")
        limited = (
            ("--num-experts", self.num_experts),
            ("--top-k", self.top_k),
            ("top_k", self.default_top_k),
        )
        for name, value in limited:
            if value is not None and value > MAX_EXPERTS:
                raise UsageError(
                    f"{name} {value} is beyond the {MAX_EXPERTS} experts routelog handles"
                )

    def k_source(self, used_default: bool) -> TopKSource:
        """Where the k of a run came from, given whether any of its files fell back to the
        default (a file stating its own k does not)."""
        if self.top_k is not None:
            return "option"
        return self.default_top_k_source if used_default else "data"

    def k_for(self, data_k: int | None) -> int:
        """The k to use: --top-k, else the data's own k, else the configured default."""
        if self.top_k is not None:
            return self.top_k
        return data_k if data_k is not None else self.default_top_k


_RANGE = re.compile(r"^\s*(\d{1,30})\s*(?:-\s*(\d{1,30})\s*)?$", re.ASCII)


MIN_TEMPERATURE = 1e-100
"""The smallest --temperature: 1/T stays finite, and scaled logits are held to the same
±1e150 as logits (``ingest.payload.MAX_LOGIT``)."""


def check_temperature(value: float | None) -> None:
    """Refuse a --temperature below :data:`MIN_TEMPERATURE`, or not finite (None: unset)."""
    if value is not None and not (value >= MIN_TEMPERATURE and math.isfinite(value)):
        raise UsageError(
            f"--temperature: must be a finite number of at least {MIN_TEMPERATURE:g} (got {value})"
        )


def parse_layers(text: str | None) -> LayerSet | None:
    """Parse ``0,3-5`` into the intervals (0, 0), (3, 5); None or "" selects every layer.

    Examples
    --------
    >>> parse_layers("0,3-5").spans
    ((0, 0), (3, 5))
    """
    if text is None or not text.strip():
        return None
    spans: list[tuple[int, int]] = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise UsageError(f"--layers: cannot read {part.strip()!r} (expected e.g. 0,3-5)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"--layers: range {part.strip()!r} is empty")
        if hi > MAX_LAYER:
            raise UsageError(f"--layers: layer {hi} is beyond the largest layer number {MAX_LAYER}")
        spans.append((lo, hi))
    return LayerSet.of(spans)


def parse_steps(text: str | None) -> StepRange | None:
    """Parse ``100:500`` (inclusive), ``100:``, ``:500`` or a single step ``200``.

    Examples
    --------
    >>> parse_steps("100:500")
    StepRange(start=100, stop=500)
    """
    if text is None or not text.strip():
        return None
    parts = text.split(":")
    try:
        if len(parts) == 1:
            step = _step(parts[0])
            return StepRange(step, step)
        if len(parts) == 2:
            start = _step(parts[0]) if parts[0].strip() else None
            stop = _step(parts[1]) if parts[1].strip() else None
            if start is not None and stop is not None and stop < start:
                raise UsageError(f"--steps: range {text!r} is empty")
            return StepRange(start, stop)
    except ValueError:
        pass
    raise UsageError(f"--steps: cannot read {text!r} (expected START:STOP, START:, :STOP or N)")


def _step(text: str) -> int:
    step = int(text)
    if not -MAX_STEP - 1 <= step <= MAX_STEP:
        raise UsageError(f"--steps: {step} does not fit a 64-bit step number")
    return step
