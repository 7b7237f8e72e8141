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

Prints one JSON object: median seconds per way of reading, and the start-up of a cluster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

LIKE_FOR_LIKE = {"POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1"}


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
