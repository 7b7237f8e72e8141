"""Ingest: files -> canonical batches. The only stage that knows a file format.

Every format module exposes ``scan(path, options, info) -> Iterator[Batch]`` and is
registered in one table: ``LAYOUTS`` (framework dumps, recognised by their file name) first,
then ``FORMATS`` by file suffix. A module may also expose ``depends(path) -> list[Path]``,
the other files its reading of ``path`` depends on (sidecars, a model's ``config.json``),
so that the cache notices when they change. Files that frameworks write beside their logs
(``SIDECARS``) are neither logs nor junk: runs list them as sidecars. A batch holds one of
three canonical payloads:

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
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
    recorded: dict[str, Any] | None = None  # a routelog.record file's own metadata

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


LAYOUTS: tuple[tuple[re.Pattern[str], str, str, bool], ...] = (
    (re.compile(r"^router_trace_rank\d+\.jsonl$"), "megatron", "megatron_trace", False),
    (
        re.compile(r"^expert_distribution_recorder_\d+(\.\d+)?(_\d+)?\.pt$"),
        "sglang",
        "sglang",
        False,
    ),
    (re.compile(r"^rank\d+\.safetensors$"), "trtllm", "trtllm", False),
    (re.compile(r"\.(npy|npz)$", re.IGNORECASE), "numpy", "routed_experts", True),
)
"""File-name pattern -> (format name, module, sniff) for framework layouts, checked before
suffixes: Megatron-LM router traces, SGLang expert-distribution dumps, TensorRT-LLM expert
statistics, routed-expert id arrays (vLLM, SGLang). With ``sniff``, a name is not enough in a
directory walk: the module's ``recognise(path)`` looks at the content (an ``.npy`` of
embeddings beside the logs is not a routing log)."""

SIDECARS = re.compile(
    r"^(logits_rank\d+\.bin|hidden_states_rank\d+\.bin|router_state_rank\d+\.pt"
    r"|meta_info\.json|config\.json)$"
)
"""Files frameworks write beside their routing logs: read by the reader that needs them
(Megatron logits and router state, TensorRT-LLM's meta_info.json, a model's config.json),
never as logs of their own."""


def _module_of(path: Location, *, sniff: bool = False) -> tuple[str, str] | None:
    """(format name, module) for a log file; None for a sidecar or an unknown file.

    ``sniff``: also look into files whose name alone does not decide (see ``LAYOUTS``).
    """
    name = path.name
    if SIDECARS.match(name):
        return None
    for pattern, fmt, module, by_content in LAYOUTS:
        if pattern.search(name):
            if sniff and by_content and isinstance(path, Path):
                recognise = importlib.import_module(f"routelog.ingest.{module}").recognise
                if not recognise(path):
                    return None
            return fmt, module
    lower = name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return FORMATS[suffix]
    return None


def format_of(path: Location) -> str | None:
    """The format name for a file: by framework file name, else by suffix (``.jsonl.gz``
    counts as one suffix); None for sidecars and files that are not logs."""
    found = _module_of(path)
    return found[0] if found else None


def is_sidecar(path: Location) -> bool:
    """Whether a file is one a framework writes beside its logs (see ``SIDECARS``)."""
    return SIDECARS.match(path.name) is not None


def _scanner(path: Location) -> Scanner:
    found = _module_of(path)
    if found is not None:
        module = importlib.import_module(f"routelog.ingest.{found[1]}")
        scan: Scanner = module.scan
        return scan
    if is_sidecar(path):
        raise InputError(
            f"{path}: a sidecar file, read together with the routing log beside it; "
            "give the log or its directory"
        )
    known = ", ".join([*sorted(FORMATS), ".npy", ".npz", ".safetensors (rank{r}.safetensors)"])
    raise InputError(f"{path}: unknown file type (routelog reads {known})")


def depends(path: Path) -> list[Path]:
    """Other files the reading of ``path`` depends on (sidecars, config.json), for the cache."""
    found = _module_of(path)
    if found is None:
        return []
    module = importlib.import_module(f"routelog.ingest.{found[1]}")
    function = getattr(module, "depends", None)
    if function is None:
        return []
    paths: list[Path] = function(path)
    return paths


@dataclass(frozen=True)
class RunFiles:
    """The log files of one run, the files in its directory that are not logs, and why any
    path named like a log was not read (a dangling link, a directory link loop)."""

    files: list[Location]
    ignored: list[Location]
    sidecars: list[Location] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
    files: list[Path] = []
    ignored: list[Path] = []
    sidecars: list[Path] = []
    notes: list[str] = []
    for child in _walk(path, notes):
        if child.is_file():
            if _module_of(child, sniff=True):
                files.append(child)
            else:
                (sidecars if is_sidecar(child) else ignored).append(child)
        elif child.is_symlink():
            ignored.append(child)
            if format_of(child):
                notes.append(f"{child.relative_to(path)}: a link to a missing file (not read)")
    if not files:
        known = ", ".join([*(f"*{s}" for s in sorted(FORMATS)), "*.npy", "*.npz"])
        frameworks = (
            "router_trace_rank*.jsonl, expert_distribution_recorder_*.pt, rank*.safetensors"
        )
        raise InputError(f"{path}: no routing logs found (looked for {known}, {frameworks})")
    return RunFiles([*sorted(files)], [*sorted(ignored)], [*sorted(sidecars)], notes)


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


_RANK_NAME = re.compile(r"(?:^|[^a-z])rank[_-]?\d+", re.IGNORECASE)


def is_shard(path: Path) -> bool:
    """Whether a file is one rank's shard of a step: ``rankN`` in its name
    (``step_000200.rank3.parquet``, Megatron's ``router_trace_rank3.jsonl``), or a ``rank``
    column in a Parquet file's schema. Shards of one step may repeat token positions (each
    rank numbers its own batch), so they are never taken for merged runs."""
    if _RANK_NAME.search(path.name):
        return True
    if format_of(path) != "parquet":
        return False
    import pyarrow.parquet as pq

    try:
        return "rank" in pq.read_schema(path).names
    except (OSError, ValueError):
        return False


def _discover_remote(prefix: Remote) -> RunFiles:
    from routelog import storage

    objects = storage.discover(prefix)
    if len(objects) == 1 and objects[0].url == prefix.url:
        if format_of(prefix) is None:
            _scanner(prefix)  # raises the unknown-type error
        return RunFiles(list(objects), [])
    files: list[Location] = []
    ignored: list[Location] = []
    sidecars: list[Location] = []
    for child in objects:
        if any(part.startswith(".") for part in storage.relative_parts(prefix, child)):
            continue
        if format_of(child):
            files.append(child)
        else:
            (sidecars if is_sidecar(child) else ignored).append(child)
    if not files:
        known = ", ".join(f"*{s}" for s in sorted(FORMATS))
        raise InputError(f"{prefix}: no routing logs found (looked for {known})")
    return RunFiles(files, ignored, sidecars)


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
