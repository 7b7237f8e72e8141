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
        return asdict(self)

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
