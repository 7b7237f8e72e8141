"""Where bytes come from: local paths, and objects in S3 or GCS buckets named by URL.

A location on the command line is a local path, ``file://PATH`` (the same local path), or
``s3://BUCKET/PREFIX`` / ``gs://BUCKET/PREFIX``. A remote prefix is listed recursively like a
directory; each object found is a :class:`Remote` that carries its URL, size and modification
time from the listing. Local paths never come through here beyond :func:`locate`: they stay on
the readers' own code paths.

The layer is pyarrow's own file systems (``pyarrow.fs.S3FileSystem``, ``GcsFileSystem``),
which ship inside the pyarrow wheel routelog already depends on: no new dependency, and
Parquet row groups are fetched with ranged GETs by the same C++ reader that reads local files.
Credentials, region and endpoint come from each cloud's standard environment and files
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/credentials``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``; ``GOOGLE_APPLICATION_CREDENTIALS``, ``STORAGE_EMULATOR_HOST``); routelog
reads only the region and endpoint itself and never prints any of them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from routelog.errors import ChangedError, InputError, UsageError

if TYPE_CHECKING:
    import pyarrow.fs

CLOUD_EXTRA = "pip install 'routelog[cloud]'"
SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs"}
"""URL schemes read, and the name each one is shown under."""
PYARROW_FLOOR = (26, 0, 1)
"""The pyarrow release the ``cloud`` extra requires (the one its tests ran on)."""
GCS_RETRY_SECONDS = 8
"""How long the GCS client retries (without it, no credentials means retrying for minutes)."""
SPILL_CHUNK = 1 << 23
"""Bytes copied at a time when a remote object is spilled to a temporary file."""
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Remote:
    """An object (or a prefix, before listing) in a bucket, named by its URL."""

    url: str
    """``s3://bucket/key`` or ``gs://bucket/key``, as normalised by :func:`locate`."""
    size: int | None = None
    """Bytes, from the listing (None for a location not listed yet)."""
    mtime_ns: int | None = None
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        return self.url

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def key(self) -> str:
        """``bucket/key``: the path pyarrow's file systems take."""
        return self.url.split("://", 1)[1].rstrip("/")

    @property
    def name(self) -> str:
        """The last part of the key (the bucket for a bare bucket)."""
        return self.key.rsplit("/", 1)[-1]

    def child(self, key: str, size: int | None, mtime_ns: int | None) -> Remote:
        return Remote(f"{self.scheme}://{key}", size, mtime_ns)


Location = Path | Remote
"""Where a run or a file is: a local path, or an object or prefix in a bucket."""


def is_url(text: str) -> bool:
    """Whether ``text`` starts with ``SCHEME://``."""
    return _URL.match(text) is not None


def locate(text: str) -> Location:
    """A location from what the user typed: a path, ``file://``, ``s3://`` or ``gs://``."""
    if not text.strip():  # Path("") is the current directory: never what an empty value meant
        raise UsageError("an empty path: give a log file or a run directory")
    if not is_url(text):
        return local_path(text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{text}: a file:// URL names a local path (file:///PATH)")
        return local_path(unquote(parts.path))
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in ("s3", "gs", "file"))
        raise UsageError(f"{text}: unsupported URL scheme {scheme}:// (routelog reads {known})")
    if not parts.netloc:
        raise UsageError(f"{text}: no bucket in the URL ({scheme}://BUCKET/PREFIX)")
    key = unquote(parts.path).strip("/")
    return Remote(f"{SCHEMES[scheme]}://{parts.netloc}/{key}".rstrip("/"))


def local_path(text: str) -> Path:
    """``text`` as a local path, refused when it is a symbolic link loop (nothing could be
    read through it, and every later ``resolve`` would fail)."""
    path = Path(text)
    try:
        path.resolve()
    except (RuntimeError, OSError):  # RuntimeError up to Python 3.12, OSError (ELOOP) after
        raise InputError(f"{text}: a symbolic link loop") from None
    return path


def filesystem(scheme: str) -> pyarrow.fs.FileSystem:
    """The file system for ``s3`` or ``gs``, configured from the cloud's environment."""
    return _filesystem(scheme, _settings(scheme))


