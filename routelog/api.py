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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from routelog import ingest, kernels, tokens
from routelog.config import Config
from routelog.errors import InputError, RoutelogError, UsageError
from routelog.executor import Done, Executor, Threads, relocated
from routelog.findings import Finding, sort_findings
from routelog.options import LayerSet, Options, StepRange, TopKSource, parse_layers, parse_steps
from routelog.storage import Location, Remote, is_url, locate

if TYPE_CHECKING:
    import polars as pl

    from routelog.cache import Cache
    from routelog.check import CheckResult
    from routelog.compare import Comparison
    from routelog.experts import LayerHistory
    from routelog.modelconfig import ModelConfig

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

    def __post_init__(self) -> None:
        # A name that is not UTF-8 (bytes of a file name or an argument, surrogates in
        # Python) cannot be stored in a frame or written out: its bytes are named, \xff.
        try:
            name = os.fsencode(self.name).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            name = self.name.encode("utf-8", "backslashreplace").decode("utf-8")
        object.__setattr__(self, "name", name)

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
    """Each token's top-k expert ids, where tokens have positions (else None): ``step``,
    ``layer``, ``dataset``, ``token``, ``topk`` (``kernels.Reduced``)."""
    top_k_assumed: bool = False
    _ranges: pl.DataFrame | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def token_ranges(self) -> pl.DataFrame | None:
        """:func:`routelog.tokens.token_ranges` of the selections (None without), computed
        once: on a Dask worker before the result travels, so the client only reads them."""
        if self._ranges is None and self.selections is not None:
            self._ranges = tokens.token_ranges(self.selections)
        return self._ranges

    def __getstate__(self) -> dict[str, Any]:
        # a Dask worker's result: the selections travel packed (a fifth of the bytes), with
        # their token ranges, computed here where the file was read (the client's check for
        # merged runs needs nothing else of them)
        state = {**self.__dict__, "_ranges": self.token_ranges}
        if self.selections is not None:
            state["selections"] = kernels.pack_selections(self.selections)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["selections"] is not None:
            state["selections"] = kernels.unpack_selections(state["selections"])
        self.__dict__.update(state)


@dataclass(repr=False)
class Run:
    """One run read and reduced."""

    name: str
    path: str
    files: list[ingest.FileInfo]
    ignored_files: list[str]
    stats: pl.DataFrame
    selections: pl.DataFrame | None
    """Each token's top-k expert ids, where tokens have positions (else None): ``step``,
    ``layer``, ``dataset``, ``token``, ``topk`` (``kernels.Reduced``). The run's name is not
    repeated on every token (16 of 44 bytes a token at k=2): it is :attr:`name`."""
    top_k_assumed: bool = False
    """Nothing stated k (no --top-k, data, run or model config, configuration): k=1 is used."""
    top_k_source: TopKSource = "data"
    """Where k came from (:data:`routelog.options.TopKSource`)."""
    top_k_file: str | None = None
    """The file k came from, for ``run_config``, ``model_config`` and ``config``."""
    warnings: list[str] = field(default_factory=list)
    """Run-level warnings (several runs merged into one, ...)."""
    merged: dict[str, Any] | None = None
    """Files of this run that log the same tokens of the same step and layer (several runs
    read as one): ``files``, ``step``, ``layer``, ``tokens``, ``pairs``, ``of``, ``layers``."""
    sidecar_files: list[str] = field(default_factory=list)
    """Files a framework wrote beside its logs (logits, meta_info.json, config.json, ...)."""
    notes: list[str] = field(default_factory=list)
    """Paths of the run directory named like logs but not read, and why."""

    def __repr__(self) -> str:
        steps = self.stats["step"]
        span = (
            f"steps {int(steps.min())}–{int(steps.max())}"  # type: ignore[arg-type]
            if self.stats.height
            else "no steps"
        )
        return (
            f"<Run {self.name!r}: {_plural(len(self.files), 'file')}, {span}, "
            f"{_plural(self.stats['layer'].n_unique(), 'layer')}>"
        )

    def summary(self) -> dict[str, Any]:
        """The run's entry in the JSON ``runs`` list."""
        top_k = sorted(set(self.stats["top_k"].drop_nulls().to_list()))
        warnings = [f"{Path(f.path).name}: {w}" for f in self.files for w in f.warnings]
        warnings += self.notes
        return {
            "run": self.name,
            "path": self.path,
            "files": len(self.files),
            "rows": sum(f.rows for f in self.files),
            "masked_rows": sum(f.masked_rows for f in self.files),
            "skipped_rows": sum(f.skipped_rows for f in self.files),
            # one k; the sorted ks when files differ; null when no file has one (counts)
            "top_k": top_k[0] if len(top_k) == 1 else (top_k or None),
            "payloads": sorted({f.payload for f in self.files if f.payload}),
            "top_k_assumed": self.top_k_assumed,
            "top_k_source": self.top_k_source,
            "top_k_file": self.top_k_file,
            "ignored_files": self.ignored_files,
            "sidecar_files": self.sidecar_files,
            "warnings": [*self.warnings, *warnings],
            "merged_runs": self.merged,
        }


