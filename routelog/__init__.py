"""routelog: analyze the routing logs of Mixture-of-Experts models.

The package is importable without the CLI::

    import routelog
    result = routelog.analyze("runs/mixtral", top_k=2)   # one run, or a list of runs
    result.metrics            # polars DataFrame, one row per run x step x layer
    result.findings_frame()   # the diagnosis, one row per finding
    print(result.report(width=100))
    routelog.check("runs/mixtral", top_k=2, minimum={"token_entropy_norm": 0.2}).passed
    routelog.compare(["runs/base", "runs/new"], top_k=2).table
    routelog.sample_path()    # the small collapsing run shipped with routelog

Heavy modules (polars, pyarrow, numpy) are imported only when a function needs them.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from routelog.api import Analysis, Run, analyze, check, compare, make_options
    from routelog.config import Config, load_config
    from routelog.findings import Finding
    from routelog.record import Recorder
    from routelog.samples import sample_path

_LAZY = {
    "Analysis": "routelog.api",
    "Run": "routelog.api",
    "analyze": "routelog.api",
    "check": "routelog.api",
    "compare": "routelog.api",
    "make_options": "routelog.api",
    "Config": "routelog.config",
    "load_config": "routelog.config",
    "Finding": "routelog.findings",
    "Recorder": "routelog.record",
    "sample_path": "routelog.samples",
}

__all__ = [
    "Analysis",
    "Config",
    "Finding",
    "Recorder",
    "Run",
    "__version__",
    "analyze",
    "check",
    "compare",
    "load_config",
    "make_options",
    "sample_path",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'routelog' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__} - {"_LAZY", "_Package", "sys", "types"})


class _Package(types.ModuleType):
    """``routelog.compare`` and ``routelog.check`` are the API functions, although modules of
    the same names exist: importing ``routelog.compare`` must not replace the function with
    the module (import them as ``from routelog.compare import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
