"""The Python API: read runs, reduce them to statistics, finish metrics.

>>> import routelog
>>> result = routelog.analyze(["sample_logs/healthy"], top_k=2)   # doctest: +SKIP
>>> result.metrics.columns[:4]                                     # doctest: +SKIP
['run', 'step', 'layer', 'n_tokens']
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from routelog import ingest, kernels, tokens
from routelog.config import Config
from routelog.errors import InputError, RoutelogError, UsageError
from routelog.executor import Done, Executor, Threads, relocated
from routelog.findings import Finding
from routelog.options import Options, StepRange, parse_layers, parse_steps
from routelog.storage import Location, Remote, is_url, locate

if TYPE_CHECKING:
    import polars as pl

    from routelog.cache import Cache

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[Location, int, int], None]
"""Called after each file is read: ``(path, files done, files in the run)``."""

PREFETCH = 2
"""Chunks decoded ahead of the one being reduced: overlaps I/O and decoding with the kernels
while holding at most PREFETCH + 2 chunks of a file in memory."""


@dataclass(frozen=True)
class RunSpec:
    """A run named on the command line: ``PATH`` or ``NAME=PATH`` (a path or a URL:
    ``s3://``, ``gs://``, ``file://``)."""

    name: str
    path: Location

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        """``NAME=PATH`` names a run; a bare path is named by its base name."""
        if "=" in text and not is_url(text) and not Path(text).exists():
            name, _, location = text.partition("=")
            if not name or not location:
                raise UsageError(f"cannot read run {text!r}: expected PATH or NAME=PATH")
            return cls(name, locate(location))
        path = locate(text)
        if isinstance(path, Remote):
            return cls(path.name, path)
        return cls(path.resolve().name or str(path), path)


@dataclass
class FileResult:
    """One file reduced: its description, statistics and per-token selections."""

    info: ingest.FileInfo
    stats: pl.DataFrame
    selections: pl.DataFrame | None
    top_k_assumed: bool = False


@dataclass
class Run:
    """One run read and reduced."""

    name: str
    path: str
    files: list[ingest.FileInfo]
    ignored_files: list[str]
    stats: pl.DataFrame
    selections: pl.DataFrame | None
    top_k_assumed: bool = False
    """k came from the configured default: neither --top-k nor the data stated it."""

    def summary(self) -> dict[str, Any]:
        """The run's entry in the JSON ``runs`` list."""
        top_k = sorted(set(self.stats["top_k"].drop_nulls().to_list()))
        warnings = [f"{Path(f.path).name}: {w}" for f in self.files for w in f.warnings]
        return {
            "run": self.name,
            "path": self.path,
            "files": len(self.files),
            "rows": sum(f.rows for f in self.files),
            "masked_rows": sum(f.masked_rows for f in self.files),
            "skipped_rows": sum(f.skipped_rows for f in self.files),
            "top_k": top_k[0] if len(top_k) == 1 else top_k,
            "payloads": sorted({f.payload for f in self.files if f.payload}),
            "top_k_assumed": self.top_k_assumed,
            "ignored_files": self.ignored_files,
            "warnings": warnings,
        }


@dataclass
class Analysis:
    """What ``analyze`` returns: runs, metrics per run x step x layer, and findings."""

    runs: list[Run]
    metrics: pl.DataFrame
    options: Options
    findings: list[Finding] = field(default_factory=list)
    config: Config = field(default_factory=Config)


def default_jobs() -> int:
    """The number of cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # pragma: no cover (macOS, Windows)


def read_file(path: Location, options: Options, *, prefetch: int = PREFETCH) -> FileResult:
    """Read and reduce one log file: the unit that is cached and run in parallel.

    The file streams chunk by chunk: each chunk is reduced to statistics as soon as it is
    decoded, while the next one is decoded in a background thread (``prefetch`` chunks ahead;
    0 reads and reduces in the calling thread). No frame of the whole file is ever built.
    """
    import polars as pl

    info = ingest.FileInfo(path=str(path), format=ingest.format_of(path) or "?")
    parts: list[pl.DataFrame] = []
    selections: list[pl.DataFrame] = []
    assumed = False
    with _prefetched(ingest.scan(path, options, info), prefetch) as batches:
        for batch in batches:
            assumed = assumed or (
                batch.kind == "probs" and options.top_k is None and not batch.top_k
            )
            reduced = _reduce(batch, options)
            parts.append(reduced.stats)
            if reduced.selections is not None:
                selections.append(reduced.selections)
    stats = kernels.merge(parts)
    _check_experts(stats, {}, str(path))
    _describe(
        info,
        steps=set(stats["step"].to_list()),
        layers=set(stats["layer"].to_list()),
        widths=set(stats["n_experts"].to_list()),
        ks=set(stats["top_k"].drop_nulls().to_list()),
    )
    return FileResult(info, stats, pl.concat(selections) if selections else None, assumed)


_DONE = object()


@contextmanager
def _prefetched(items: Iterator[T], depth: int) -> Iterator[Iterator[T]]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead.

    numpy, pyarrow and polars release the GIL while they work, so producing the next item
    overlaps consuming this one. An exception of the producer is raised in the consumer; when
    the consumer stops early, the producer stops at its next item.
    """
    if depth < 1:
        yield items
        return
    handoff: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((_DONE, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[T]:
        while True:
            item, error = handoff.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item  # type: ignore[misc]

    producer = threading.Thread(target=produce, name="routelog-read", daemon=True)
    producer.start()
    try:
        yield consume()
    finally:
        stop.set()
        producer.join()


def _read_through(
    path: Location, options: Options, cache: Cache | None, prefetch: int
) -> FileResult:
    """``read_file``, answered from the cache when it holds this file unchanged."""
    if cache is None:
        return read_file(path, options, prefetch=prefetch)
    from routelog.cache import Entry

    entry = cache.load(path, options)
    if entry is not None:
        return FileResult(entry.info, entry.stats, entry.selections, entry.top_k_assumed)
    result = read_file(path, options, prefetch=prefetch)
    cache.store(
        path,
        options,
        Entry(result.info, result.stats, result.selections, result.top_k_assumed),
    )
    return result


def _read_here(
    files: list[Location], options: Options, cache: Cache | None, runner: Executor, report: Done
) -> list[FileResult]:
    """Read files on this machine's threads, each answered by the cache when it can be."""
    prefetch = PREFETCH if runner.workers > 1 else 0
    # Files the cache cannot answer go first, so that reading them overlaps loading the
    # others instead of waiting behind them (the stable sort keeps the first bad file first).
    order = sorted(
        range(len(files)), key=lambda i: cache is not None and cache.holds(files[i], options)
    )
    done = runner.map(
        lambda i: _read_through(files[i], options, cache, prefetch),
        order,
        lambda position, finished: report(order[position], finished),
    )
    return [result for _, result in sorted(zip(order, done, strict=True), key=lambda x: x[0])]


def _read_remotely(
    files: list[Location], options: Options, cache: Cache | None, runner: Executor, report: Done
) -> list[FileResult]:
    """Read files on a cluster's workers; the cache, which is this machine's, is consulted
    and filled here, so only the files it cannot answer travel."""
    from routelog.cache import Entry

    results: dict[int, FileResult] = {}
    for index, path in enumerate(files):
        entry = cache.load(path, options) if cache is not None else None
        if entry is not None:
            results[index] = FileResult(
                entry.info, entry.stats, entry.selections, entry.top_k_assumed
            )
            report(index, len(results))
    misses = [i for i in range(len(files)) if i not in results]
    answered = len(results)
    work = partial(_read_on_worker, options=options)
    jobs = [(_absolute(files[i]), str(files[i])) for i in misses]
    computed = runner.map(
        work, jobs, lambda position, finished: report(misses[position], answered + finished)
    )
    for index, result in zip(misses, computed, strict=True):
        results[index] = result
        if cache is not None:
            cache.store(
                files[index],
                options,
                Entry(result.info, result.stats, result.selections, result.top_k_assumed),
            )
    return [results[i] for i in range(len(files))]


def _absolute(location: Location) -> str | Remote:
    """How a worker finds a file: a local one by absolute path, an object by its URL."""
    return location if isinstance(location, Remote) else str(location.resolve())


def _read_on_worker(job: tuple[str | Remote, str], options: Options) -> FileResult:
    """``read_file`` in a worker process: by absolute path (a worker has its own working
    directory), reporting the file as the user named it, in its result and in its errors."""
    absolute, shown = job
    try:
        result = read_file(absolute if isinstance(absolute, Remote) else Path(absolute), options)
    except RoutelogError as error:
        raise relocated(error, str(absolute), shown) from None
    result.info.path = shown
    return result


def _reduce(batch: ingest.Batch, options: Options) -> kernels.Reduced:
    if batch.kind == "probs":
        return kernels.reduce_probs(batch.frame, options.k_for(batch.top_k))
    if batch.kind == "topk":
        return kernels.reduce_topk(batch.frame, batch.n_experts)
    return kernels.reduce_counts(batch.frame, batch.top_k)


def _check_experts(stats: pl.DataFrame, seen: dict[int, tuple[int, str]], path: str) -> None:
    """All rows of one (run, layer) must have the same expert count E."""
    for layer, width in stats.select("layer", "n_experts").unique().iter_rows():
        if layer in seen and seen[layer][0] != width:
            first, where = seen[layer]
            raise InputError(
                f"{path}: layer {layer} has {width} experts, but {first} in {where} "
                "(all rows of a layer must have the same expert count)"
            )
        seen.setdefault(layer, (width, str(path)))


def load_run(
    spec: RunSpec,
    options: Options,
    progress: Progress | None = None,
    *,
    jobs: int | None = None,
    cache: Cache | None = None,
    executor: Executor | None = None,
    accept: Callable[[Location], bool] | None = None,
) -> Run:
    """Read every log file of a run and merge their statistics.

    ``progress`` (optional) is called after each file, for a progress bar in the CLI.
    ``jobs`` files are read at once (default: one per core; 1 reads serially, without a
    background decoding thread); ``cache`` answers for files it holds unchanged;
    ``executor`` (optional, see ``routelog.executor``) runs the reading elsewhere, e.g. on
    a Dask cluster, instead of ``jobs`` threads; ``accept`` (optional) keeps only the files
    it returns true for (``watch``: the complete ones).
    """
    import polars as pl

    found = ingest.discover(spec.path)
    runner = executor if executor is not None else Threads(default_jobs() if jobs is None else jobs)
    files = found.files if accept is None else [f for f in found.files if accept(f)]

    def report(index: int, finished: int) -> None:
        if progress is not None:
            progress(files[index], finished, len(files))

    if runner.remote:
        results = _read_remotely(files, options, cache, runner, report)
    else:
        results = _read_here(files, options, cache, runner, report)
    seen: dict[int, tuple[int, str]] = {}
    for result in results:
        _check_experts(result.stats, seen, result.info.path)
    stats = kernels.merge([r.stats for r in results])
    if stats.height == 0:
        raise InputError(f"{spec.path}: no routed tokens{_selection_hint(options)}")
    stats = stats.with_columns(pl.lit(spec.name).alias("run")).select("run", *stats.columns)
    selections = [r.selections for r in results if r.selections is not None]
    return Run(
        name=spec.name,
        path=str(spec.path),
        files=[r.info for r in results],
        ignored_files=[str(p) for p in found.ignored],
        stats=stats,
        selections=(
            pl.concat(selections).with_columns(pl.lit(spec.name).alias("run"))
            if selections
            else None
        ),
        top_k_assumed=any(r.top_k_assumed for r in results),
    )


def _selection_hint(options: Options) -> str:
    if options.layers is None and options.steps is None:
        return ""
    return " in the selected --layers/--steps"


def load_runs(
    paths: Sequence[str | Path | RunSpec],
    options: Options,
    progress: Progress | None = None,
    *,
    jobs: int | None = None,
    cache: Cache | None = None,
    executor: Executor | None = None,
    accept: Callable[[Location], bool] | None = None,
) -> list[Run]:
    """Read several runs; their names must be unique (``jobs``, ``cache``, ``executor``,
    ``accept``: see
    ``load_run``)."""
    specs = [p if isinstance(p, RunSpec) else RunSpec.parse(str(p)) for p in paths]
    if not specs:
        raise UsageError("no run given")
    names = [s.name for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise UsageError(f"two runs are named {duplicate!r}: name them with NAME=PATH")
    return [
        load_run(spec, options, progress, jobs=jobs, cache=cache, executor=executor, accept=accept)
        for spec in specs
    ]


def metrics_of(runs: Iterable[Run], options: Options) -> pl.DataFrame:
    """Metrics per run x step x layer, summed over datasets, with token-level metrics."""
    import polars as pl

    runs = list(runs)
    stats = [r.stats.with_columns(pl.lit(None, pl.String).alias("dataset")) for r in runs]
    merged = kernels.merge(stats)
    metrics = kernels.finish(merged, options.dead_fraction).drop("dataset")
    return _with_token_metrics(metrics, runs)


def metrics_by_dataset(runs: Iterable[Run], options: Options) -> pl.DataFrame:
    """Metrics per run x step x layer x dataset (null ``dataset``: rows that name none)."""
    return kernels.finish(kernels.merge([r.stats for r in runs]), options.dead_fraction)


def _with_token_metrics(metrics: pl.DataFrame, runs: list[Run]) -> pl.DataFrame:
    """Join ``flip_rate`` and ``saturation`` (null where the same tokens are not known)."""
    import polars as pl

    empty = pl.DataFrame(schema={"run": pl.String(), **tokens.TOKEN_METRICS_SCHEMA})
    parts = [
        tokens.token_metrics(r.selections).select(pl.lit(r.name).alias("run"), pl.all())
        for r in runs
        if r.selections is not None
    ]
    found = pl.concat(parts) if parts else empty
    joined = metrics.join(found, on=["run", "step", "layer"], how="left", maintain_order="left")
    return joined.select(*[c for c in joined.columns if c != "load_share"], "load_share")


def inspect_file(path: Location, options: Options) -> ingest.FileInfo:
    """What one file holds, from the batches ingestion makes of it (no metrics computed).

    It reads the file exactly as analysis does, so detection cannot disagree with it; only
    the batches' shapes and keys are looked at.
    """
    info = ingest.FileInfo(path=str(path), format=ingest.format_of(path) or "?")
    steps: set[int] = set()
    layers: set[int] = set()
    widths: set[int] = set()
    ks: set[int] = set()
    for batch in ingest.scan(path, options, info):
        steps.update(batch.frame["step"].unique().to_list())
        layers.update(batch.frame["layer"].unique().to_list())
        widths.add(batch.n_experts)
        if batch.top_k is not None:
            ks.add(batch.top_k)
    _describe(info, steps=steps, layers=layers, widths=widths, ks=ks)
    return info


def _describe(
    info: ingest.FileInfo, *, steps: set[int], layers: set[int], widths: set[int], ks: set[int]
) -> None:
    """Fill a file's steps, layers, E and k (E and k only when a single value holds)."""
    info.steps, info.layers = sorted(steps), sorted(layers)
    if len(widths) > 1:
        info.warn(f"layers differ in expert count: E = {', '.join(map(str, sorted(widths)))}")
    info.n_experts = next(iter(widths)) if len(widths) == 1 else None
    info.top_k = next(iter(ks)) if len(ks) == 1 else None


def inspect(
    paths: Sequence[str | Path], *, options: Options | None = None
) -> list[ingest.FileInfo]:
    """Describe every log file under ``paths`` (files or run directories), in order."""
    if not paths:
        raise UsageError("no path given")
    opts = options if options is not None else make_options()
    files = [f for p in paths for f in ingest.discover(locate(str(p))).files]
    return [inspect_file(path, opts) for path in files]


def make_options(
    *,
    top_k: int | None = None,
    layers: str | Iterable[int] | None = None,
    steps: str | tuple[int | None, int | None] | None = None,
    skip_bad_rows: bool = False,
    temperature: float | None = None,
    score: str = "softmax",
    dead_fraction: float = 0.1,
    num_experts: int | None = None,
    default_top_k: int = 1,
) -> Options:
    """Build ``Options`` from plain Python values (strings as on the command line)."""
    if score not in ("softmax", "sigmoid"):
        raise UsageError(f"--score must be softmax or sigmoid, not {score!r}")
    layer_set = (
        parse_layers(layers) if isinstance(layers, str) or layers is None else frozenset(layers)
    )
    step_range = (
        parse_steps(steps) if isinstance(steps, str) or steps is None else StepRange(*steps)
    )
    return Options(
        top_k=top_k,
        default_top_k=default_top_k,
        layers=layer_set,
        steps=step_range,
        skip_bad_rows=skip_bad_rows,
        temperature=temperature,
        score=score,  # type: ignore[arg-type]
        dead_fraction=dead_fraction,
        num_experts=num_experts,
    )


def analyze(
    paths: Sequence[str | Path | RunSpec],
    *,
    options: Options | None = None,
    config: Config | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    cache: Cache | None = None,
    executor: Executor | None = None,
    accept: Callable[[Location], bool] | None = None,
    **option_values: Any,
) -> Analysis:
    """Analyze runs: each path is a run (file or directory, ``NAME=PATH`` allowed).

    Keyword arguments are those of :func:`make_options` (``top_k``, ``layers="0,3-5"``,
    ``steps="100:500"``, ``skip_bad_rows``, ``temperature``, ``score``, ``dead_fraction``).
    ``config`` holds the diagnosis thresholds and enabled rules (default: built-in values;
    :func:`routelog.config.load_config` reads them from a file). ``jobs``: files read at once
    (default one per core); ``cache``: a ``routelog.cache.Cache`` (default none, so the
    Python API writes nothing); ``executor``: where files are read (default: ``jobs``
    threads; ``routelog.executor.open_executor("local:4", 1)`` gives a Dask cluster);
    ``accept``: keep only the files it returns true for.
    """
    from routelog.diagnose import diagnose

    config = config if config is not None else Config()
    opts = options if options is not None else make_options(**option_values)
    runs = load_runs(
        paths, opts, progress, jobs=jobs, cache=cache, executor=executor, accept=accept
    )
    metrics = metrics_of(runs, opts)
    return Analysis(
        runs=runs,
        metrics=metrics,
        options=opts,
        findings=diagnose(metrics, config),
        config=config,
    )
