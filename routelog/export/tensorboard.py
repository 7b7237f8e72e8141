"""``routelog export --tensorboard DIR``: TensorBoard event files (the ``tensorboard`` extra).

Scalars are classic ``simple_value`` summaries (what every TensorBoard version, and its
``EventAccumulator``, reads as scalars); findings are a text summary (the text plugin) at the
latest exported step. Each export adds one new event file to DIR, so nothing already written
is touched; ``DIR/routelog-export.json`` remembers the last step exported per run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routelog.errors import UsageError
from routelog.export import PREFIX, Exported, findings_markdown, scalars, state
from routelog.extras import require

if TYPE_CHECKING:
    import polars as pl

    from routelog.findings import Finding

STATE = "routelog-export.json"
FINDINGS_TAG = f"{PREFIX}/findings"


def export(directory: Path, run: str, metrics: pl.DataFrame, findings: list[Finding]) -> Exported:
    """Write the steps of ``run`` not yet exported to ``directory`` (created if missing)."""
    require("tensorboard", "tensorboard", "routelog export --tensorboard")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{directory}: cannot create the TensorBoard directory: {exc.strerror}"
        ) from None
    state_path = directory / STATE
    done = state.read(state_path)
    todo = scalars(metrics, after=done.get(run))
    if not todo.steps:
        return Exported(0, 0, None, None, None)
    before = set(directory.iterdir())
    writer: Any = EventFileWriter(str(directory), filename_suffix=".routelog")
    try:
        wall = time.time()
        count = 0
        for step, values in zip(todo.steps, todo.values, strict=True):
            summary = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=name, simple_value=value)
                    for name, value in values.items()
                ]
            )
            writer.add_event(event_pb2.Event(wall_time=wall, step=step, summary=summary))
            count += len(values)
        text = text_pb(FINDINGS_TAG, findings_markdown(findings))
        writer.add_event(event_pb2.Event(wall_time=wall, step=todo.steps[-1], summary=text))
        writer.flush()
    finally:
        writer.close()
    new = sorted(set(directory.iterdir()) - before)
    written = str(new[0]) if new else None
    done[run] = todo.steps[-1]
    state.write(state_path, done)
    return Exported(len(todo.steps), count, todo.steps[0], todo.steps[-1], written)
