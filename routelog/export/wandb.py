"""``routelog export --wandb PROJECT[/RUN_ID]``: log to Weights & Biases (the ``wandb`` extra).

Routing scalars go on their own x axis, ``routelog/step`` (``define_metric``), so they land at
their training step even in a run that has already logged later steps with ``wandb.log``
(W&B's own step only moves forward). Given a RUN_ID, the run is resumed, so the routing
metrics join the training run; the last exported step is kept in the run's summary
(``routing/last_exported_step``) and in ``routelog-export.json`` under ``WANDB_DIR`` (the
summary of a resumed run is not known offline), so a later export adds only new steps.
Findings go to the summary as Markdown (``routing/findings``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routelog.errors import UsageError
from routelog.export import PREFIX, Exported, findings_markdown, scalars, state
from routelog.extras import require

if TYPE_CHECKING:
    import polars as pl

    from routelog.findings import Finding

STEP_METRIC = "routelog/step"
LAST_KEY = f"{PREFIX}/last_exported_step"
FINDINGS_KEY = f"{PREFIX}/findings"
STATE = "routelog-export.json"
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_target(target: str) -> tuple[str, str | None]:
    """``PROJECT`` or ``PROJECT/RUN_ID`` (an entity comes from the W&B settings).

    Examples
    --------
    >>> parse_target("moe-lab/3xk9q2"), parse_target("moe-lab")
    (('moe-lab', '3xk9q2'), ('moe-lab', None))
    """
    project, _, run_id = target.partition("/")
    if not _NAME.match(project) or (run_id and not _NAME.match(run_id)):
        raise UsageError(
            f"--wandb {target!r}: expected PROJECT or PROJECT/RUN_ID (letters, digits, . _ -)"
        )
    return project, run_id or None


def state_file() -> Path:
    """Where the last exported step per W&B run is kept: under ``WANDB_DIR`` (else here)."""
    return Path(os.environ.get("WANDB_DIR") or ".") / STATE


def export(target: str, run_name: str, metrics: pl.DataFrame, findings: list[Finding]) -> Exported:
    """Log the steps of ``run_name`` not yet exported to the W&B run ``target``."""
    project, run_id = parse_target(target)
    wandb: Any = require("wandb", "wandb", "routelog export --wandb")
    path = state_file()
    done = state.read(path)
    if (
        run_id is not None
        and not scalars(metrics, after=done.get(f"{project}/{run_id}/{run_name}")).steps
    ):
        return Exported(0, 0, None, None, run_id)  # nothing new: the run is not touched
    try:
        run = wandb.init(
            project=project,
            id=run_id,
            resume="allow" if run_id else None,
            name=None if run_id else f"routelog {run_name}",
            job_type="routelog",
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as exc:  # wandb raises its own errors (no login, no network, ...)
        raise UsageError(f"--wandb {target}: W&B refused the run: {exc}") from None
    try:
        key = f"{project}/{run.id}/{run_name}"
        known = [done.get(key), run.summary.get(LAST_KEY)]
        after = max((int(v) for v in known if isinstance(v, int | float)), default=None)
        todo = scalars(metrics, after=after)
        run.define_metric(STEP_METRIC)
        run.define_metric(f"{PREFIX}/*", step_metric=STEP_METRIC)
        count = 0
        for step, values in zip(todo.steps, todo.values, strict=True):
            run.log({STEP_METRIC: step, **values})
            count += len(values)
        if todo.steps:
            run.summary[LAST_KEY] = todo.steps[-1]
            run.summary[FINDINGS_KEY] = findings_markdown(findings)
            done[key] = todo.steps[-1]
    finally:
        run.finish()
    if todo.steps:
        state.write(path, done)
    return Exported(
        len(todo.steps),
        count,
        todo.steps[0] if todo.steps else None,
        todo.steps[-1] if todo.steps else None,
        str(run.id),
    )
