"""Where files are read: threads here, a Dask LocalCluster, or `dask scheduler`/`dask worker`
processes on 127.0.0.1; results identical byte for byte, errors the same, dead workers
survived."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from routelog import api, tokens
from routelog.cli import app
from routelog.errors import InputError
from routelog.executor import (
    Cluster,
    Threads,
    _chunks,
    check_scheduler,
    open_executor,
    scheduler_from,
)
from routelog.render import data, report
from tests.conftest import SAMPLES

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

runner = CliRunner()
COLLAPSE = SAMPLES / "collapse"
BIN = Path(sys.executable).parent


def _json(paths: list[str | Path], executor: object | None = None) -> str:
    result = api.analyze(paths, top_k=2, executor=executor)  # type: ignore[arg-type]
    return data.to_json(report.analysis_document(result))


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 step files (the collapse sample four times over, at distinct steps)."""
    root = tmp_path_factory.mktemp("many") / "run"
    root.mkdir()
    for copy in range(4):
        for source in sorted(COLLAPSE.glob("*.parquet")):
            step = int(source.stem.split("_")[1]) + copy * 10_000
            shutil.copy(source, root / f"step_{step:06d}.parquet")
    return root


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[Cluster]:
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with distributed.Client(cluster) as client:
        yield Cluster(client)
    cluster.close()


def test_a_local_cluster_gives_identical_json(many_files: Path, local_cluster: Cluster) -> None:
    assert local_cluster.workers == 2
    assert _json([many_files], local_cluster) == _json([many_files], Threads(1))
    assert _json([COLLAPSE], local_cluster) == _json([COLLAPSE], Threads(2))


def test_a_bad_file_is_the_same_error_as_locally(tmp_path: Path, local_cluster: Cluster) -> None:
    run = tmp_path / "run"
    shutil.copytree(COLLAPSE, run)
    (run / "step_000150.parquet").write_bytes(b"not parquet at all")
    os.chdir(tmp_path)
    errors = []
    for executor in (Threads(2), local_cluster):
        with pytest.raises(Exception) as caught:  # noqa: PT011 (the type is compared below)
            api.analyze(["run"], top_k=2, executor=executor)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]
    assert errors[0][1].startswith("run/step_000150.parquet: not a valid Parquet file")


def test_the_first_bad_file_in_order_is_the_error_on_a_cluster(
    tmp_path: Path, local_cluster: Cluster
) -> None:
    """Files travel several to a task: the error is still the first failing file in order."""
    run = tmp_path / "run"
    shutil.copytree(COLLAPSE, run)
    files = sorted(run.glob("*.parquet"))
    for bad in (files[1], files[-1]):  # in the first task and in the last one
        bad.write_bytes(b"not parquet at all")
    for executor in (Threads(2), local_cluster):
        with pytest.raises(InputError, match=rf"^{re.escape(str(files[1]))}: not a valid"):
            api.analyze([run], top_k=2, executor=executor)


