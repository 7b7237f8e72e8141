"""``routelog watch`` on screen: a report redrawn in place, or one line per new event.

On a terminal the whole ``analyze`` report is redrawn after each round (rich Live), under a
header with the newest step. Anywhere else (a log file, a job's output) each new finding is
printed once, as one line, and each round that brings new steps prints a short status line:
what a person tailing a log, or a script grepping it, wants.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from routelog.errors import printable
from routelog.render import report

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console, RenderableType

    from routelog.api import Analysis
    from routelog.findings import Finding
    from routelog.watch import Round


def _clock(when: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def finding_line(finding: Finding, when: float | None = None) -> str:
    """One line for a new finding: time, run, layer, step, severity, code and message."""
    layer = "-" if finding.layer is None else str(finding.layer)
    step = "-" if finding.first_step is None else str(finding.first_step)
    return (
        f"{_clock(when)}  {finding.run}  layer {layer}  step {step}  "
        f"{finding.severity.upper()} {finding.code}: {finding.message}"
    )


def status_lines(round_: Round, when: float | None = None) -> list[str]:
    """One line per newly logged step of each run, and one for files still being written.

    A step's line names its least entropic layer: where collapse would show first.
    """
    lines = []
    analysis = round_.analysis
    for run, steps in round_.new_steps.items():
        assert analysis is not None  # new steps come from an analysis
        metrics = analysis.metrics.filter(analysis.metrics["run"] == run)
        for step in steps:
            lines.append(f"{_clock(when)}  {run}  step {step}  {_step_summary(metrics, step)}")
    if round_.pending and round_.new_steps:
        lines.append(
            f"{_clock(when)}  waiting for {_plural(len(round_.pending), 'file')} "
            "still being written"
        )
    return lines


def _step_summary(metrics: pl.DataFrame, step: int) -> str:
    import polars as pl

    rows = metrics.filter(pl.col("step") == step)
    text = _plural(rows.height, "layer")
    for name, label in (("token_entropy_norm", "token"), ("load_entropy_norm", "load")):
        known = rows.filter(pl.col(name).is_not_null())
        if known.height:
            low = known.sort(name).row(0, named=True)
            return f"{text}  lowest {label} entropy {low[name]:.3f} (layer {low['layer']})"
    return text


class Display(Protocol):
    """Where ``watch`` shows each round."""

    def show(self, round_: Round) -> None: ...

    def __enter__(self) -> Display: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None: ...


class LineDisplay:
    """Not a terminal: each new finding once, and a status line per round with new steps."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def show(self, round_: Round) -> None:
        now = time.time()
        for finding in round_.new_findings:
            self.console.print(finding_line(finding, now), markup=False, soft_wrap=True)
        for line in status_lines(round_, now):
            self.console.print(line, markup=False, soft_wrap=True)
        self.console.file.flush()

    def __enter__(self) -> LineDisplay:
        return self

    def __exit__(self, *_: object) -> None:
        return None


class LiveDisplay:
    """A terminal: the whole report, redrawn in place after every round."""

    def __init__(self, console: Console, interval: float) -> None:
        from rich.live import Live

        self.console = console
        self.interval = interval
        self.live = Live(console=console, auto_refresh=False, transient=True)

    def show(self, round_: Round) -> None:
        self.live.update(self._view(round_), refresh=True)

    def _view(self, round_: Round) -> RenderableType:
        from rich.console import Group
        from rich.text import Text

        header = Text.assemble(
            ("routelog watch", "bold"),
            f"  {_clock()}  ",
            ("newest step ", "dim"),
            (str(round_.newest_step) if round_.newest_step is not None else "–", "bold"),
            (f"  every {self.interval:g}s, Ctrl-C for the final report", "dim"),
        )
        parts: list[RenderableType] = [header]
        if round_.waiting:
            waiting = printable(", ".join(round_.waiting))
            parts.append(Text(f"waiting for logs in: {waiting}", "yellow"))
        if round_.pending:
            parts.append(Text(f"{_plural(len(round_.pending), 'file')} still being written", "dim"))
        if round_.analysis is not None:
            parts.append(report_text(round_.analysis, self.console))
        return Group(*parts)

    def __enter__(self) -> LiveDisplay:
        self.live.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.live.stop()


def report_text(analysis: Analysis, console: Console) -> RenderableType:
    """The ``analyze`` report as one renderable, at ``console``'s width and in colour when
    ``console`` colours (:func:`routelog.render.report.report_text`, read back as rich text)."""
    from rich.text import Text

    text = report.report_text(analysis, width=console.width, color=console.color_system is not None)
    return Text.from_ansi(text.rstrip("\n"))


def fail_line(finding: Finding, level: str) -> str:
    """The line ``--fail-on`` prints (on stderr) before it exits 1."""
    return f"routelog: watch: stopping (--fail-on {level}): {finding_line(finding)}"