def _settings(scheme: str) -> tuple[tuple[str, str], ...]:
    """The environment a file system is built from (so a changed environment is seen)."""
    names: tuple[str, ...] = ("STORAGE_EMULATOR_HOST",)
    if scheme == "s3":
        names = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
    return tuple((n, os.environ[n]) for n in names if os.environ.get(n))


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, settings: tuple[tuple[str, str], ...]) -> pyarrow.fs.FileSystem:
    fs = _pyarrow_fs()
    env = dict(settings)
    try:
        if scheme == "s3":
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
            region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            kwargs: dict[str, Any] = {}
            if region:
                kwargs["region"] = region
            if endpoint:
                parts = urlsplit(endpoint if is_url(endpoint) else f"https://{endpoint}")
                kwargs["endpoint_override"] = parts.netloc
                kwargs["scheme"] = parts.scheme or "https"
            return fs.S3FileSystem(**kwargs)
        emulator = env.get("STORAGE_EMULATOR_HOST")
        if emulator:
            parts = urlsplit(emulator if is_url(emulator) else f"http://{emulator}")
            return fs.GcsFileSystem(
                anonymous=True,
                endpoint_override=parts.netloc,
                scheme=parts.scheme or "http",
                retry_time_limit=timedelta(seconds=GCS_RETRY_SECONDS),
            )
        return fs.GcsFileSystem(retry_time_limit=timedelta(seconds=GCS_RETRY_SECONDS))
    except (ImportError, AttributeError) as exc:  # a pyarrow built without S3 or GCS
        raise UsageError(
            f"{scheme}:// needs pyarrow with {scheme.upper()} support ({exc}): {CLOUD_EXTRA}"
        ) from None


def _pyarrow_fs() -> Any:
    """``pyarrow.fs`` at the release the ``cloud`` extra requires, else a one-line error."""
    try:
        import pyarrow
        import pyarrow.fs
    except ImportError:
        raise UsageError(f"reading from object storage needs pyarrow.fs: {CLOUD_EXTRA}") from None
    found = tuple(int(p) for p in re.findall(r"\d+", pyarrow.__version__)[:3])
    if found < PYARROW_FLOOR:
        need = ".".join(map(str, PYARROW_FLOOR))
        raise UsageError(
            f"reading from object storage needs pyarrow>={need} (found {pyarrow.__version__}): "
            f"{CLOUD_EXTRA}"
        )
    return pyarrow.fs


def failure(remote: Remote, exc: BaseException) -> InputError:
    """An error from the object store as one line naming the URL (never the credentials)."""
    text = str(exc)
    upper = text.upper()
    if "ACCESS_DENIED" in upper or "ACCESSDENIED" in upper or "FORBIDDEN" in upper:
        reason = "access denied (check the credentials in AWS_* or ~/.aws, and the bucket policy)"
    elif "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper or "BUCKET DOES NOT EXIST" in upper:
        reason = f"no such bucket {remote.key.split('/', 1)[0]!r}"
    elif "INVALIDACCESSKEYID" in upper or "INVALID_ACCESS_KEY" in upper:
        reason = "the access key is not known to the server (check AWS_ACCESS_KEY_ID)"
    elif "OAUTH2 ACCESS TOKEN" in upper:
        reason = (
            "no Google credentials (set GOOGLE_APPLICATION_CREDENTIALS, or run "
            "gcloud auth application-default login)"
        )
    elif "SIGNATURE" in upper:
        reason = "the request signature was refused (check AWS_SECRET_ACCESS_KEY)"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
    return InputError(f"{remote.url}: cannot read ({reason})")


