"""The compiled per-token kernels (``routelog/_native.c``), or one clear error when a source
tree is used without having been installed (installing compiles them)."""

from __future__ import annotations

try:
    from routelog._native import row_sums, softmax, token_stats
except ImportError as exc:
    raise ImportError(
        "routelog's compiled kernels (routelog/_native.c) are not built: install routelog "
        "with pip, which compiles them (from a checkout: pip install -e .)"
    ) from exc

__all__ = ["row_sums", "softmax", "token_stats"]
