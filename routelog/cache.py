"""The incremental cache: each log file's reduced statistics, reused while the file is unchanged.

An entry belongs to one file read with one set of reduction options. It is keyed by the file's
absolute path, size, modification time (ns) and a content fingerprint (a hash of its first and
last 64 KiB, which hold a Parquet file's footer: a log rewritten with the same size and mtime
is not served stale) (an object in a bucket: its URL, size and ETag or generation, from
:func:`routelog.storage.identity`, so a replaced object is a miss), routelog's
``KERNEL_VERSION`` and every ``Options`` field except those applied after merging
(``dead_fraction``). On disk an entry is three files in the cache directory, named after a
hash of the path and options::

    <hash>.json                  {"routelog_cache", "format", "key", "info", "data", "digests",
                                  "selections", "top_k_assumed"}
    <hash>-<data>.stats.parquet  the statistics frame (``kernels.STATS_SCHEMA``)
    <hash>-<data>.sel.parquet    the per-token selections, when the file has token positions
                                 (top-k ids as flat columns topk_0.., which decode faster)

Every file is written to a temporary name and renamed, the JSON last, so a reader sees a whole
entry or none. An entry is trusted only when its JSON parses, its key equals the key computed
now (which binds it to the log file it describes), the SHA-256 of each of its Parquet files
matches the digest its JSON recorded (a swapped or edited frame is a miss), and its frames
have the expected schema; anything else (corrupt, truncated, foreign, from another routelog
version) is a miss, and the fresh result overwrites it. Nothing in the cache is executed: it
holds only JSON and Parquet.

Each file of an entry carries a marker (``"routelog_cache"`` in the JSON, the same key in the
Parquet footer's metadata): ``routelog cache clear`` removes only files that carry it, never
follows a symbolic link, and leaves everything else in the directory alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from routelog import ingest
from routelog.ingest import FileInfo
from routelog.storage import Location, Remote

if TYPE_CHECKING:
    import polars as pl

    from routelog.options import Options

ENV_VAR = "ROUTELOG_CACHE_DIR"
ENTRY_FORMAT = 3
"""Layout of one entry on disk; bump it when the files of an entry change shape."""
AFTER_MERGE = frozenset({"dead_fraction", "default_top_k_source", "default_top_k_file"})
"""Options that do not change a file's statistics: ``dead_fraction`` applies in
``kernels.finish``; where the default k came from is reported, not used (its value is)."""
MARKER = "routelog_cache"
"""Key present in every file routelog writes to the cache (JSON field, Parquet metadata)."""
FINGERPRINT_BYTES = 1 << 16
"""Bytes hashed at each end of a log file for its content fingerprint."""
COMPRESSION: Literal["lz4"] = "lz4"
"""Entries are read far more often than written: lz4 decodes about twice as fast as zstd."""


def default_directory() -> Path:
    """``$ROUTELOG_CACHE_DIR``, else ``$XDG_CACHE_HOME/routelog``, else ``~/.cache/routelog``."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "routelog"


@dataclass(frozen=True)
class Entry:
    """One file's cached reduction."""

    info: FileInfo
    stats: pl.DataFrame
    selections: pl.DataFrame | None
    top_k_assumed: bool = False


@dataclass(frozen=True)
class Usage:
    """What ``routelog cache info`` reports."""

    directory: Path
    entries: int
    bytes: int