@dataclass(repr=False)
class Analysis:
    """What ``analyze`` returns: runs, metrics per run x step x layer, and findings.

    ``metrics`` is a Polars frame; ``findings`` a list of :class:`~routelog.findings.Finding`,
    also as a frame from :meth:`findings_frame`; :meth:`report` renders the terminal report.
    """

    runs: list[Run]
    metrics: pl.DataFrame
    options: Options
    findings: list[Finding] = field(default_factory=list)
    config: Config = field(default_factory=Config)
    notes: list[str] = field(default_factory=list)
    """What the diagnosis could not judge, and why (rules skipped for a --steps window)."""
    _histories: list[LayerHistory] | None = field(default=None, repr=False)

    def expert_histories(self) -> list[LayerHistory]:
        """Each run's layers over steps, per expert (computed on first use)."""
        if self._histories is None:
            from routelog.experts import histories

            self._histories = histories(self.metrics, self.options.dead_fraction)
        return self._histories

    def __repr__(self) -> str:
        from routelog.render.report import headline  # the counts the report's headline gives

        names = ", ".join(repr(r.name) for r in self.runs)
        return (
            f"<Analysis of {_plural(len(self.runs), 'run')} {names}: "
            f"{_plural(self.metrics.height, 'metrics row')}, "
            f"findings {headline(self.findings)}>"
        )

    def findings_frame(self) -> pl.DataFrame:
        """The findings as a Polars frame, one row per finding, in report order.

        Columns are the fields of :class:`~routelog.findings.Finding` (``code``, ``severity``,
        ``run``, ``layer``, ``first_step``, ``last_step``, ``active``, ``metric``, ``value``,
        ``threshold``, ``message``, ...), with the same types when there is no finding.
        """
        import polars as pl

        schema = _finding_schema()
        rows = [f.to_dict() for f in sort_findings(self.findings)]
        if not rows:
            return pl.DataFrame(schema=schema)
        return pl.DataFrame(rows, schema_overrides=schema, infer_schema_length=None)

    def report(
        self, *, width: int = 100, color: bool = False, plot: bool = False, values: bool = False
    ) -> str:
        """The terminal report of ``routelog analyze`` as a string (ANSI colours if ``color``).

        ``plot`` adds the entropy charts, ``values`` prints load shares in the heatmap.
        """
        from routelog.render.report import report_text

        return report_text(self, width=width, color=color, plot=plot, values=values)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _finding_schema() -> dict[str, pl.DataType]:
    """Polars types of the Finding fields (those whose annotation is a plain scalar)."""
    import dataclasses

    import polars as pl

    types: dict[str, pl.DataType] = {
        "str": pl.String(),
        "Severity": pl.String(),
        "bool": pl.Boolean(),
        "int | None": pl.Int64(),
        "int": pl.Int64(),
        "float | None": pl.Float64(),
        "float": pl.Float64(),
    }
    return {f.name: types[str(f.type)] for f in dataclasses.fields(Finding) if str(f.type) in types}


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
    info = ingest.FileInfo(path=str(path), format=ingest.format_of(path) or "?")
    parts: list[pl.DataFrame] = []
    selections: list[pl.DataFrame] = []
    assumed = False
    with _prefetched(ingest.scan(path, options, info), prefetch) as batches:
        for batch in batches:
            if batch.frame.height == 0:  # every row of the chunk skipped (--skip-bad-rows)
                continue
            assumed = assumed or (
                batch.kind == "probs" and options.top_k is None and not batch.top_k
            )
            reduced = _reduce(batch, options, path)
            parts.append(reduced.stats)
            if reduced.selections is not None:
                selections.append(reduced.selections)
    stats = kernels.merge(parts)
    _check_experts([(stats, str(path))])
    _describe(
        info,
        steps=set(stats["step"].to_list()),
        layers=set(stats["layer"].to_list()),
        widths=set(stats["n_experts"].to_list()),
        ks=set(stats["top_k"].drop_nulls().to_list()),
    )
    return FileResult(
        info, stats, kernels.concat_selections(selections) if selections else None, assumed
    )


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
    directory), reporting the file as the user named it, in its result and in its errors.
    No background decoding thread: Dask gives each task one of the worker's threads."""
    absolute, shown = job
    try:
        result = read_file(
            absolute if isinstance(absolute, Remote) else Path(absolute), options, prefetch=0
        )
    except RoutelogError as error:
        raise relocated(error, str(absolute), shown) from None
    result.info.path = shown
    return result


