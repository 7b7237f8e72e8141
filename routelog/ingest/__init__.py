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
    """The log files of one run, and the files in its directory that are not logs."""

    files: list[Path]
    ignored: list[Path]


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
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in child.relative_to(path).parts):
            continue
        (files if format_of(child) else ignored).append(child)
    if not files:
        known = ", ".join(f"*{s}" for s in sorted(FORMATS))
        raise InputError(f"{path}: no routing logs found (looked for {known})")
    return RunFiles(files, ignored)


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