@dataclass(frozen=True)
class Cache:
    """Per-file statistics under ``directory`` (created on first write)."""

    directory: Path

    @classmethod
    def at(cls, directory: Path | str | None = None) -> Cache:
        """The cache in ``directory``, or in :func:`default_directory` when None."""
        return cls(Path(directory).expanduser() if directory is not None else default_directory())

    def holds(self, path: Location, options: Options) -> bool:
        """Whether an entry for ``path`` as it is now exists (its frames are checked by load)."""
        key = _key(path, options)
        if key is None:
            return False
        try:
            text = (self.directory / f"{_name(key)}.json").read_text(encoding="utf-8")
            document = json.loads(text)
        except (OSError, ValueError):
            return False
        return isinstance(document, dict) and document.get("key") == key

    def load(self, path: Location, options: Options) -> Entry | None:
        """The cached reduction of ``path`` under ``options``, or None when absent or untrusted."""
        key = _key(path, options)
        if key is None:
            return None
        name = _name(key)
        try:
            document = json.loads((self.directory / f"{name}.json").read_text(encoding="utf-8"))
            if not isinstance(document, dict) or document.get("format") != ENTRY_FORMAT:
                return None
            if document.get("key") != key:
                return None
            info = _info_from(document["info"])
            assumed = document["top_k_assumed"]
            if not isinstance(assumed, bool):
                return None
            data = document["data"]
            digests = document["digests"]
            if not isinstance(data, str) or not data.isalnum() or not isinstance(digests, dict):
                return None
            stats = _read_frame(self.directory / f"{name}-{data}.stats.parquet", digests["stats"])
            if stats is None or not _is_stats(stats):
                return None
            selections = None
            if document.get("selections"):
                stored = _read_frame(self.directory / f"{name}-{data}.sel.parquet", digests["sel"])
                selections = _unflatten(stored) if stored is not None else None
                if selections is None:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        info.path = str(path)
        return Entry(info, stats, selections, assumed)

    def store(self, path: Location, options: Options, entry: Entry) -> None:
        """Write an entry for ``path``; a cache that cannot be written is skipped, not an error."""
        key = _key(path, options)
        if key is None:
            return
        name = _name(key)
        data = uuid.uuid4().hex
        digests: dict[str, str] = {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            digests["stats"] = _write_frame(
                self.directory / f"{name}-{data}.stats.parquet", entry.stats
            )
            if entry.selections is not None:
                digests["sel"] = _write_frame(
                    self.directory / f"{name}-{data}.sel.parquet", _flatten(entry.selections)
                )
            document = {
                MARKER: ENTRY_FORMAT,
                "format": ENTRY_FORMAT,
                "key": key,
                "info": dataclasses.asdict(entry.info),
                "data": data,
                "digests": digests,
                "selections": entry.selections is not None,
                "top_k_assumed": entry.top_k_assumed,
            }
            text = json.dumps(document, indent=1)
            _write_atomic(
                self.directory / f"{name}.json",
                lambda target: Path(target).write_text(text, encoding="utf-8"),
            )
        except OSError:
            return
        for stale in self.directory.glob(f"{name}-*.parquet"):
            if not stale.name.startswith(f"{name}-{data}."):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def usage(self) -> Usage:
        """Number of entries and bytes used (files proven to be routelog's only)."""
        files = list(self._files())
        entries = sum(1 for f in files if f.suffix == ".json")
        return Usage(self.directory, entries, sum(f.stat().st_size for f in files))

    def clear(self) -> int:
        """Remove every entry; returns the number of entries removed.

        Only regular files that carry routelog's marker are removed: a file that merely has
        an entry's name, a symbolic link (wherever it points) and anything else stay.
        """
        removed = 0
        for file in self._files():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
                removed += file.suffix == ".json"
        return removed

    def _files(self) -> Iterator[Path]:
        """Files of this cache: named like routelog's, regular (not links), with its marker."""
        try:
            scan = list(os.scandir(self.directory))
        except OSError:
            return
        for item in scan:
            if not _is_ours(item.name) or not item.is_file(follow_symlinks=False):
                continue
            if _has_marker(Path(item.path)):
                yield Path(item.path)


def _is_ours(name: str) -> bool:
    stem = name.split(".", 1)[0].split("-", 1)[0]
    is_hash = len(stem) == 64 and all(c in "0123456789abcdef" for c in stem)
    return is_hash and name.endswith((".json", ".stats.parquet", ".sel.parquet"))


def _has_marker(path: Path) -> bool:
    """Whether a cache file carries routelog's marker (read without following links)."""
    try:
        if path.suffix == ".json":
            with path.open("rb") as stream:
                document = json.loads(stream.read(1 << 22))
            return isinstance(document, dict) and MARKER in document
        import pyarrow.parquet as pq

        metadata = pq.read_metadata(path).metadata or {}
        return MARKER.encode() in metadata
    except (OSError, ValueError, RecursionError):
        return False
    except Exception:  # pyarrow's errors: not a Parquet file, so not ours
        return False


def fingerprint(path: Path) -> str:
    """SHA-256 of the first and last ``FINGERPRINT_BYTES`` of a file (its Parquet footer)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        digest.update(stream.read(FINGERPRINT_BYTES))
        size = stream.seek(0, os.SEEK_END)
        if size > FINGERPRINT_BYTES:
            stream.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(stream.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def _key(path: Location, options: Options) -> dict[str, Any] | None:
    """What an entry must match: the file as it is now, the kernel, the reduction options."""
    from routelog import __version__, kernels

    reduction = {
        f.name: _plain(getattr(options, f.name))
        for f in dataclasses.fields(options)
        if f.name not in AFTER_MERGE
    }
    if isinstance(path, Remote):
        from routelog.storage import identity

        found = identity(path)
        # the sidecars and config.json a framework reader reads beside the object
        companions = [identity(c) for c in ingest.companions(path)]
        if found is None or None in companions:
            return None
        return {
            "path": found["url"],
            "size": found["size"],
            "version": found["version"],
            "depends": [[c["url"], c["size"], c["version"]] for c in companions if c],
            "kernel_version": kernels.KERNEL_VERSION,
            "routelog_version": __version__,
            "options": reduction,
        }
    try:
        absolute = path.resolve()
        stat = absolute.stat()
        content = fingerprint(absolute)
    except OSError:
        return None
    try:  # sidecars and config.json the reading depends on: a change to one is a change
        depends = [
            [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in ingest.depends(path)
        ]
    except OSError:
        return None
    return {
        "path": str(absolute),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "depends": depends,
        "fingerprint": content,
        "kernel_version": kernels.KERNEL_VERSION,
        "routelog_version": __version__,
        "options": reduction,
    }


def _plain(value: object) -> object:
    """Options values as JSON values that compare equal after a round trip."""
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_plain(getattr(value, f.name)) for f in dataclasses.fields(value)]
    return value


def _name(key: dict[str, Any]) -> str:
    """The entry's file name: one entry per file and options, replaced when the file changes."""
    identity = json.dumps([key["path"], key["options"]], sort_keys=True)
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


def _write_atomic(target: Path, write: Any) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        Path(temporary).replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(temporary).unlink()
        raise


def _write_frame(target: Path, frame: pl.DataFrame) -> str:
    """Write a frame with routelog's marker; returns the SHA-256 of the bytes written."""
    import io

    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression=COMPRESSION, metadata={MARKER: str(ENTRY_FORMAT)})
    content = buffer.getvalue()
    _write_atomic(target, lambda temporary: Path(temporary).write_bytes(content))
    return hashlib.sha256(content).hexdigest()