def _check_num_experts(batch: ingest.Batch, options: Options, path: Location | str) -> None:
    """Refuse a --num-experts the data contradicts (it is not silently ignored)."""
    if options.num_experts is not None and batch.n_experts != options.num_experts:
        raise UsageError(
            f"--num-experts {options.num_experts} disagrees with the data: layer "
            f"{batch.frame['layer'][0]} in {path} has E={batch.n_experts}"
        )


def _reduce(batch: ingest.Batch, options: Options, path: Location) -> kernels.Reduced:
    _check_num_experts(batch, options, path)
    if batch.kind == "probs":
        _check_k(options, batch.top_k, batch.n_experts, batch.frame["layer"][0], path)
        return kernels.reduce_probs(batch.frame, options.k_for(batch.top_k))
    if batch.kind == "topk":
        return kernels.reduce_topk(batch.frame, batch.n_experts)
    if batch.top_k is not None:
        _check_k(options, batch.top_k, batch.n_experts, batch.frame["layer"][0], path)
    return kernels.reduce_counts(batch.frame, batch.top_k)


def _check_k(
    options: Options, stated: int | None, n_experts: int, layer: int, path: object
) -> None:
    """Refuse a k larger than the layer's E: the option's or configuration's (a usage
    error), or the one the file states (the file's error)."""
    if options.k_for(stated) <= n_experts:
        return
    if options.top_k is None and stated is not None:
        raise InputError(
            f"{path}: the file states top_k={stated}, more than E={n_experts}, the experts of "
            f"layer {layer}: a token cannot be routed to more experts than the layer has"
        )
    raise UsageError(
        f"{_k_origin(options)} is larger than E={n_experts}, the experts of layer {layer} "
        f"in {path}: a token cannot be routed to more experts than the layer has"
    )


def _k_origin(options: Options) -> str:
    """How the k in use was given, for messages: ``--top-k 9``, ``top_k = 9 in FILE``."""
    if options.top_k is not None:
        return f"--top-k {options.top_k}"
    if options.default_top_k_file is not None:
        key = "num_experts_per_tok" if options.default_top_k_source == "model_config" else "top_k"
        return f"k={options.default_top_k} ({key} in {options.default_top_k_file})"
    return f"k={options.default_top_k}"


