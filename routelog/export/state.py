"""The last exported step per run, kept in a small JSON file beside the export."""

from __future__ import annotations

import json
from pathlib import Path

from routelog.errors import InputError, UsageError

VERSION = 1


def read(path: Path) -> dict[str, int]:
    """``{run name: last exported step}``; empty when nothing was exported yet."""
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: cannot read the export state ({exc}); delete it to export every step again"
        ) from None
    runs = document.get("runs") if isinstance(document, dict) else None
    if not isinstance(runs, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in runs.items()
    ):
        raise InputError(
            f"{path}: key 'runs' must map run names to steps; delete the file to export "
            "every step again"
        )
    return dict(runs)


def write(path: Path, runs: dict[str, int]) -> None:
    """Replace the state file atomically (a crash leaves the old state, never half a file)."""
    partial = path.with_name(path.name + ".tmp")
    try:
        partial.write_text(
            json.dumps({"version": VERSION, "runs": runs}, indent=2) + "\n", encoding="utf-8"
        )
        partial.replace(path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the export state: {exc.strerror}") from None
