"""The ranges every metric lives in (README, Metrics), checked on any JSON report."""

from __future__ import annotations

import math
from typing import Any

EPS = 1e-6


def assert_metrics_in_range(document: dict[str, Any]) -> None:
    """Every metric of ``routelog analyze --format json`` is null or within its range, and
    the probability metrics are not null when every run held probabilities or logits (a
    0/0 that became null is a silently wrong answer, not a missing one)."""
    payloads = {p for run in document["runs"] for p in run["payloads"]}
    probabilities = bool(payloads) and payloads <= {"probabilities", "logits"}
    for row in document["metrics"]:
        if probabilities and row["n_tokens"]:
            for name in ("token_entropy", "load_entropy", "top1_prob"):
                assert row[name] is not None, (name, row)
        e, k = row["n_experts"], row["top_k"]
        assert isinstance(e, int), row
        assert e >= 1, row
        log_e = math.log(e)
        bounds: dict[str, tuple[float, float]] = {
            "token_entropy": (0, log_e),
            "load_entropy": (0, log_e),
            "assign_entropy": (0, log_e),
            "mutual_info": (-EPS, log_e),
            "token_entropy_norm": (0, 1),
            "load_entropy_norm": (0, 1),
            "assign_entropy_norm": (0, 1),
            "max_load_share": (0, 1),
            "max_vio": (0, max(e - 1, 0)),
            "load_cv": (0, math.sqrt(max(e - 1, 0))),
            "dead_experts": (0, e),
            "top1_prob": (0, 1),
            "z_loss": (0, math.inf),
            "flip_rate": (0, 1),
            "saturation": (0, 1),
        }
        for name, (low, high) in bounds.items():
            value = row.get(name)
            if value is None:
                continue
            assert isinstance(value, (int, float)), (name, row)
            assert math.isfinite(value), (name, row)
            assert low - EPS <= value <= high + EPS * max(1.0, high), (name, value, row)
        if k is not None:
            assert k >= 1, row
        shares = row.get("load_share") or []
        if any(s is None for s in shares):  # no assignments at all (counts of zero)
            assert all(s is None for s in shares), row
            continue
        assert all(-EPS <= s <= 1 + EPS for s in shares), row
        if shares:
            assert abs(sum(shares) - 1) < 1e-6, row