def run_options(path: Location, options: Options) -> tuple[Options, ModelConfig | None]:
    """The options for the run at ``path``, with the k its own files state as the default.

    Precedence (highest first): ``--top-k``; the data's own k (per file, at reading); the
    run directory's ``routelog.toml``/``[tool.routelog]`` ``top_k``; a model ``config.json``
    in the run directory or above (:func:`routelog.modelconfig.find_model_config`); the
    configuration's ``top_k``; else 1, assumed. Also returns the model config, whose E the
    data must match. A run in object storage (a URL) is looked up the same way at its prefix
    and the prefixes above it (:func:`_remote_configs`).
    """
    from dataclasses import replace

    from routelog.config import run_config
    from routelog.modelconfig import find_model_config

    if isinstance(path, Remote):
        own, own_where, model = _remote_configs(path)
    else:
        model = find_model_config(path)
        own = run_config(path) if options.top_k is None else None
        own_where = str(own.path) if own is not None else ""
    if options.top_k is not None:
        return options, model
    if own is not None and "top_k" in own.sources:
        return replace(
            options,
            default_top_k=own.top_k,
            default_top_k_source="run_config",
            default_top_k_file=own_where,
        ), model
    if model is not None and model.top_k is not None:
        return replace(
            options,
            default_top_k=model.top_k,
            default_top_k_source="model_config",
            default_top_k_file=model.where,
        ), model
    return options, model


def _remote_configs(path: Remote) -> tuple[Config | None, str, ModelConfig | None]:
    """A bucket run's own configuration (``routelog.toml``, else a ``pyproject.toml`` with
    ``[tool.routelog]``, at its prefix), its URL, and the model's ``config.json`` (at the
    prefix or a prefix above it, up to the bucket), each copied to a temporary file and read
    as a local one would be; errors name the URL."""
    import tempfile
    from dataclasses import replace

    from routelog import storage
    from routelog.config import CONFIG_FILE, PYPROJECT, run_config
    from routelog.modelconfig import CONFIG_NAME, MAX_CONFIG_BYTES, read_model_config

    prefix = Remote(path.url.rsplit("/", 1)[0]) if ingest.format_of(path) else path
    own_file = storage.find_upward(prefix, (CONFIG_FILE, PYPROJECT), upward=False)
    model_file = storage.find_upward(prefix, (CONFIG_NAME,))
    own: Config | None = None
    model: ModelConfig | None = None
    with tempfile.TemporaryDirectory(prefix="routelog-") as directory:
        local = Path(directory)
        for remote in (own_file, model_file):
            if remote is None:
                continue
            copy = local / remote.name
            copy.write_bytes(storage.read_small(remote, MAX_CONFIG_BYTES))
            try:
                if remote is own_file:
                    own = run_config(local)
                else:
                    model = replace(read_model_config(copy), url=remote.url)
            except RoutelogError as error:
                raise relocated(error, str(copy), remote.url) from None
            copy.unlink()
    return own, own_file.url if own_file is not None else "", model


def _check_model_experts(stats: pl.DataFrame, model: ModelConfig | None, path: str) -> None:
    """The data's E must be the model config's E, when the config states one."""
    if model is None or model.num_experts is None:
        return
    for layer, width in stats.select("layer", "n_experts").unique().sort("layer").iter_rows():
        if width != model.num_experts:
            raise InputError(
                f"{path}: layer {layer} has E={width} experts, but {model.where} says "
                f"E={model.num_experts}: is that the model of this run?"
            )


_CHECKED = ("step", "layer", "n_experts", "top_k")


