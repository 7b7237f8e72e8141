"""Optional worlds: import a module of an extra, or say in one line what to install.

Every command that needs an extra (matplotlib for ``plot``, TensorBoard and W&B for
``export``) imports it through :func:`require`, so a missing extra is one message naming the
``pip install`` to run, never an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from routelog.errors import MissingExtraError


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import ``module``; if it (or one of its dependencies) is missing, raise a
    MissingExtraError saying that ``what`` (default: routelog) needs
    ``pip install 'routelog[extra]'``.

    Examples
    --------
    >>> require("json", "none", "reading JSON").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise MissingExtraError(
            f"{what or 'this'} needs the {extra} extra ({missing} is not installed): "
            f"pip install 'routelog[{extra}]'"
        ) from None