def discover(location: Remote, *, missing_ok: bool = False) -> list[Remote]:
    """The objects at ``location``: the object itself, or every object under the prefix.

    Objects come in key order with their sizes and modification times from the listing.
    ``missing_ok``: a prefix with no object under it (yet) is an empty list, not an error
    (``watch`` waits for it); a missing bucket is an error all the same.
    """
    fs = _pyarrow_fs()
    system = filesystem(location.scheme)
    try:
        info = system.get_file_info(location.key)
        if info.type == fs.FileType.File:
            return [_from_info(location, info)]
        if info.type == fs.FileType.NotFound:
            bucket = location.key.split("/", 1)[0]
            if bucket != location.key and system.get_file_info(bucket).type == fs.FileType.NotFound:
                raise InputError(f"{location.url}: cannot read (no such bucket {bucket!r})")
            if missing_ok:
                return []
            raise InputError(f"{location.url}: no such object or prefix")
        selector = fs.FileSelector(location.key, recursive=True)
        listed = system.get_file_info(selector)
    except OSError as exc:
        raise failure(location, exc) from None
    found = [_from_info(location, i) for i in listed if i.type == fs.FileType.File]
    return sorted(found, key=lambda r: r.url)


def relative_parts(prefix: Remote, remote: Remote) -> tuple[str, ...]:
    """The parts of ``remote``'s key below ``prefix`` (for skipping hidden names)."""
    below = remote.key[len(prefix.key) :].strip("/")
    return tuple(below.split("/")) if below else ()


def _from_info(location: Remote, info: Any) -> Remote:
    mtime = info.mtime_ns if info.mtime is not None else None
    return location.child(info.path, info.size, mtime)


def _version(metadata: Any) -> str | None:
    """The ETag (S3) or generation (GCS) in an object's metadata; None when it has neither."""
    tags = {
        k.decode() if isinstance(k, bytes) else str(k): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in metadata.items()
    }
    return tags.get("ETag") or tags.get("generation") or tags.get("Generation") or None


def _head(remote: Remote) -> tuple[int, str | None]:
    """(size, version) of ``remote`` as the store has it now: one HEAD request."""
    try:
        with filesystem(remote.scheme).open_input_file(remote.key) as handle:
            return int(handle.size()), _version(handle.metadata())
    except ValueError as exc:
        # pyarrow's GCS client can hand back an already closed file for an object that is
        # being replaced ("I/O operation on closed file"): as if the object were not there.
        raise OSError(f"{remote.url}: {exc}") from None


def identity(remote: Remote) -> dict[str, Any] | None:
    """What a cache entry of ``remote`` is keyed by: URL, size and ETag (S3) or generation
    (GCS), from one HEAD request made once per listed object. None when it cannot be known
    (then nothing is cached for the object)."""
    if "identity" in remote._memo:
        found: dict[str, Any] | None = remote._memo["identity"]
        return found
    result: dict[str, Any] | None = None
    try:
        size, version = _head(remote)
        if version:
            result = {
                "url": remote.url,
                "size": size,
                "version": version,
                "mtime_ns": remote.mtime_ns,
            }
    except (OSError, UsageError):
        result = None
    remote._memo["identity"] = result
    return result


def changed(remote: Remote) -> InputError:
    """The error for an object replaced while it was read (its parts may mix two versions)."""
    return ChangedError(
        f"{remote.url}: the object changed while it was read (nothing of it was used; "
        "read it again)"
    )