def _check_experts(parts: list[tuple[pl.DataFrame, str]]) -> None:
    """All rows of one (run, layer) must have the same expert count E, and all rows of one
    (step, layer) the same k (a layer may change its k between steps, not within one).
    ``parts`` are the statistics of the run's files, in order; the first file whose layer
    differs from what that layer had first is named, with that file."""
    import numpy as np
    import polars as pl

    if not parts:
        return
    columns = [pl.concat([s.get_column(name) for s, _ in parts]) for name in _CHECKED]
    file = np.repeat(np.arange(len(parts), dtype=np.int64), [s.height for s, _ in parts])
    rows = pl.DataFrame([*columns, pl.Series("file", file)])
    clash = kernels.first_difference(rows, "n_experts", ["layer"], "file")
    if clash is not None:
        (layer,), width, at, first, where = clash
        raise InputError(
            f"{parts[at][1]}: layer {layer} has {width} experts, but {first} in "
            f"{parts[where][1]} (all rows of a layer must have the same expert count)"
        )
    clash = kernels.first_difference(rows, "top_k", ["step", "layer"], "file")
    if clash is not None:
        (step, layer), k, at, first, where = clash
        raise InputError(
            f"{parts[at][1]}: layer {layer} selects {k} experts per token at step {step}, "
            f"but {first} in {parts[where][1]} (one step of a layer has one k)"
        )


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
    options, model = run_options(spec.path, options)
    runner = executor if executor is not None else Threads(default_jobs() if jobs is None else jobs)
    files = found.files if accept is None else [f for f in found.files if accept(f)]

    def report(index: int, finished: int) -> None:
        if progress is not None:
            progress(files[index], finished, len(files))

    if runner.remote:
        results = _read_remotely(files, options, cache, runner, report)
    else:
        results = _read_here(files, options, cache, runner, report)
    _check_experts([(r.stats, r.info.path) for r in results])
    for result in results:
        _check_model_experts(result.stats, model, result.info.path)
    stats = kernels.merge([r.stats for r in results])
    if stats.height == 0:
        raise InputError(f"{spec.path}: no routed tokens{_selection_hint(options)}")
    stats = stats.with_columns(pl.lit(spec.name).alias("run")).select("run", *stats.columns)
    selections = [r.selections for r in results if r.selections is not None]
    merged = _merged_runs(results, spec.path)
    return Run(
        name=spec.name,
        path=str(spec.path),
        files=[r.info for r in results],
        ignored_files=[str(p) for p in found.ignored],
        sidecar_files=[str(p) for p in found.sidecars],
        stats=stats,
        selections=kernels.concat_selections(selections) if selections else None,
        **_k_provenance(options, any(r.top_k_assumed for r in results)),
        merged=merged,
        warnings=[] if merged is None else [merged_message(merged)],
        notes=found.notes,
    )


def _merged_runs(results: list[FileResult], root: Location) -> dict[str, Any] | None:
    """Two files of the run logging the same tokens of the same (step, layer, dataset):
    several runs read as one. Shards named ``rankN`` (:func:`routelog.ingest.is_shard`) are
    left out; files without token positions cannot be told apart and are left out too.

    Vectorized: each file's token range per (step, layer, dataset) (``FileResult.token_ranges``,
    computed where the file was read), sorted by its first token; two ranges of a group
    overlap exactly when some range starts at or before the end of the one sorted just before
    it (the first overlapping pair is always adjacent).
    """
    import numpy as np
    import polars as pl

    keys = ["step", "layer", "dataset"]
    eligible = [
        (i, r)
        for i, r in enumerate(results)
        if r.selections is not None and not ingest.is_shard(r.info.path)
    ]
    if len(eligible) < 2:  # one file cannot overlap another: its ranges are not needed
        return None
    found = [(i, ranges) for i, r in eligible if (ranges := r.token_ranges) is not None]
    files = np.repeat(
        np.array([i for i, _ in found], dtype=np.int32), [ranges.height for _, ranges in found]
    )
    spans = (
        pl.concat([ranges for _, ranges in found])
        .with_columns(pl.Series("file", files))
        .sort([*keys, "lo"], nulls_last=True)
        .with_columns(
            pl.col("hi").shift(1).over(keys).alias("_prev_hi"),
            pl.col("file").shift(1).over(keys).alias("_prev_file"),
        )
    )
    overlapping = spans.filter(pl.col("lo") <= pl.col("_prev_hi"))
    if overlapping.height == 0:
        return None
    first = overlapping.sort("step", "layer").row(0, named=True)
    pairs = overlapping.select(keys).unique().height
    names = [_relative(results[first[f]].info.path, root) for f in ("_prev_file", "file")]
    return {
        "files": names,
        "step": first["step"],
        "layer": first["layer"],
        "tokens": [max(first["lo"], 0), min(first["hi"], first["_prev_hi"])],
        "pairs": pairs,
        "of": spans.select(keys).unique().height,
        "layers": sorted(overlapping["layer"].unique().to_list()),
    }


