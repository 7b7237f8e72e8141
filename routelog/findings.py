"""The finding: one named routing problem, in one layer of one run, over a span of steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["warn", "fail"]
SEVERITY_ORDER = {"fail": 0, "warn": 1}


@dataclass(frozen=True)
class Finding:
    """A rule that held for a run's layer from ``first_step`` to ``last_step``.

    ``active`` is true when the condition still holds at the run's latest step; ``value``
    is the metric at ``last_step``; ``message`` is one plain sentence for a person.
    Rules of other stages (``compare``) add their own codes through the same type.
    """

    code: str
    severity: Severity
    run: str
    layer: int | None
    first_step: int | None
    last_step: int | None
    active: bool
    metric: str
    value: float | None
    threshold: float | None
    message: str
    predicted_step: int | None = None
    """``forecast`` only: the step at which the trend crosses its threshold."""
    dead_experts: list[dict[str, int]] | None = None
    """``underutilization`` and ``collapse``: the dead experts at ``last_step``, each as
    ``{"expert": i, "since_step": s}`` (s: the start of its unbroken dead streak)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"status": self.status}

    @property
    def status(self) -> str:
        """``fail`` or ``warn`` while the finding holds at the run's latest step, else
        ``earlier``: the one rule the headline counts, the layer status shows and the JSON
        says (a finding that ended before the latest step does not make its layer fail)."""
        return self.severity if self.active else "earlier"

    @property
    def margin(self) -> float:
        """How far beyond its threshold the value is, relative to the threshold (negative:
        the finding holds); the most negative finding of a group is its worst layer."""
        from routelog.kernels import TOWARDS_COLLAPSE

        if self.value is None or self.threshold is None:
            return 0.0
        sign = TOWARDS_COLLAPSE.get(self.metric, -1)
        scale = abs(self.threshold) if self.threshold else 1.0
        return (self.threshold - self.value) * sign / scale

    def sort_key(self) -> tuple[int, str, int, str, int]:
        """Fail first, then by run and layer (the order of the report and the JSON)."""
        return (
            SEVERITY_ORDER[self.severity],
            self.run,
            -1 if self.layer is None else self.layer,
            self.code,
            -1 if self.first_step is None else self.first_step,
        )


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=Finding.sort_key)


def worst(findings: list[Finding]) -> Finding:
    """The finding furthest beyond its threshold: active ones before those that ended."""
    return min(findings, key=lambda f: (not f.active, f.margin))