class Pinned:
    """Reads of one version of an object: the version at opening must be the one the cache
    keyed (if it did), and :meth:`verify` (after the last read) that it is still current.

    An object is replaced whole, but a reader that makes several ranged GETs (Parquet row
    groups, a stream read in blocks) could get parts of two versions if it were replaced
    between them: :meth:`verify` then raises :func:`changed`. A read that made one GET got
    one version whatever happened after it, and costs no extra request.
    """

    def __init__(self, remote: Remote, handle: Any) -> None:
        self.remote = remote
        self.handle = handle
        self.gets = 0
        self.version = _version(handle.metadata())
        known = remote._memo.get("identity")
        if known is not None and self.version is not None and known["version"] != self.version:
            raise changed(remote)

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        """The handle is closed by whoever opened it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def read(self, size: int = -1) -> bytes:
        """Read like the handle (for stream readers), counting the reads that fetched data."""
        data: bytes = self.handle.read(size)
        if data:
            self.gets += 1
        return data

    def verify(self, *, always: bool = False) -> None:
        """Raise :func:`changed` if the object was replaced since it was opened (checked when
        more than one read fetched data, or ``always``: readers that seek)."""
        if self.version is None or not (always or self.gets > 1):
            return
        try:
            _, now = _head(self.remote)
        except OSError:
            raise changed(self.remote) from None  # deleted while read
        if now != self.version:
            raise changed(self.remote)


def _open(remote: Remote, handle: Any) -> Any:
    """``handle``, unless pyarrow handed back a closed file (GCS, for an object being
    replaced): then the object changed while it was opened (``watch`` reads it next round)."""
    if handle.closed:
        raise changed(remote)
    return handle


def open_random(remote: Remote) -> Any:
    """A random-access file over ``remote``: each read is a ranged GET (Parquet row groups)."""
    try:
        handle = filesystem(remote.scheme).open_input_file(remote.key)
    except OSError as exc:
        raise failure(remote, exc) from None
    return _open(remote, handle)


def open_stream(remote: Remote) -> Any:
    """A sequential stream over ``remote`` (one GET, read as it is consumed; no decompression)."""
    try:
        handle = filesystem(remote.scheme).open_input_stream(remote.key, compression=None)
    except OSError as exc:
        raise failure(remote, exc) from None
    return _open(remote, handle)


@contextmanager
def spilled(remote: Remote) -> Iterator[Path]:
    """``remote`` copied to a temporary file of the same name, removed on exit.

    For readers that need a seekable local file (``.pt``, a zip archive read whole): one
    streamed GET is faster than the many small ranged GETs a zip reader makes.
    """
    with tempfile.TemporaryDirectory(prefix="routelog-") as directory:
        yield spill_into(remote, Path(directory))


def spill_into(remote: Remote, directory: Path, name: str | None = None) -> Path:
    """Copy ``remote`` into ``directory`` (as ``name``, default its own name), in chunks of
    ``SPILL_CHUNK`` bytes (memory stays bounded whatever the size); one version of it."""
    target = directory / (name or remote.name or "object")
    try:
        with open_stream(remote) as source, target.open("wb") as sink:
            pinned = Pinned(remote, source)
            shutil.copyfileobj(pinned, sink, SPILL_CHUNK)
        pinned.verify()
    except OSError as exc:
        raise failure(remote, exc) from None
    return target


def siblings(remote: Remote) -> list[Remote]:
    """The objects in the same "directory" as ``remote`` (not below it), with itself."""
    fs = _pyarrow_fs()
    parent = remote.key.rsplit("/", 1)[0] if "/" in remote.key else remote.key
    try:
        listed = filesystem(remote.scheme).get_file_info(fs.FileSelector(parent))
    except OSError as exc:
        raise failure(remote, exc) from None
    return sorted(
        (_from_info(remote, i) for i in listed if i.type == fs.FileType.File), key=lambda r: r.url
    )


def find_upward(start: Remote, names: tuple[str, ...], *, upward: bool = True) -> Remote | None:
    """The first object named one of ``names`` at the prefix ``start`` or (``upward``) a
    prefix above it, up to the bucket, as a local search goes up the directories; None when
    there is none."""
    fs = _pyarrow_fs()
    system = filesystem(start.scheme)
    parts = start.key.split("/")
    for depth in range(len(parts), len(parts) - 1 if not upward else 0, -1):
        directory = "/".join(parts[:depth])
        try:
            infos = system.get_file_info([f"{directory}/{n}" for n in names])
        except OSError as exc:
            raise failure(start, exc) from None
        for info in infos:
            if info.type == fs.FileType.File:
                return _from_info(start, info)
    return None


def read_small(remote: Remote, limit: int) -> bytes:
    """The whole of a small object (a config file); larger than ``limit`` is an error."""
    if remote.size is not None and remote.size > limit:
        raise InputError(f"{remote.url}: too large ({remote.size:,} bytes) for a config file")
    try:
        with open_stream(remote) as stream:
            data: bytes = stream.read(limit + 1)
    except OSError as exc:
        raise failure(remote, exc) from None
    if len(data) > limit:
        raise InputError(f"{remote.url}: too large for a config file")
    return data