def _relative(path: str, root: Location) -> str:
    if isinstance(root, Remote):  # an object under the run's prefix: the rest of its URL
        prefix = f"{root.url}/"
        return path.removeprefix(prefix)
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def merged_message(merged: dict[str, Any]) -> str:
    """The warning for several runs merged into one (see :func:`_merged_runs`)."""
    first, second = merged["files"]
    lo, hi = merged["tokens"]
    return (
        f"several runs merged into one? {first} and {second} both log step {merged['step']} "
        f"layer {merged['layer']} for tokens {lo}–{hi}, and {merged['pairs']} of {merged['of']} "
        "(step, layer) pairs are logged twice: that is not sharding. Give each run its own "
        "argument (routelog analyze DIR/*); mark data-parallel shards with a rank column or "
        "rankN in their file names"
    )


def _k_provenance(options: Options, used_default: bool) -> dict[str, Any]:
    source = options.k_source(used_default)
    return {
        "top_k_assumed": source == "assumed",
        "top_k_source": source,
        "top_k_file": (
            options.default_top_k_file if source == options.default_top_k_source else None
        ),
    }


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
    return joined.select(*[c for c in joined.columns if c not in kernels.SHARES], *kernels.SHARES)


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
        _check_num_experts(batch, options, path)
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


def inspect_k(
    paths: Sequence[str | Path], infos: list[ingest.FileInfo], options: Options
) -> list[dict[str, Any]]:
    """Per path given to ``inspect``: the k its files that state none would be analyzed
    with, and where it comes from (``top_k``, ``top_k_source``, ``top_k_file``,
    ``top_k_assumed``); ``needed`` is false when every probability file states its own k."""
    out = []
    for path in paths:
        location = locate(str(path))
        if isinstance(location, Remote):
            resolved, _ = run_options(location, options)
            prefix = str(location).rstrip("/")
            own = [i for i in infos if i.path == prefix or i.path.startswith(prefix + "/")]
        else:
            resolved, _ = run_options(Path(path), options)
            root = Path(path).resolve()
            own = [
                info
                for info in infos
                if Path(info.path).resolve() == root or root in Path(info.path).resolve().parents
            ]
        needed = any(i.payload in PROBABILITY_PAYLOADS and i.top_k is None for i in own)
        for info in own:  # the k analysis would refuse, refused here too
            if info.payload in PROBABILITY_PAYLOADS and info.n_experts and info.layers:
                _check_k(resolved, info.top_k, info.n_experts, info.layers[0], info.path)
        provenance = _k_provenance(resolved, True)
        out.append(
            {"path": str(path), "top_k": resolved.k_for(None), "needed": needed, **provenance}
        )
    return out


PROBABILITY_PAYLOADS = ("probabilities", "logits")
"""``FileInfo.payload`` values whose k routelog has to choose (the others state theirs)."""


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
    default_top_k: int | None = None,
    default_top_k_file: str | None = None,
) -> Options:
    """Build ``Options`` from plain Python values (strings as on the command line).

    ``default_top_k``: the configured k for data that states none (``default_top_k_file``:
    the configuration file it came from); None assumes k=1, and reports say so.
    """
    if score not in ("softmax", "sigmoid"):
        raise UsageError(f"--score must be softmax or sigmoid, not {score!r}")
    layer_set = (
        parse_layers(layers) if isinstance(layers, str) or layers is None else LayerSet.of(layers)
    )
    step_range = (
        parse_steps(steps) if isinstance(steps, str) or steps is None else StepRange(*steps)
    )
    return Options(
        top_k=top_k,
        default_top_k=default_top_k if default_top_k is not None else 1,
        default_top_k_source="assumed" if default_top_k is None else "config",
        default_top_k_file=default_top_k_file,
        layers=layer_set,
        steps=step_range,
        skip_bad_rows=skip_bad_rows,
        temperature=temperature,
        score=score,  # type: ignore[arg-type]
        dead_fraction=dead_fraction,
        num_experts=num_experts,
    )


