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
import stat
import tempfile
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

    def __post_init__(self) -> None:
        self.dense = DenseBudget()  # not a field: travels with the reading, not in the cache

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


DENSE_FLOOR = 1 << 22
"""Per-expert counters any file may make routelog allocate (4 Mi: 32 MiB of int64)."""
DENSE_PER_VALUE = 256
"""Further counters allowed per value of payload the file holds (an id, a count row)."""


@dataclass
class DenseBudget:
    """The dense per-expert counters ((step, layer) groups x E) a file has made routelog
    allocate so far, against the payload values it held: the bound that keeps memory
    proportional to a file's payload whatever E its ids or ``num_experts`` claim."""

    cells: int = 0
    values: int = 0

    def claim(self, path: object, groups: int, n_experts: int, values: int, what: str) -> None:
        """Account for ``groups`` x ``n_experts`` counters made from ``values`` payload values,
        or raise naming the file and its claim when the file's total would pass
        ``DENSE_FLOOR + DENSE_PER_VALUE`` x its values."""
        cells = self.cells + groups * n_experts
        held = self.values + values
        if cells > DENSE_FLOOR + DENSE_PER_VALUE * held:
            raise InputError(
                f"{path}: E={n_experts} experts per (step, layer) group would take "
                f"{cells:,} counters for {held:,} {what}, beyond the bound of "
                f"{DENSE_FLOOR:,} + {DENSE_PER_VALUE} per value (is E right?)"
            )
        self.cells, self.values = cells, held


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
            if sniff and by_content:
                recognise = importlib.import_module(f"routelog.ingest.{module}").recognise
                if not _recognised(recognise, path):
                    return None
            return fmt, module
    lower = name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return FORMATS[suffix]
    return None


def _recognised(recognise: Callable[..., bool], path: Location) -> bool:
    """``recognise(path)``; for an object, over ranged reads of it (only its header)."""
    if isinstance(path, Path):
        return recognise(path)
    from routelog import storage

    with storage.open_random(path) as handle:
        return recognise(Path(path.name), source=handle)


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


def discover(path: Location, *, missing_ok: bool = False) -> RunFiles:
    """List the log files of a run: the file itself, or a directory walked recursively
    (a remote prefix: every object under it). ``missing_ok``: a remote prefix with no
    object or no log under it (yet) has no files, instead of being an error."""
    if isinstance(path, Remote):
        return _discover_remote(path, missing_ok=missing_ok)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        if format_of(path) is None:
            _scanner(path)  # raises the unknown-type error
        return RunFiles([path], [])
    if not path.is_dir():
        raise InputError(f"{path}: {_special(path)}, not a log file or a directory")
    notes: list[str] = []
    entries = _walk(path, notes)
    found = _sort_out([c for c in entries if c.is_file()], notes)
    for child in entries:
        if child.is_file():
            continue
        found.ignored.append(child)
        if format_of(child):
            what = "a link to a missing file" if child.is_symlink() else _special(child)
            notes.append(f"{child.relative_to(path)}: {what} (not read)")
    if not found.files:
        raise _no_logs(path)
    return RunFiles(_sorted(found.files), _sorted(found.ignored), _sorted(found.sidecars), notes)


def _special(path: Path) -> str:
    """What a path that exists but is neither a regular file nor a directory is."""
    mode = path.stat().st_mode
    for test, name in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _sorted(paths: list[Location]) -> list[Location]:
    return sorted(paths, key=lambda p: p.parts if isinstance(p, Path) else (p.url,))


def _sort_out(children: list[Location], notes: list[str] | None = None) -> RunFiles:
    """Which of a run's files are logs, which are sidecars, which are neither (ignored)."""
    files: list[Location] = []
    ignored: list[Location] = []
    sidecars: list[Location] = []
    for child in children:
        if _module_of(child, sniff=True):
            files.append(child)
        else:
            (sidecars if is_sidecar(child) else ignored).append(child)
    return RunFiles(files, ignored, sidecars, notes if notes is not None else [])