def _read_frame(path: Path, digest: object) -> pl.DataFrame | None:
    """The frame in ``path`` when its bytes hash to ``digest`` (else None: swapped or edited)."""
    import io

    import polars as pl

    try:
        content = path.read_bytes()
        if not isinstance(digest, str) or hashlib.sha256(content).hexdigest() != digest:
            return None
        return pl.read_parquet(io.BytesIO(content))
    except (OSError, pl.exceptions.PolarsError):
        return None


def _is_stats(frame: pl.DataFrame) -> bool:
    from routelog import kernels

    return dict(frame.schema) == kernels.STATS_SCHEMA


def _flatten(selections: pl.DataFrame) -> pl.DataFrame:
    """Top-k ids as k Int32 columns: a fixed-size list column decodes several times slower."""
    import polars as pl

    from routelog.kernels import SELECTION_KEYS

    k = selections.schema["topk"].size  # type: ignore[attr-defined]
    return selections.select(
        *SELECTION_KEYS,
        *[pl.col("topk").arr.get(i).cast(pl.Int32).alias(f"topk_{i}") for i in range(k)],
    )


def _unflatten(stored: pl.DataFrame) -> pl.DataFrame | None:
    """The selections frame back from its stored form; None when the schema is not ours."""
    import polars as pl

    from routelog.kernels import SELECTION_KEYS

    schema = stored.schema
    names = list(schema)
    k = len(names) - len(SELECTION_KEYS)
    if k < 1 or names != [*SELECTION_KEYS, *[f"topk_{i}" for i in range(k)]]:
        return None
    if any(schema[name] != dtype for name, dtype in SELECTION_KEYS.items()):
        return None
    if any(schema[f"topk_{i}"] != pl.Int32 for i in range(k)):
        return None
    import numpy as np

    ids = np.ascontiguousarray(stored.select(f"topk_{i}" for i in range(k)).to_numpy())
    return stored.select(*SELECTION_KEYS).with_columns(pl.Series("topk", ids))


_INFO_TYPES: dict[str, type | tuple[type, ...]] = {
    "path": str,
    "format": str,
    "layout": str,
    "payload": str,
    "rows": int,
    "masked_rows": int,
    "skipped_rows": int,
    "n_experts": (int, type(None)),
    "top_k": (int, type(None)),
    "steps": list,
    "layers": list,
    "warnings": list,
    "recorded": (dict, type(None)),
}


def _info_from(value: object) -> FileInfo:
    """A FileInfo from its JSON form, refusing anything that is not exactly that shape."""
    names = {f.name for f in dataclasses.fields(FileInfo)}
    if not isinstance(value, dict) or set(value) != names:
        raise ValueError("cache entry: info does not match FileInfo")
    for name, expected in _INFO_TYPES.items():
        if name in value and not isinstance(value[name], expected):
            raise ValueError(f"cache entry: info field {name!r} has the wrong type")
    for name, item_type in (("steps", int), ("layers", int), ("warnings", str)):
        if not all(isinstance(item, item_type) for item in value[name]):
            raise ValueError(f"cache entry: info field {name!r} has the wrong items")
    return FileInfo(**value)
