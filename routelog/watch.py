"""Watch runs while they are written: poll, read only complete files, report what is new.

A training job writes its routing logs a step at a time. :class:`Watcher` polls the run
directories; each :meth:`Watcher.poll` re-analyses them through the statistics cache (so a
round costs only the files that appeared or grew since the last one) and says which steps
and which findings are new. Files still being written are left for a later round, never
read half-way and never an error:

- Parquet: complete once it ends with its footer (the ``PAR1`` magic after the footer length);
  writers put the footer last, on close.
- ``.pt`` / ``.pth``: complete once the zip's end-of-central-directory record is there
  (``torch.save`` writes it last).
- JSONL: complete up to the last whole line; a file whose last line is unfinished waits.
- Anything else (gzip streams, other formats): complete once its size and modification time
  are unchanged since the previous round.

A run in a bucket (``s3://``, ``gs://``) is polled by listing its prefix. An object is
written whole (it appears when its upload completes), so every listed object is complete.
The cache keys each object by its URL, size and ETag or generation, so a re-uploaded object
is read again and never served stale; an object replaced while a round reads it is left for
the next round (its parts could mix two versions: see :class:`routelog.storage.Pinned`).

Nothing here prints; ``routelog.render.watch`` shows the rounds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from routelog import ingest
from routelog.errors import ChangedError, InputError
from routelog.findings import SEVERITY_ORDER, Finding, Severity
from routelog.storage import Location, Remote

if TYPE_CHECKING:
    from routelog.api import Analysis, RunSpec
    from routelog.cache import Cache
    from routelog.config import Config
    from routelog.executor import Executor
    from routelog.options import Options

PARQUET_MAGIC = b"PAR1"
ZIP_END = b"PK\x05\x06"
ZIP_END_SEARCH = 22 + 0xFFFF  # the record, plus the longest comment it may carry


def _tail(path: Path, size: int, count: int) -> bytes:
    with path.open("rb") as stream:
        stream.seek(max(0, size - count))
        return stream.read(count)


def _parquet_complete(path: Path, size: int) -> bool:
    if size < 12:
        return False
    tail = _tail(path, size, 8)
    footer = int.from_bytes(tail[:4], "little")
    return tail[4:] == PARQUET_MAGIC and footer + 12 <= size


def _zip_complete(path: Path, size: int) -> bool:
    return size >= 22 and ZIP_END in _tail(path, size, ZIP_END_SEARCH)


def _lines_complete(path: Path, size: int) -> bool:
    return _tail(path, size, 1) == b"\n"


_MARKERS = {
    ".parquet": _parquet_complete,
    ".pq": _parquet_complete,
    ".pt": _zip_complete,
    ".pth": _zip_complete,
    ".jsonl": _lines_complete,
    ".ndjson": _lines_complete,
}


@dataclass
class Completeness:
    """Decides whether a log file is fully written, remembering what each round saw."""

    seen: dict[Path, tuple[int, int]] = field(default_factory=dict)
    """(size, mtime_ns) of every file at the previous round."""

    def __call__(self, path: Path) -> bool:
        try:
            stat = path.stat()
        except OSError:
            return False  # vanished between listing and looking: a later round sees it
        now = (stat.st_size, stat.st_mtime_ns)
        before = self.seen.get(path)
        self.seen[path] = now
        if stat.st_size == 0:
            return False
        marker = _MARKERS.get(path.suffix.lower())
        if marker is not None:
            try:
                return marker(path, stat.st_size)
            except OSError:
                return False
        return before == now


@dataclass(frozen=True)
class Round:
    """What one poll found."""

    analysis: Analysis | None
    """The analysis of every complete file (None while no run has a complete file)."""
    new_steps: dict[str, list[int]]
    """Per run, the steps logged for the first time in this round."""
    new_findings: list[Finding]
    """Findings not reported by an earlier round."""
    pending: list[Location]
    """Log files left for a later round: still being written (or replaced while read)."""
    waiting: list[str]
    """Runs with no complete log file yet (their directory may not exist yet)."""

    @property
    def newest_step(self) -> int | None:
        if self.analysis is None or self.analysis.metrics.height == 0:
            return None
        return int(self.analysis.metrics["step"].max())  # type: ignore[arg-type]


def _finding_key(finding: Finding) -> tuple[str, int | None, str, int | None]:
    return (finding.run, finding.layer, finding.code, finding.first_step)


def at_least(finding: Finding, level: Severity | str) -> bool:
    """Whether a finding is as severe as ``level`` (``fail`` is worse than ``warn``)."""
    return SEVERITY_ORDER[finding.severity] <= SEVERITY_ORDER[level]


class Watcher:
    """Polls runs and reports each round's new steps and findings (each exactly once)."""

    def __init__(
        self,
        specs: Sequence[RunSpec],
        options: Options,
        config: Config,
        cache: Cache | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.specs = list(specs)
        self.options = options
        self.config = config
        self.cache = cache
        self.executor = executor
        self.complete = Completeness()
        self.steps: dict[str, set[int]] = {}
        self.reported: set[tuple[str, int | None, str, int | None]] = set()
        self.last: Analysis | None = None
        self.last_round: Round | None = None
        """The last poll's round (its ``pending`` files: those the last look left out)."""

    def final(self) -> Analysis | None:
        """The last analysis, noting the files it left out at the last look (the report
        written when watching stops must not read as if it covered them)."""
        pending = self.last_round.pending if self.last_round is not None else []
        if self.last is None or not pending:
            return self.last
        names = ", ".join(str(f) for f in pending[:3])
        more = f" and {len(pending) - 3} more" if len(pending) > 3 else ""
        count = len(pending)
        note = (
            f"{count} log file{'s' if count > 1 else ''} not read: still being written at "
            f"the last look ({names}{more})"
        )
        return replace(self.last, notes=[*self.last.notes, note])

    def poll(self) -> Round:
        """Analyse every complete file now; new steps and findings since the last poll."""
        self.last_round = self._poll()
        return self.last_round

    def _poll(self) -> Round:
        from routelog import api

        complete: set[Location] = set()
        pending: list[Location] = []
        ready: list[RunSpec] = []
        waiting: list[str] = []
        for spec in self.specs:
            files = _log_files(spec.path)
            done = [f for f in files if isinstance(f, Remote) or self.complete(f)]
            complete.update(done)
            pending += [f for f in files if f not in done]
            if done:
                ready.append(spec)
            else:
                waiting.append(spec.name)
        if not ready:
            return Round(None, {}, [], pending, waiting)
        try:
            analysis = api.analyze(
                ready,
                options=self.options,
                config=self.config,
                cache=self.cache,
                executor=self.executor,
                accept=lambda f: f in complete,
            )
        except ChangedError as error:  # an object replaced mid-read: the next round reads it
            changed = [f for f in complete if str(error).startswith(f"{f}:")]
            return Round(self.last, {}, [], pending + changed, waiting)
        self.last = analysis
        return Round(
            analysis,
            self._new_steps(analysis),
            self._new_findings(analysis),
            pending,
            waiting,
        )

    def _new_steps(self, analysis: Analysis) -> dict[str, list[int]]:
        new: dict[str, list[int]] = {}
        for run, steps in analysis.metrics.group_by("run").agg("step").iter_rows():
            seen = self.steps.setdefault(run, set())
            fresh = sorted(set(steps) - seen)
            seen.update(fresh)
            if fresh:
                new[run] = fresh
        return new

    def _new_findings(self, analysis: Analysis) -> list[Finding]:
        new = [f for f in analysis.findings if _finding_key(f) not in self.reported]
        self.reported.update(_finding_key(f) for f in new)
        return new


def _log_files(path: Location) -> list[Location]:
    """The log files of a run as they are now; none while its directory or prefix is empty
    or missing (a missing bucket is an error: no job is about to create it).

    A file named on the command line must be a log file (an unknown type is an error).
    """
    if isinstance(path, Remote):
        return ingest.discover(path, missing_ok=True).files
    if not os.path.lexists(path):
        return []
    if not path.is_dir():
        return ingest.discover(path).files
    try:
        return ingest.discover(path).files
    except InputError:
        return []  # no log written yet