def _no_logs(path: Location) -> InputError:
    known = ", ".join([*(f"*{s}" for s in sorted(FORMATS)), "*.npy", "*.npz"])
    frameworks = "router_trace_rank*.jsonl, expert_distribution_recorder_*.pt, rank*.safetensors"
    return InputError(f"{path}: no routing logs found (looked for {known}, {frameworks})")


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


def is_shard(path: str | Path) -> bool:
    """Whether a file (a path or an object's URL) is one rank's shard of a step, by its name:
    ``rankN`` (``step_000200.rank3.parquet``, Megatron's ``router_trace_rank3.jsonl``).
    Shards of one step may repeat token positions (each rank numbers its own batch), so they
    are never taken for merged runs. Rows with a ``rank`` column need no such exception:
    their token positions are already told apart by rank (``table.RANK_STRIDE``)."""
    return bool(_RANK_NAME.search(str(path).rsplit("/", 1)[-1]))


def _discover_remote(prefix: Remote, *, missing_ok: bool = False) -> RunFiles:
    from routelog import storage

    objects = storage.discover(prefix, missing_ok=missing_ok)
    if len(objects) == 1 and objects[0].url == prefix.url:
        if format_of(prefix) is None:
            _scanner(prefix)  # raises the unknown-type error
        return RunFiles(list(objects), [])
    visible = [
        child
        for child in objects
        if not any(part.startswith(".") for part in storage.relative_parts(prefix, child))
    ]
    found = _sort_out(list(visible))
    if not found.files and not missing_ok:
        raise _no_logs(prefix)
    return found


