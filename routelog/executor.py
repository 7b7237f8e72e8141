"""Where the per-file reduction runs: threads on this machine, or the workers of a Dask cluster.

The unit of work is :func:`routelog.api.read_file`, a pure function of (file, options) that
returns the file's mergeable statistics and token selections. Whether it runs in a thread
here or in a Dask worker is decided here and nowhere else, so the two paths cannot drift:
both call the same function on the same files, and the client merges, diagnoses and renders
the results exactly as it does locally.

``--scheduler`` takes ``tcp://HOST:PORT`` (an existing cluster's scheduler; workers read the
files themselves, so they must see the same paths), or ``local:N`` (a ``LocalCluster`` of N
worker processes on this machine). Without it, ``DASK_SCHEDULER_ADDRESS`` and then the
configuration's ``scheduler`` key are consulted; with none of them, files are read by threads.
Dask is an extra: ``pip install 'routelog[dask]'``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

from routelog.errors import RoutelogError, UsageError

T = TypeVar("T")
R = TypeVar("R")

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
DASK_EXTRA = "pip install 'routelog[dask]'"
_LOCAL = re.compile(r"^local:(\d+)$")
WORKER_ENV = {"POLARS_MAX_THREADS": "1"}
"""The environment of ``local:N`` workers: one process per core, each with single-threaded
native pools, so N workers on N cores do not oversubscribe them (Dask's nanny already sets
``OMP_NUM_THREADS=1``, which also sizes pyarrow's pool; Polars reads its own variable)."""
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$")

Done = Callable[[int, int], None]
"""Called in the calling thread as each item finishes: ``(item index, items finished)``."""


class Executor(Protocol):
    """Runs one function over many items and returns the results in the items' order."""

    remote: bool
    """Whether work runs in other processes (which read files by absolute path)."""

    workers: int

    def map(self, work: Callable[[T], R], items: Sequence[T], on_done: Done | None) -> list[R]:
        """``[work(item) for item in items]``; the first failing item, in order, raises."""
        ...


class Threads:
    """Threads of this process: numpy, pyarrow and polars release the GIL while they work."""

    remote = False

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise UsageError(f"--jobs must be at least 1, got {jobs}")
        self.workers = jobs

    def map(self, work: Callable[[T], R], items: Sequence[T], on_done: Done | None) -> list[R]:
        results: list[R] = []
        if self.workers <= 1 or len(items) <= 1:
            for index, item in enumerate(items):
                results.append(work(item))
                if on_done is not None:
                    on_done(index, index + 1)
            return results
        pool = ThreadPoolExecutor(
            max_workers=min(self.workers, len(items)), thread_name_prefix="routelog"
        )
        try:
            for result in pool.map(work, items):
                results.append(result)
                if on_done is not None:
                    on_done(len(results) - 1, len(results))
            return results
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class Cluster:
    """The workers of a Dask cluster, through a connected ``distributed.Client``.

    A worker that dies mid-analysis loses its tasks to the scheduler, which runs them again
    on another worker (Dask's own recovery); an error raised by ``work`` comes back as the
    same exception, raised here for the first failing item in order, as ``Threads`` does.
    """

    remote = True

    def __init__(self, client: Any) -> None:  # a distributed.Client
        self.client = client
        self.workers = max(1, len(client.scheduler_info().get("workers", {})))

    def map(self, work: Callable[[T], R], items: Sequence[T], on_done: Done | None) -> list[R]:
        as_completed = _dask().as_completed
        if not items:
            return []
        chunks = _chunks(len(items), self.workers)
        futures = self.client.map(
            partial(_each, work=work), [[items[i] for i in c] for c in chunks], pure=False
        )
        index = {future.key: i for i, future in enumerate(futures)}
        results: dict[int, list[R]] = {}
        count = 0
        try:
            # results travel as each task finishes, while the workers read the next ones
            finished = as_completed(
                futures, loop=self.client.loop, with_results=True, raise_errors=False
            )
            for future, result in finished:
                if future.status == "error":
                    break  # raised below, in order
                chunk = index[future.key]
                results[chunk] = result
                for item in chunks[chunk]:
                    count += 1
                    if on_done is not None:
                        on_done(item, count)
            return [
                one
                for i, f in enumerate(futures)
                for one in (results[i] if i in results else f.result())
            ]
        finally:
            self.client.cancel([f for f in futures if not f.done()])


def _chunks(n_items: int, workers: int) -> list[range]:
    """``range(n_items)`` cut into runs of consecutive items, one task each, largest first:
    each run takes 1/(2 x workers) of the items left (a "guided" schedule).

    Dask spends some milliseconds of CPU on every task (scheduler, client and worker: about
    5 ms here, a tenth of reading a 50k-token file), so a task reads several files; the
    runs shrink to one file at the end, so the workers also finish together.

    Examples
    --------
    >>> [len(r) for r in _chunks(40, 2)]
    [10, 8, 6, 4, 3, 3, 2, 1, 1, 1, 1]
    """
    runs, start = [], 0
    while start < n_items:
        size = -(-(n_items - start) // (2 * max(1, workers)))
        runs.append(range(start, start + size))
        start += size
    return runs


def _each(items: list[T], work: Callable[[T], R]) -> list[R]:
    """One task: ``work`` on consecutive items (the first failing one raises)."""
    return [work(item) for item in items]


def scheduler_from(option: str | None, configured: str | None) -> str | None:
    """The scheduler to use: ``--scheduler``, else ``$DASK_SCHEDULER_ADDRESS``, else the
    configuration's ``scheduler``; None means threads on this machine."""
    for value in (option, os.environ.get(SCHEDULER_ENV), configured):
        if value:
            return value.strip()
    return None


def check_scheduler(value: str, where: str = "--scheduler") -> str:
    """Validate a scheduler spec without connecting (``local:N`` or an address)."""
    local = _LOCAL.match(value)
    if local is not None:
        if not 1 <= int(local.group(1)) <= 1024:
            raise UsageError(f"{where}: local:N needs 1 to 1024 workers, got {value!r}")
        return value
    if _ADDRESS.match(value) is None:
        raise UsageError(
            f"{where}: expected tcp://HOST:PORT or local:N (N worker processes), not {value!r}"
        )
    return value


@contextmanager
def open_executor(scheduler: str | None, jobs: int) -> Iterator[Executor]:
    """An executor for ``scheduler`` (None: ``jobs`` threads), closed on exit."""
    if scheduler is None:
        yield Threads(jobs)
        return
    check_scheduler(scheduler)
    distributed = _dask()
    local = _LOCAL.match(scheduler)
    if local is not None:
        cluster = local_cluster(int(local.group(1)))
        try:
            with distributed.Client(cluster) as client:
                yield Cluster(client)
        finally:
            cluster.close()
        return
    try:
        client = distributed.Client(scheduler)  # waits distributed.comm.timeouts.connect
    except OSError as exc:
        raise UsageError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    with client:
        yield Cluster(client)


def local_cluster(workers: int) -> Any:
    """The ``LocalCluster`` of ``local:N``: N worker processes of one thread each, with
    single-threaded native pools (:data:`WORKER_ENV`) and glibc's default allocator settings.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` in its workers, to hand freed memory back
    to the system at once in long-lived workers; setting it also turns off glibc's adaptive
    mmap threshold, so every large array of every chunk is mapped (and its pages faulted in)
    afresh, which made a worker's reading 8 to 16% slower than the same reading here. A
    ``local:N`` cluster lives for one analysis, so its workers keep glibc's defaults (a
    nanny started earlier in this process leaves the variable in ``os.environ``, which the
    workers would inherit: it is left out while they start). Nor do they run Dask's
    statistical profiler, which samples every worker's stack 100 times a second.
    """
    import dask

    distributed = _dask()
    trim = os.environ.pop(_TRIM, None)
    try:
        with dask.config.set(_LOCAL_CONFIG):
            return distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=50,
                env=WORKER_ENV,
            )
    finally:
        if trim is not None:
            os.environ[_TRIM] = trim


_TRIM = "MALLOC_TRIM_THRESHOLD_"
_LOCAL_CONFIG = {
    f"distributed.nanny.pre-spawn-environ.{_TRIM}": None,
    # the statistical profiler samples each worker's stack every 10 ms for the dashboard's
    # profile page; a local:N cluster has no dashboard anyone looks at
    "distributed.worker.profile.enabled": False,
    # the scheduler and the nannies run in this process, beside the client: their event
    # loops' tick (every 20 ms, to warn of a blocked loop) and system monitor (psutil's
    # counters every 500 ms, for the dashboard) took about 30 ms of this process's CPU per
    # analysis of 40 files, CPU the workers on the same cores did not get
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    # the nannies (in this process) and the workers poll their memory every 100 ms, for
    # pausing, spilling and the 95% kill; once a second keeps all three and halves an idle
    # cluster's CPU here (16 to 10 ms a second in this process, 8 to 3 in each worker)
    "distributed.worker.memory.monitor-interval": "1s",
}


def _dask() -> Any:
    try:
        import distributed
    except ImportError:
        raise UsageError(f"--scheduler needs Dask: {DASK_EXTRA}") from None
    return distributed


def relocated(error: RoutelogError, absolute: str, shown: str) -> RoutelogError:
    """``error`` as it reads locally: the file named as the user named it, not by the
    absolute path a worker had to use."""
    if absolute == shown or absolute not in str(error):
        return error
    return type(error)(str(error).replace(absolute, shown))
