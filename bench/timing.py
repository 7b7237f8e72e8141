"""Timing shared by the benchmark's scripts (``run.py`` and the child ``cluster.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_times(named: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each callable; one warm-up each (imports, a worker's first task),
    then ``repeat`` rounds interleaving them, so a machine that gets busier slows all alike."""
    for work in named.values():
        work()
    times: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(repeat):
        for name, work in named.items():
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
