"""``routelog config``: the effective configuration and where each value came from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from routelog.config import Config


def config_document(config: Config) -> dict[str, Any]:
    """``{"file": path or null, "settings": [{"key", "value", "source"}]}``."""
    return {
        "file": None if config.path is None else str(config.path),
        "settings": [
            {"key": key, "value": value, "source": source} for key, value, source in config.items()
        ],
    }


def print_config(config: Config, console: Console) -> None:
    from rich.table import Table

    console.print(
        f"configuration file: {config.path}" if config.path else "configuration file: none found"
    )
    items = list(config.items())
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    # keys are never cut; values wrap between words; a source path folds rather than hide
    table.add_column("key", no_wrap=True, min_width=max((len(k) for k, _, _ in items), default=3))
    table.add_column("value", ratio=1)
    table.add_column("source", overflow="fold")
    for key, value, source in items:
        shown = (
            ", ".join(value)
            if isinstance(value, list)
            else f"{value:g}"
            if isinstance(value, float)
            else "–"
            if value is None
            else str(value)
        )
        table.add_row(key, shown, source)
    console.print(table)
