"""routelog: analyze the routing logs of Mixture-of-Experts models.

The package is importable without the CLI::

    import routelog
    result = routelog.analyze(["sample_logs/healthy"], top_k=2)
    result.metrics      # polars DataFrame, one row per run x step x layer
    result.findings     # diagnosis findings

Heavy modules (polars, pyarrow, numpy) are imported only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from routelog.api import Analysis, analyze
    from routelog.record import Recorder

__all__ = ["Analysis", "Recorder", "__version__", "analyze"]


def __getattr__(name: str) -> Any:
    if name in ("analyze", "Analysis"):
        from routelog import api

        return getattr(api, name)
    if name == "Recorder":
        from routelog.record import Recorder

        return Recorder
    raise AttributeError(f"module 'routelog' has no attribute {name!r}")