def scan(path: Location, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read one file into canonical batches, whatever its format.

    An operating-system error (the file vanished or is unreadable) is an ``InputError`` too.
    """
    if isinstance(path, Remote):
        yield from _bounded(_scan_remote(path, options, info), path, info)
        return
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty")
        yield from _bounded(_scanner(path)(path, options, info), path, info)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _bounded(batches: Iterator[Batch], path: Location, info: FileInfo) -> Iterator[Batch]:
    """Claim, before the kernels allocate them, the per-expert counters of each top-k batch
    (one row of E counts per group from k ids per token); readers that build dense counts
    themselves claim them before they allocate."""
    for batch in batches:
        if batch.kind == "topk" and batch.frame.height:
            groups = _group_count(batch.frame)
            values = batch.frame.height * (batch.top_k or 1)
            info.dense.claim(path, groups, batch.n_experts, values, "selected expert ids")
        yield batch


def _group_count(frame: pl.DataFrame) -> int:
    """How many (step, layer[, dataset]) groups a canonical frame holds (sorted in numpy)."""
    import numpy as np
    import polars as pl

    columns = [frame["step"].to_numpy(), frame["layer"].to_numpy()]
    if "dataset" in frame.columns:
        columns.append(frame["dataset"].fill_null("").cast(pl.Categorical).to_physical().to_numpy())
    order = np.lexsort(columns)
    changes = np.zeros(len(order) - 1, dtype=bool)
    for column in columns:
        ordered = column[order]
        changes |= ordered[1:] != ordered[:-1]
    return int(changes.sum()) + 1


def _scan_remote(remote: Remote, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read one object: Parquet by ranged reads, JSONL as a stream, anything else (``.pt``,
    framework layouts) spilled to a temporary directory with the sidecars and config.json
    its reader needs (:func:`companions`). Each reader names the file by a stand-in path
    with the object's name; its errors are rewritten to name the URL. Every read is of one
    version of the object (:class:`routelog.storage.Pinned`)."""
    from routelog import storage
    from routelog.executor import relocated

    if remote.size == 0:
        raise InputError(f"{remote}: file is empty")
    found = _module_of(remote)
    standin, shown = str(Path(remote.url)), remote.url
    try:
        if found is not None and found[1] == "parquet":
            from routelog.ingest import parquet

            with storage.open_random(remote) as handle:
                pinned = storage.Pinned(remote, handle)
                yield from parquet.scan(Path(remote.url), options, info, source=handle)
            pinned.verify(always=True)
        elif found is not None and found[1] == "jsonl":
            from routelog.ingest import jsonl

            with storage.open_stream(remote) as stream:
                pinned = storage.Pinned(remote, stream)
                yield from jsonl.scan(Path(remote.url), options, info, stream=pinned)  # type: ignore[arg-type]
            pinned.verify()
        else:
            with tempfile.TemporaryDirectory(prefix="routelog-") as directory:
                local = _mirror(remote, Path(directory))
                standin, shown = f"{directory}/", f"{remote.scheme}://"
                yield from _scanner(remote)(local, options, info)
    except RoutelogError as error:
        raise relocated(error, standin, shown) from None
    except OSError as exc:
        raise storage.failure(remote, exc) from exc


PLACE_IN_DIRECTORY = frozenset({"sglang"})
"""Layouts whose step is a file's place among its directory's dumps (SGLang stat dumps):
a spilled dump is given its siblings' names (empty files) so that its place is the same."""


def companions(remote: Remote) -> list[Remote]:
    """The objects a framework reader of ``remote`` reads besides it, as it would beside a
    local file: the sidecars its module names (Megatron ``logits_rankN.bin`` and
    ``router_state_rankN.pt``, TensorRT-LLM ``meta_info.json``) when present, and the
    model's ``config.json`` at the object's prefix or a prefix above it. Memoized per
    listed object; the cache keys a remote framework file by these too."""
    from routelog import storage
    from routelog.modelconfig import CONFIG_NAME

    if "companions" in remote._memo:
        known: list[Remote] = remote._memo["companions"]
        return known
    found = _module_of(remote)
    result: list[Remote] = []
    if found is not None and any(found[1] == module for _, _, module, _ in LAYOUTS):
        siblings = storage.siblings(remote)
        remote._memo["siblings"] = siblings
        wanted = set(_sidecar_names(found[1], remote.name))
        result = [s for s in siblings if s.name in wanted]
        parent = Remote(remote.url.rsplit("/", 1)[0])
        config = storage.find_upward(parent, (CONFIG_NAME,))
        if config is not None:
            result.append(config)
    remote._memo["companions"] = result
    return result


def _sidecar_names(module: str, name: str) -> list[str]:
    """The sidecar files (by name) the reader ``module`` reads beside the log ``name``."""
    if module == "megatron_trace":
        from routelog.ingest.megatron_trace import logits_path, router_state_path

        return [logits_path(Path(name)).name, router_state_path(Path(name)).name]
    if module == "trtllm":
        from routelog.ingest.trtllm import META_NAME

        return [META_NAME]
    return []


def _mirror(remote: Remote, directory: Path) -> Path:
    """``remote`` spilled into ``directory`` at its key (``directory/BUCKET/KEY``) with its
    :func:`companions` at theirs (its sidecars beside it, the config.json at the prefix it
    was found at, so that the reader's upward search finds it as in the bucket) and, for
    ``PLACE_IN_DIRECTORY`` layouts, empty files named like its siblings. A ``.git`` marker at
    the bucket's level stops the reader's upward config.json search there, so a stray file
    above the temporary directory never describes the run. A path under ``directory`` is
    shown as the object's URL: ``directory/`` stands for ``SCHEME://``."""
    from routelog import storage
    from routelog.modelconfig import CONFIG_NAME, MAX_CONFIG_BYTES

    def place(key: str) -> Path:
        folder = directory / key.rsplit("/", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    bucket = directory / remote.key.split("/", 1)[0]
    bucket.mkdir()
    (bucket / ".git").touch()
    for companion in companions(remote):
        if companion.name == CONFIG_NAME:
            data = storage.read_small(companion, MAX_CONFIG_BYTES)
            (place(companion.key) / CONFIG_NAME).write_bytes(data)
        else:
            storage.spill_into(companion, place(companion.key))
    here = place(remote.key)
    found = _module_of(remote)
    if found is not None and found[1] in PLACE_IN_DIRECTORY:
        for sibling in remote._memo.get("siblings", []):
            if sibling.name != remote.name and _module_of(sibling) == found:
                (here / sibling.name).touch()
    return storage.spill_into(remote, here)