Paths = str | Path | RunSpec | Sequence[str | Path | RunSpec]
"""One run (a path, ``NAME=PATH``) or a list of runs."""


def _as_list(paths: Paths) -> list[str | Path | RunSpec]:
    return [paths] if isinstance(paths, str | Path | RunSpec) else list(paths)


def resolve_config(config: Config | str | Path | None) -> Config:
    """The configuration the CLI would use: a ``Config`` as given, a file read, or (None) the
    ``routelog.toml`` / ``[tool.routelog]`` found upwards of the current directory."""
    from routelog.config import load_config

    if isinstance(config, Config):
        return config
    return load_config(None if config is None else Path(config))


def _options(options: Options | None, config: Config, option_values: dict[str, Any]) -> Options:
    """``options`` as given, else built from keyword values with the configuration's
    defaults for ``top_k`` and ``dead_fraction`` (as the CLI builds them)."""
    if options is not None:
        if option_values:
            raise UsageError(
                f"give either options= or option keywords, not both ({', '.join(option_values)})"
            )
        return options
    return options_from(config, **option_values)


def options_from(config: Config, **option_values: Any) -> Options:
    """Options from keyword values (those of :func:`make_options`), with the configuration's
    ``top_k`` (only when a file sets it: else k is assumed where the data says none) and
    ``dead_fraction`` as defaults: how the CLI and the API build them alike."""
    if "top_k" in config.sources:
        option_values.setdefault("default_top_k", config.top_k)
        option_values.setdefault("default_top_k_file", config.sources["top_k"])
    option_values.setdefault("dead_fraction", config.dead_fraction)
    return make_options(**option_values)


def analyze(
    paths: Paths,
    *,
    options: Options | None = None,
    config: Config | str | Path | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    cache: Cache | None = None,
    executor: Executor | None = None,
    accept: Callable[[Location], bool] | None = None,
    **option_values: Any,
) -> Analysis:
    """Analyze runs: ``paths`` is one run or a list of runs (file or directory,
    ``NAME=PATH`` allowed).

    Keyword arguments are those of :func:`make_options` (``top_k``, ``layers="0,3-5"``,
    ``steps="100:500"``, ``skip_bad_rows``, ``temperature``, ``score``, ``dead_fraction``).
    ``config``: the configuration (thresholds, enabled rules, default ``top_k`` and
    ``dead_fraction``): a :class:`~routelog.config.Config`, a file to read, or by default the
    same file the CLI reads, ``routelog.toml`` or ``[tool.routelog]`` in ``pyproject.toml``
    searched upwards of the current directory (built-in values if none). ``jobs``: files read
    at once (default one per core); ``cache``: a ``routelog.cache.Cache`` (default none, so the
    Python API writes nothing); ``executor``: where files are read (default: ``jobs``
    threads; ``routelog.executor.open_executor("local:4", 1)`` gives a Dask cluster);
    ``accept``: keep only the files it returns true for.
    """
    from routelog.diagnose import diagnose

    settings = resolve_config(config)
    opts = _options(options, settings, option_values)
    runs = load_runs(
        _as_list(paths), opts, progress, jobs=jobs, cache=cache, executor=executor, accept=accept
    )
    metrics = metrics_of(runs, opts)
    beginning, notes = _beginning_in_view(opts, settings)
    return Analysis(
        runs=runs,
        metrics=metrics,
        options=opts,
        findings=diagnose(metrics, settings, dead_fraction=opts.dead_fraction, beginning=beginning),
        config=settings,
        notes=notes,
    )


def _beginning_in_view(options: Options, config: Config) -> tuple[bool, list[str]]:
    """Whether the selected steps include the run's beginning, and a note when they do not.

    A ``--steps`` window starting after step 0 may begin anywhere in the run: the rules that
    judge "the first 20% of the run" would judge the window's first 20% instead (and call a
    late, settled router premature). They are skipped, and the note says so.
    """
    from routelog.diagnose import BEGINNING_RULES

    start = options.steps.start if options.steps is not None else None
    if start is None or start <= 0:
        return True, []
    skipped = [rule for rule in BEGINNING_RULES if config.enabled(rule)]
    if not skipped:
        return False, []
    return False, [
        f"{' and '.join(skipped)} not run: --steps starts at step {start}, so the run's "
        "beginning is not in view (select from step 0 to judge it)"
    ]


