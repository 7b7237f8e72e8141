"""Optional worlds: import an extra's module or say, in one line, what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from routelog.errors import MissingExtraError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (e.g. ``torch``), or raise naming ``pip install 'routelog[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is not installed: pip install 'routelog[{extra}]'"
        ) from exc
