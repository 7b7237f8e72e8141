"""Ingest: files -> canonical batches. The only stage that knows a file format.

Every format module exposes ``scan(path, options, info) -> Iterator[Batch]`` and is
registered in ``FORMATS`` by file suffix. A batch holds one of three canonical payloads:

``probs``
    one row per routed token: ``step: i64, layer: i32, probs: Array(Float32, E)``, optional
    ``token: i64``, ``dataset: str``, and ``logit_lse: f32`` when the input carried logits.
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

from routelog.errors import InputError, RoutelogError
from routelog.storage import Location, Remote

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


def format_of(path: Location) -> str | None:
    """The format name for a file, by suffix (``.jsonl.gz`` counts as one suffix)."""
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix][0]
    return None


def _scanner(path: Location) -> Scanner:
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

    files: list[Location]
    ignored: list[Location]


def discover(path: Location) -> RunFiles:
    """List the log files of a run: the file itself, or a directory walked recursively
    (a remote prefix: every object under it)."""
    if isinstance(path, Remote):
        return _discover_remote(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        if format_of(path) is None:
            _scanner(path)  # raises the unknown-type error
        return RunFiles([path], [])
    files: list[Location] = []
    ignored: list[Location] = []
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in child.relative_to(path).parts):
            continue
        (files if format_of(child) else ignored).append(child)
    if not files:
        known = ", ".join(f"*{s}" for s in sorted(FORMATS))
        raise InputError(f"{path}: no routing logs found (looked for {known})")
    return RunFiles(files, ignored)


def _discover_remote(prefix: Remote) -> RunFiles:
    from routelog import storage

    objects = storage.discover(prefix)
    if len(objects) == 1 and objects[0].url == prefix.url:
        if format_of(prefix) is None:
            _scanner(prefix)  # raises the unknown-type error
        return RunFiles(list(objects), [])
    files: list[Location] = []
    ignored: list[Location] = []
    for child in objects:
        if any(part.startswith(".") for part in storage.relative_parts(prefix, child)):
            continue
        (files if format_of(child) else ignored).append(child)
    if not files:
        known = ", ".join(f"*{s}" for s in sorted(FORMATS))
        raise InputError(f"{prefix}: no routing logs found (looked for {known})")
    return RunFiles(files, ignored)


def scan(path: Location, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read one file into canonical batches, whatever its format.

    An operating-system error (the file vanished or is unreadable) is an ``InputError`` too.
    """
    if isinstance(path, Remote):
        yield from _scan_remote(path, options, info)
        return
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty")
        yield from _scanner(path)(path, options, info)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _scan_remote(remote: Remote, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read one object: Parquet by ranged reads, JSONL as a stream, ``.pt`` spilled to a
    temporary file. Each reader names the file by a stand-in path with the object's name;
    its errors are rewritten to name the URL."""
    from routelog import storage
    from routelog.executor import relocated

    if remote.size == 0:
        raise InputError(f"{remote}: file is empty")
    fmt = format_of(remote)
    standin = Path(remote.url)
    try:
        if fmt == "parquet":
            from routelog.ingest import parquet

            with storage.open_random(remote) as handle:
                yield from parquet.scan(standin, options, info, source=handle)
        elif fmt == "jsonl":
            from routelog.ingest import jsonl

            with storage.open_stream(remote) as stream:
                yield from jsonl.scan(standin, options, info, stream=stream)
        else:
            with storage.spilled(remote) as local:
                standin = local
                yield from _scanner(remote)(local, options, info)
    except RoutelogError as error:
        raise relocated(error, str(standin), remote.url) from None
    except OSError as exc:
        raise storage.failure(remote, exc) from exc
