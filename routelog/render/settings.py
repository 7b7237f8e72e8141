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
    from routelog.render.text import Column, grid

    console.print(
        f"configuration file: {config.path}" if config.path else "configuration file: none found"
    )
    rows: list[list[Any]] = []
    for key, value, source in config.items():
        shown = (
            ", ".join(value)
            if isinstance(value, list)
            else f"{value:g}"
            if isinstance(value, float)
            else "–"
            if value is None
            else str(value)
        )
        rows.append([key, shown, source])
    # keys and sources are never cut; values wrap between words
    columns = [Column("key", key=True), Column("value", wrap=True), Column("source")]
    lines, _ = grid(columns, rows, width=console.width)
    for line in lines:
        console.print(line, soft_wrap=True)
