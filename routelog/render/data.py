"""Machine-readable output: JSON documents and CSV tables, written from frames."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows of a frame as JSON-safe dictionaries."""
    return [clean(row) for row in frame.to_dicts()]


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(clean(document), indent=2, allow_nan=False) + "\n"


def to_csv(frame: pl.DataFrame) -> str:
    """CSV of the scalar columns (list columns such as ``load_share`` are left out), text
    with control characters escaped (:func:`routelog.errors.printable`)."""
    import polars as pl

    from routelog.errors import printable

    scalar = [
        name for name, dtype in frame.schema.items() if not isinstance(dtype, pl.List | pl.Array)
    ]
    # Names are the text a CSV carries (runs, rules, messages): shown with their control
    # characters escaped, as everywhere routelog prints them. A column holds few distinct
    # names, so each is escaped once.
    escaped = []
    for name in (n for n in scalar if frame.schema[n] == pl.String):
        distinct = frame[name].drop_nulls().unique().to_list()
        changed = {text: printable(text) for text in distinct if printable(text) != text}
        if changed:
            escaped.append(pl.col(name).replace(changed))
    return frame.select(scalar).with_columns(escaped).write_csv(float_precision=6)
