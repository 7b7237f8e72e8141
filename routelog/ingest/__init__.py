"""Ingest: files -> canonical batches. The only stage that knows a file format.

Every format module exposes ``scan(path, options, info) -> Iterator[Batch]`` and is
registered in ``FORMATS`` by file suffix. A batch holds one of three canonical payloads:

``probs``
    one row per routed token: ``step: i64, layer: i32, probs: Array(Float32, E)``, optional
    ``token: i64``, ``dataset: str``, and ``logit_lse: f64`` when the input carried logits.
``topk``
    one row per routed token: ``step, layer, topk_ids: Array(Int32, k)``, optional
    ``token``, ``dataset`` (the router's selected experts, without probabilities).
``counts``
    one row per (step, layer[, dataset]): ``counts: Array(Int64, E)`` tokens per expert.

Format modules fill the row counters of ``FileInfo`` as they read; nothing is dropped
without being counted there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from routelog.errors import InputError

if TYPE_CHECKING:
    import polars as pl

    from routelog.options import Options

PayloadKind = Literal["probs", "topk", "counts"]


@dataclass
class Batch:
    """A chunk of canonical rows from one file, all with the same expert count."""

    kind: PayloadKind
    frame: pl.DataFrame
    n_experts: int
    top_k: int | None = None


@dataclass
class FileInfo:
    """What one file held, filled while it is read (for ``inspect`` and the run summary)."""

    path: str
    format: str
    layout: str = ""
    payload: str = ""
    rows: int = 0
    masked_rows: int = 0
    skipped_rows: int = 0
    n_experts: int | None = None
    top_k: int | None = None
    steps: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


Scanner = Callable[[Path, "Options", FileInfo], Iterator[Batch]]

# suffix -> (format name, module under routelog.ingest); modules are imported on first use.
FORMATS: dict[str, tuple[str, str]] = {
    ".parquet": ("parquet", "parquet"),
    ".pq": ("parquet", "parquet"),
    ".jsonl": ("jsonl", "jsonl"),
    ".ndjson": ("jsonl", "jsonl"),
    ".jsonl.gz": ("jsonl", "jsonl"),
    ".ndjson.gz": ("jsonl", "jsonl"),
    ".pt": ("pt", "pt"),
    ".pth": ("pt", "pt"),
}


def format_of(path: Path) -> str | None:
    """The format name for a file, by suffix (``.jsonl.gz`` counts as one suffix)."""
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix][0]
    return None


def _scanner(path: Path) -> Scanner:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            module = importlib.import_module(f"routelog.ingest.{FORMATS[suffix][1]}")
            scan: Scanner = module.scan
            return scan
    known = ", ".join(sorted(FORMATS))
    raise InputError(f"{path}: unknown file type (routelog reads {known})")


@dataclass(frozen=True)
class RunFiles:
    """The log files of one run, the files in its directory that are not logs, and why any
    path named like a log was not read (a dangling link, a directory link loop)."""

    files: list[Path]
    ignored: list[Path]
    notes: list[str] = field(default_factory=list)


def discover(path: Path) -> RunFiles:
    """List the log files of a run: the file itself, or a directory walked recursively."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        if format_of(path) is None:
            _scanner(path)  # raises the unknown-type error
        return RunFiles([path], [])
    files: list[Path] = []
    ignored: list[Path] = []
    notes: list[str] = []
    for child in _walk(path, notes):
        if child.is_file():
            (files if format_of(child) else ignored).append(child)
        elif child.is_symlink():
            ignored.append(child)
            if format_of(child):
                notes.append(f"{child.relative_to(path)}: a link to a missing file (not read)")
    if not files:
        known = ", ".join(f"*{s}" for s in sorted(FORMATS))
        raise InputError(f"{path}: no routing logs found (looked for {known})")
    return RunFiles(sorted(files), sorted(ignored), notes)


def _walk(root: Path, notes: list[str]) -> list[Path]:
    """Every non-directory entry under ``root``, following directory links once each.

    Hidden entries (a name starting with ``.``) are skipped. A directory reached twice (a
    link loop, or two links to one directory) is read once; the second is noted.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            identity = directory.stat()
        except OSError:
            continue
        key = (identity.st_dev, identity.st_ino)
        if key in seen:
            notes.append(f"{directory.relative_to(root)}: a directory read already (link loop)")
            continue
        seen.add(key)
        try:
            children = sorted(directory.iterdir())
        except OSError as exc:
            notes.append(f"{directory.relative_to(root)}: cannot list ({exc.strerror})")
            continue
        visible = [c for c in children if not c.name.startswith(".")]
        found += [c for c in visible if not c.is_dir()]
        pending += reversed([c for c in visible if c.is_dir()])  # popped in name order
    return found


def scan(path: Path, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read one file into canonical batches, whatever its format.

    An operating-system error (the file vanished or is unreadable) is an ``InputError`` too.
    """
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty")
        yield from _scanner(path)(path, options, info)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
