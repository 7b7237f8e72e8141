"""A progress bar on stderr for slow reads: shown only after about a second, only on a terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from routelog.storage import Location

DELAY_SECONDS = 1.0


class FileProgress:
    """A ``routelog.api.Progress`` callback drawing a rich bar on ``stream`` (stderr).

    Nothing is drawn until reading has taken ``delay`` seconds, and never when the stream
    is not a terminal, so quick runs and pipes stay clean. Use it as a context manager.
    """

    def __init__(self, stream: IO[str] | None = None, *, delay: float = DELAY_SECONDS) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.started = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, path: Location, done: int, total: int) -> None:
        if self._bar is None:
            if not self.stream.isatty() or time.monotonic() - self.started < self.delay:
                return
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("reading", total=total)
        self._bar.update(
            self._task, completed=done, total=total, description=Path(str(path)).parent.name
        )

    def __enter__(self) -> FileProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