@given(items=st.integers(0, 2000), workers=st.integers(1, 64))
def test_tasks_cover_the_files_in_order_largest_first(items: int, workers: int) -> None:
    chunks = _chunks(items, workers)
    assert [i for chunk in chunks for i in chunk] == list(range(items))
    sizes = [len(chunk) for chunk in chunks]
    assert sizes == sorted(sizes, reverse=True)
    assert not items or sizes[-1] == 1  # the last task is one file: workers finish together
    assert all(size <= -(-items // (2 * workers)) for size in sizes)


def test_cli_local_scheduler_matches_threads(tmp_path: Path) -> None:
    args = ["analyze", str(COLLAPSE), "-k", "2", "--format", "json", "--no-cache"]
    plain = runner.invoke(app, args)
    dask = runner.invoke(app, [*args, "--scheduler", "local:1"])
    assert plain.exit_code == 0, plain.output
    assert dask.exit_code == 0, dask.output
    assert dask.stdout == plain.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_workers(address: str, count: int, timeout: float = 60) -> None:
    with distributed.Client(address, timeout="30s") as client:
        client.wait_for_workers(count, timeout=timeout)


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """`dask scheduler` and two `dask worker` processes (no nanny, so a kill is final)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": tmp_path}
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--no-dashboard"],
        **quiet,  # type: ignore[call-overload]
    )  # fmt: skip
    workers = [
        subprocess.Popen(
            [
                BIN / "dask",
                "worker",
                address,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--name",
                f"w{i}",
            ],
            **quiet,  # type: ignore[call-overload]
        )
        for i in range(2)
    ]
    processes = [scheduler, *workers]
    try:
        _wait_for_workers(address, 2)
        yield address, workers
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)


def test_scheduler_and_worker_processes_give_identical_json(
    dask_processes: tuple[str, list[subprocess.Popen[bytes]]], many_files: Path
) -> None:
    address, _ = dask_processes
    args = ["analyze", str(many_files), "-k", "2", "--format", "json", "--no-cache"]
    plain = runner.invoke(app, args)
    cluster = runner.invoke(app, [*args, "--scheduler", address])
    assert cluster.exit_code == 0, cluster.output
    assert cluster.stdout == plain.stdout


def test_a_worker_that_dies_mid_analysis_is_survived(
    dask_processes: tuple[str, list[subprocess.Popen[bytes]]], many_files: Path
) -> None:
    address, workers = dask_processes
    expected = _json([many_files], Threads(2))
    killed: list[int] = []

    def kill_one(path: Path, done: int, total: int) -> None:
        if not killed:
            workers[0].send_signal(signal.SIGKILL)
            killed.append(done)

    with distributed.Client(address) as client:
        executor = Cluster(client)
        result = api.analyze([many_files], top_k=2, executor=executor, progress=kill_one)
        assert killed
        assert killed[0] < 48  # killed before the analysis had finished
        got = data.to_json(report.analysis_document(result))
    assert workers[0].wait(timeout=30) == -signal.SIGKILL
    assert got == expected


def test_progress_counts_files_finished_on_the_cluster(
    many_files: Path, local_cluster: Cluster
) -> None:
    seen: list[tuple[str, int, int]] = []
    api.analyze(
        [many_files],
        top_k=2,
        executor=local_cluster,
        progress=lambda p, d, t: seen.append((p.name, d, t)),
    )
    assert [done for _, done, _ in seen] == list(range(1, 49))
    assert {total for _, _, total in seen} == {48}
    assert len({name for name, _, _ in seen}) == 48


@pytest.mark.parametrize("where", ["environment", "configuration"])
def test_scheduler_from_the_environment_and_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    unreachable = "tcp://127.0.0.1:9"
    if where == "environment":
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", unreachable)
    else:
        (tmp_path / "routelog.toml").write_text(f'scheduler = "{unreachable}"\n')
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = runner.invoke(app, ["analyze", str(COLLAPSE), "-k", "2"])
    assert result.exit_code == 2, result.output
    assert f"--scheduler {unreachable}: cannot connect" in result.stderr


def test_scheduler_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert scheduler_from(None, None) is None
    assert scheduler_from(None, "local:2") == "local:2"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://a:1")
    assert scheduler_from(None, "local:2") == "tcp://a:1"
    assert scheduler_from("local:3", "local:2") == "local:3"


@pytest.mark.parametrize("value", ["local:0", "local:x", "8786", "http://host:8786", "local:5000"])
def test_a_bad_scheduler_is_a_usage_error(value: str) -> None:
    result = runner.invoke(app, ["analyze", str(COLLAPSE), "--scheduler", value])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert "--scheduler" in result.stderr
    with pytest.raises(Exception, match="scheduler"):
        check_scheduler(value)


def test_a_bad_scheduler_in_the_configuration_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "routelog.toml").write_text('scheduler = "8786"\n')
    result = runner.invoke(app, ["analyze", str(COLLAPSE)])
    assert result.exit_code == 2, result.output
    assert "routelog.toml: scheduler: expected tcp://HOST:PORT or local:N" in result.stderr


def test_without_dask_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    result = runner.invoke(app, ["analyze", str(COLLAPSE), "--scheduler", "local:1"])
    assert result.exit_code == 2, result.output
    assert "pip install 'routelog[dask]'" in result.stderr


def test_plain_analysis_imports_no_dask() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from routelog.cli import app; "
        f"r = CliRunner().invoke(app, ['analyze', {str(COLLAPSE)!r}, '-k', '2']); "
        "assert r.exit_code == 0, r.output; "
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _thread_pools() -> tuple[int, int]:
    import polars as pl
    import pyarrow as pa

    return pa.cpu_count(), pl.thread_pool_size()


def _initial_environment(name: str) -> str | None:
    """``name`` in the environment the process started with (what glibc read)."""
    for entry in Path("/proc/self/environ").read_bytes().split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key.decode() == name:
            return value.decode()
    return None


def test_local_workers_have_one_thread_per_native_pool() -> None:
    """local:N runs N single-threaded workers: N of them on N cores do not oversubscribe;
    with glibc's default allocator settings (Dask's nanny would set MALLOC_TRIM_THRESHOLD_,
    which made reading 8 to 16% slower) and no statistical profiler. The scheduler and the
    nannies, in this process, tick every second, not every 20 ms, and sample the system
    every 2 s, and they and the workers check memory every second, not every 100 ms: CPU
    the workers need."""
    with open_executor("local:1", 1) as executor:
        assert isinstance(executor, Cluster)
        pools = executor.client.run(_thread_pools)
        trim = executor.client.run(_initial_environment, "MALLOC_TRIM_THRESHOLD_")
        profiling = executor.client.run(dask.config.get, "distributed.worker.profile.enabled")
        cluster = executor.client.cluster
        servers = [cluster.scheduler, *cluster.workers.values()]
        periods = {
            (name, server.periodic_callbacks[name].callback_time)
            for server in servers
            for name in ("tick", "monitor")
        }
        memory = {
            server.periodic_callbacks["memory_monitor"].callback_time
            for server in cluster.workers.values()
        }
        worker_memory = executor.client.run(
            lambda dask_worker: dask_worker.periodic_callbacks["memory_monitor"].callback_time
        )
    assert periods == {("tick", 1000), ("monitor", 2000)}
    assert memory == {1000}
    assert list(worker_memory.values()) == [1000]
    assert list(pools.values()) == [(1, 1)]
    assert list(trim.values()) == [None]
    assert list(profiling.values()) == [False]


WORKER_POOL_PROBE = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.RLIM_INFINITY))
from routelog import cli
from routelog.executor import open_executor

def pool():
    import pyarrow as pa
    return pa.default_memory_pool().backend_name

if __name__ == "__main__":
    cli._arrow_memory_pool()  # as the CLI chooses before it starts a cluster
    with open_executor("local:1", 1) as executor:
        print(*executor.client.run(pool).values())
"""


def test_local_workers_under_ulimit_read_with_the_system_allocator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers inherit the CLI's choice under an address-space limit (tests/test_corpus.py)."""
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    done = subprocess.run(
        [sys.executable, "-c", WORKER_POOL_PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.split() == ["system"]


def test_two_clients_at_once_each_gets_its_own_results(tmp_path: Path) -> None:
    """Results are gathered on the executor's own client, not Dask's default client (the
    last one made): with two clusters open, reading through the first used to hang."""
    expected = _json([COLLAPSE])
    with open_executor("local:1", 1) as first, open_executor("local:1", 1) as second:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reading = pool.submit(_json, [COLLAPSE], first)
            assert reading.result(timeout=120) == expected
        assert _json([COLLAPSE], second) == expected


def test_a_file_result_pickles_to_an_equal_one(many_files: Path) -> None:
    """What a worker sends back (selections packed) is what it read."""
    import pickle

    from polars.testing import assert_frame_equal

    path = sorted(many_files.glob("*.parquet"))[0]
    result = api.read_file(path, api.make_options(top_k=2))
    assert result.selections is not None
    back = pickle.loads(pickle.dumps(result, protocol=5))
    assert back.info == result.info
    assert back.top_k_assumed == result.top_k_assumed
    assert_frame_equal(back.stats, result.stats)
    assert back.selections is not None
    assert_frame_equal(back.selections, result.selections)
    # the token ranges travel computed (the worker's work, not the client's)
    assert back._ranges is not None
    assert_frame_equal(back._ranges, tokens.token_ranges(result.selections))


def test_null_token_positions_travel_as_nulls(tmp_path: Path) -> None:
    """A file whose token column has a null: the null comes back a null (the packed form
    once cast it to int32, -2147483648, with a numpy warning on the worker)."""
    import pickle

    import polars as pl
    from polars.testing import assert_frame_equal

    path = tmp_path / "step_0.parquet"
    pl.DataFrame(
        {"step": [0] * 3, "layer": [0] * 3, "token": [0, None, 2], "probs": [[0.5, 0.5]] * 3}
    ).write_parquet(path)
    result = api.read_file(path, api.make_options(top_k=1))
    assert result.selections is not None
    assert result.selections["token"].null_count() == 1
    back = pickle.loads(pickle.dumps(result, protocol=5))
    assert back.selections is not None
    assert_frame_equal(back.selections, result.selections)


def _mixed_k_run(root: Path) -> Path:
    """Two step files of a run whose layer 0 selects 1 expert per token and layer 1 two."""
    root.mkdir()
    for step in (0, 1):
        ids = {(layer, token): [(token + step + j) % 4 for j in range(k)]
               for layer, k in ((0, 1), (1, 2)) for token in range(6)}  # fmt: skip
        lines = [
            {"step": step, "layer": layer, "token": token, "num_experts": 4, "topk_ids": topk}
            for (layer, token), topk in ids.items()
        ]
        (root / f"step_{step}.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return root


def test_layers_of_different_k_give_identical_json_everywhere(
    tmp_path: Path, local_cluster: Cluster
) -> None:
    """A run whose layers select different numbers of experts (found by `make fuzz`: it
    was an internal error) reads the same on threads, on a cluster and from the cache."""
    run = _mixed_k_run(tmp_path / "run")

    def json_of(executor: object, cache: object = None) -> str:
        result = api.analyze([run], executor=executor, cache=cache)  # type: ignore[arg-type]
        return data.to_json(report.analysis_document(result))

    from routelog.cache import Cache

    store = Cache.at(tmp_path / "cache")
    here = json_of(Threads(1))
    assert json_of(local_cluster) == here
    assert json_of(Threads(2), store) == here  # fills the cache
    assert json_of(Threads(2), store) == here  # answered by it
    document = json.loads(here)
    assert document["runs"][0]["top_k"] == [1, 2]
    saturation = {(m["layer"], m["step"]): m["saturation"] for m in document["metrics"]}
    # step 1 shifts every id by one: no token keeps its top-1, nor any of its top-2 ...
    assert saturation[(0, 0)] == 0.0
    # ... but a top-2 set {t, t+1} and {t+1, t+2} share one expert
    assert saturation[(1, 0)] == 0.5