def compare(
    paths: Paths,
    *,
    by: Literal["run", "dataset"] = "run",
    base: str | None = None,
    step: int | None = None,
    align: Literal["exact", "nearest"] = "exact",
    shift_threshold: float | None = None,
    options: Options | None = None,
    config: Config | str | Path | None = None,
    jobs: int | None = None,
    cache: Cache | None = None,
    **option_values: Any,
) -> Comparison:
    """``routelog compare``: runs side by side (the first is the baseline), or with
    ``by="dataset"`` the datasets of one run (``base`` names the baseline dataset).

    ``step``/``align`` choose the compared step; ``shift_threshold`` (JSD, default the
    configuration's ``thresholds.shift_jsd``) marks a shifted layer. ``config``, ``options``
    and the keywords of :func:`make_options` as for :func:`analyze`.
    """
    from routelog.compare import compare_datasets, compare_runs

    settings = resolve_config(config)
    opts = _options(options, settings, option_values)
    specs = _as_list(paths)
    if by == "dataset" and len(specs) != 1:
        raise UsageError(f"by='dataset' compares the datasets of one run, got {len(specs)}")
    if by == "run" and base is not None:
        raise UsageError("base names a dataset (with by='dataset'); the first run is the baseline")
    runs = load_runs(specs, opts, jobs=jobs, cache=cache)
    if by == "dataset":
        threshold = settings.thresholds.shift_jsd if shift_threshold is None else shift_threshold
        return compare_datasets(
            runs[0], opts, base=base, step=step, align=align, threshold=threshold
        )
    return compare_runs(runs, opts, step=step, align=align)


def check(
    paths: Paths | Analysis,
    *,
    minimum: Mapping[str, float] | None = None,
    maximum: Mapping[str, float] | None = None,
    max_regression: Mapping[str, float] | None = None,
    baseline: Paths | Analysis | None = None,
    align: Literal["exact", "nearest"] = "exact",
    window: int | None = None,
    strict: bool = False,
    options: Options | None = None,
    config: Config | str | Path | None = None,
    jobs: int | None = None,
    cache: Cache | None = None,
    **option_values: Any,
) -> CheckResult:
    """``routelog check``: evaluate the gate's rules; ``result.passed`` is the verdict.

    ``paths`` are runs (analyzed as by :func:`analyze`) or an :class:`Analysis`.
    ``minimum``/``maximum`` (``{"token_entropy_norm": 0.2}``) and ``max_regression`` (from
    ``baseline``) add to the configuration's ``[check]`` rules as ``--min``/``--max``/
    ``--max-regression`` do; ``window`` checks means over the last N steps; ``strict`` also
    fails on findings no longer active. A run (or baseline) whose k was assumed raises
    :class:`~routelog.errors.UsageError`: the verdict can turn on k (pass ``top_k=``).
    """
    from routelog.check import check as run_check

    def analysis_of(target: Paths | Analysis) -> Analysis:
        if isinstance(target, Analysis):
            return target
        return analyze(
            target, options=options, config=config, jobs=jobs, cache=cache, **option_values
        )

    if window is not None and window < 1:
        raise UsageError(f"window must be at least 1, got {window}")
    if max_regression and baseline is None:
        raise UsageError("max_regression needs a baseline run: pass baseline=")
    analysis = analysis_of(paths)
    settings = analysis.config.check.with_flags(
        minimum=[f"{k}={v}" for k, v in (minimum or {}).items()],
        maximum=[f"{k}={v}" for k, v in (maximum or {}).items()],
        max_regression=[f"{k}={v}" for k, v in (max_regression or {}).items()],
    )
    base = analysis_of(baseline) if baseline is not None else None
    return run_check(analysis, settings, baseline=base, align=align, window=window, strict=strict)
