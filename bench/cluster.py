"""(g) and (h): a directory read by a Dask ``LocalCluster`` of 1 and 2 workers, and by the
plain local path, like for like.

Run by ``bench/run.py`` as a child process whose environment limits every native thread pool
to one thread (``POLARS_MAX_THREADS=1``, ``OMP_NUM_THREADS=1``, which also sizes pyarrow's),
as ``--scheduler local:N`` sets for its workers (``routelog.executor.WORKER_ENV``): so the
plain path with ``--jobs 1`` and a cluster of one worker have one core's worth of threads
each, and (h) measures what the Dask path adds, not a difference in threads. The clusters are
started before timing: these figures are about analysis, not cluster start-up (timed apart).

Prints one JSON object: median seconds per way of reading, and the start-up of a cluster.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from timing import median_times

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

    start = time.perf_counter()
    clusters = {n: local_cluster(n) for n in (1, 2)}
    clients = {n: distributed.Client(cluster) for n, cluster in clusters.items()}
    started = (time.perf_counter() - start) / 2
    try:
        seconds = median_times(
            {
                "plain, --jobs 1": lambda: api.analyze([args.run], top_k=args.top_k, jobs=1),
                "plain, --jobs 2": lambda: api.analyze([args.run], top_k=args.top_k, jobs=2),
                "dask local:1": lambda: api.analyze(
                    [args.run], top_k=args.top_k, executor=Cluster(clients[1])
                ),
                "dask local:2": lambda: api.analyze(
                    [args.run], top_k=args.top_k, executor=Cluster(clients[2])
                ),
            },
            args.repeat,
        )
    finally:
        for n, client in clients.items():
            client.close()
            clusters[n].close()
    print(json.dumps({"seconds": seconds, "cluster start-up": started}))


if __name__ == "__main__":
    main()
