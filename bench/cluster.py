"""(g) and (h): a directory read by a Dask ``LocalCluster`` of 1 and 2 workers, and by the
plain local path, like for like.

Run by ``bench/run.py`` as a child process whose environment limits every native thread pool
to one thread (``POLARS_MAX_THREADS=1``, ``OMP_NUM_THREADS=1``, which also sizes pyarrow's),
as ``--scheduler local:N`` sets for its workers (``routelog.executor.WORKER_ENV``): so the
plain path with ``--jobs 1`` and a cluster of one worker have one core's worth of threads
each, and (h) measures what the Dask path adds, not a difference in threads.

Each timed analysis on a cluster runs on a cluster of its own, the only one: a
``LocalCluster``'s scheduler runs in this process, so a second cluster, idle, would take
CPU from the one measured (as it would from the plain path). Each is started and warmed up
(one analysis of the directory: imports, the workers' memory) before timing, and closed after: these
figures are about analysis, not cluster start-up (timed apart). Rounds interleave the four
ways of reading, so a machine that gets busier slows all alike.

The machine's own ceiling is measured beside them, in the same rounds: the same files read
by 1 and by 2 plain worker processes (``multiprocessing``, each its share of the files, no
scheduler, no results sent back, nothing merged): how far the reading itself scales on
these cores, whatever runs it. (g) is judged against its target; its ratio to this ceiling
says how much of the machine's scaling the Dask path keeps.

Prints one JSON object: median seconds per way of reading, and the start-up of a cluster.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

LIKE_FOR_LIKE = {"POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _read_share(files: list[Path], top_k: int) -> int:
    """One plain process's share of the ceiling: read and reduce ``files``, send nothing back."""
    from routelog import api

    options = api.make_options(top_k=top_k)
    for file in files:
        api.read_file(file, options, prefetch=0)
    return len(files)


def processes(files: list[Path], top_k: int, workers: int) -> Callable[[], float]:
    """The machine's ceiling: ``files`` dealt out to ``workers`` plain processes, started
    and warmed up (one reading of every file) before timing."""

    def timed() -> float:
        shares = [files[i::workers] for i in range(workers)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_read_share, shares, [top_k] * workers))  # warm-up
            start = time.perf_counter()
            list(pool.map(_read_share, shares, [top_k] * workers))
            return time.perf_counter() - start

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import distributed

    from routelog import api
    from routelog.executor import Cluster, local_cluster

    starts: list[float] = []
    files = sorted(args.run.glob("*.parquet"))

    def plain(jobs: int) -> Callable[[], float]:
        def timed() -> float:
            start = time.perf_counter()
            api.analyze([args.run], top_k=args.top_k, jobs=jobs)
            return time.perf_counter() - start

        return timed

    def on_cluster(workers: int) -> Callable[[], float]:
        def timed() -> float:
            start = time.perf_counter()
            cluster = local_cluster(workers)
            client = distributed.Client(cluster)
            starts.append(time.perf_counter() - start)
            try:
                executor = Cluster(client)
                api.analyze([args.run], top_k=args.top_k, executor=executor)  # warm-up
                start = time.perf_counter()
                api.analyze([args.run], top_k=args.top_k, executor=executor)
                return time.perf_counter() - start
            finally:
                client.close()
                cluster.close()

        return timed

    ways = {
        "plain, --jobs 1": plain(1),
        "plain, --jobs 2": plain(2),
        "dask local:1": on_cluster(1),
        "dask local:2": on_cluster(2),
        "ceiling: 1 plain process": processes(files, args.top_k, 1),
        "ceiling: 2 plain processes": processes(files, args.top_k, 2),
    }
    for way in ways.values():  # warm-up: imports, the page cache
        way()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeat):
        for name, way in ways.items():
            seconds[name].append(way())
    print(
        json.dumps(
            {
                "seconds": {name: statistics.median(times) for name, times in seconds.items()},
                "cluster start-up": statistics.median(starts),
            }
        )
    )


if __name__ == "__main__":
    main()
