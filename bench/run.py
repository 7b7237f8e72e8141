"""routelog's benchmark (``make bench``): ratios of medians, measured in one run on one machine.

(a) ``routelog analyze --format json`` end to end vs reading the same Parquet columns with
    Polars (the decode floor); (b) vs a hand-written numpy script (``bench/reference.py``);
    both cold (``--no-cache``) on a log of ``--ab-tokens`` (1M) x 64 experts, k=2, and as
    (a2), (b2) on half as many tokens x 256 experts, k=8 (DeepSeek-V3's shape);
(c) re-analysis of a 20-file directory after one file is added (cache) vs a full analysis;
(d) peak RSS analyzing a log 4x larger than another; (e) a .pt file vs ``torch.load`` plus
the same computation; (f) ``routelog --version`` wall time; (g) a 40-file directory on a Dask
``LocalCluster`` of 2 worker processes vs 1 (scaling), beside the same files read by 2 plain
processes vs 1 (the machine's own scaling); (h) the Dask path with 1 worker vs the
plain local path with ``--jobs 1`` (overhead), both in a child process limited to one
thread per reader (``bench/cluster.py``), each cluster the only one running, started and
warmed up before timing; (i) a 10-file directory read from an S3 server on 127.0.0.1
(MiniStack, in its own process and environment: ``S3_SERVER_PYTHON``) vs the same files
on disk, and, for a ``.pt`` object, a spill to a temporary file vs reading the zip archive
through ranged requests; (j) a Megatron-LM
router trace with its bf16 logits sidecar vs the same logits in Parquet, in seconds per byte
read; (k, l) training-step time with ``routelog.Recorder`` at every=10 and every=1 vs without
(``bench/recorder.py``).

Timings (a)-(c) run in this process through the CLI entry point (``app([...])``), so the
interpreter's start-up is excluded there and measured on its own in (f). Runs of the things
compared are interleaved, so a machine that gets busier slows both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import megatron  # noqa: E402
import recorder  # noqa: E402
import synth  # noqa: E402
from timing import median_times  # noqa: E402

TARGETS = {
    "a": ("<=", 1.3),
    "b": ("<=", 0.9),
    "a2": ("<=", 1.3),
    "b2": ("<=", 0.9),
    "c": ("<=", 0.1),
    "d": ("<", 0.25),
    "e": ("<=", 1.2),
    "f": ("<", 0.3),
    "g": (">=", 1.7),
    "h": ("<=", 1.15),
    "i": ("<=", 1.5),
    "j": ("<=", 1.0),
    "k": ("<=", 1.05),
    "l": ("<=", 1.25),
}

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across
# fork and exec, so a child of this (large) process would report the parent's peak.
RSS_PROBE = """
import sys
from routelog.cli import app
try:
    app(sys.argv[1:])
except SystemExit as done:
    assert not done.code, done.code
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) * 1024)
"""


def _cli(*args: str) -> Callable[[], None]:
    from routelog.cli import app

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                app(list(args))
            except SystemExit as done:
                if done.code:
                    raise RuntimeError(f"routelog {' '.join(args)} exited {done.code}") from None

    return run


def _log(data: Path, tokens: int, experts: int, seed: int = 0, step: int = 0) -> Path:
    path = data / f"tokens{tokens}_e{experts}_s{seed}.parquet"
    if not path.exists():
        print(f"  writing {path.name}", file=sys.stderr)
        synth.write_log(path, tokens=tokens, experts=experts, seed=seed, step=step)
    return path


def _run_dir(data: Path, files: int, per_file: int, experts: int, seed: int) -> Path:
    """A directory of ``files`` step files of ``per_file`` tokens (written once, then kept)."""
    run = data / f"run{files}_t{per_file}_e{experts}"
    run.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        target = run / f"step_{i:06d}.parquet"
        if not target.exists():
            shutil.copy(_log(data, per_file, experts, seed=seed + i), target)
    return run


@functools.cache
def _user_pool() -> Any:
    """pyarrow's default memory pool, as a script of the user's has it (taken at start-up,
    before the CLI, run in this process, sets the jemalloc pool it reads with)."""
    import pyarrow as pa

    return pa.default_memory_pool()


def _as_a_script(work: Callable[..., object], *args: object) -> None:
    """Run ``work`` with pyarrow's default pool: the CLI's pool is the CLI's own choice."""
    import pyarrow as pa

    pa.set_memory_pool(_user_pool())
    work(*args)


def bench_a_b(log: Path, top_k: int, repeat: int, suffix: str = "") -> dict[str, Any]:
    """(a) and (b) on one log; ``suffix`` names a second shape ("2": ``a2``, ``b2``)."""
    import polars as pl
    import reference

    columns = ["step", "layer", "token", "probs"]
    times = median_times(
        {
            "decode floor (polars read_parquet)": lambda: pl.read_parquet(log, columns=columns),
            "routelog analyze --format json": _cli(
                "analyze", str(log), "--format", "json", "-k", str(top_k), "--no-cache"
            ),
            "hand-written numpy script": lambda: _as_a_script(reference.metrics, log, top_k),
            "routelog analyze --jobs 1 (for the --jobs default)": _cli(
                "analyze", str(log), "--format", "json", "-k", str(top_k), "--no-cache", "-j", "1"
            ),
        },
        repeat,
    )
    floor, ours, script, _ = times.values()
    return {
        f"a{suffix}": {"ratio": ours / floor, "seconds": times, "log": log.name, "top_k": top_k},
        f"b{suffix}": {"ratio": ours / script, "seconds": times, "log": log.name, "top_k": top_k},
    }


def bench_c(data: Path, tokens: int, experts: int, top_k: int, repeat: int) -> dict[str, Any]:
    per_file = max(tokens // 20, 1000)
    run = _run_dir(data, 20, per_file, experts, seed=100)
    extra = _log(data, per_file, experts, seed=200)
    added = run / "step_000020.parquet"
    args = ["analyze", str(run), "--format", "json", "-k", str(top_k)]
    incremental: list[float] = []
    full: list[float] = []
    serial: list[float] = []
    for _ in range(repeat + 1):
        added.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as cache:
            _cli(*args, "--cache-dir", cache)()  # the cache knows the 20 files
            shutil.copy(extra, added)
            start = time.perf_counter()
            _cli(*args, "--cache-dir", cache)()
            incremental.append(time.perf_counter() - start)
        start = time.perf_counter()
        _cli(*args, "--no-cache")()
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        _cli(*args, "--no-cache", "--jobs", "1")()
        serial.append(time.perf_counter() - start)
    added.unlink(missing_ok=True)
    ours, whole = statistics.median(incremental[1:]), statistics.median(full[1:])
    one = statistics.median(serial[1:])
    return {
        "c": {
            "ratio": ours / whole,
            "seconds": {
                "re-analysis, one file added": ours,
                "full analysis (--no-cache)": whole,
                "full analysis (--no-cache --jobs 1), for the --jobs default": one,
            },
        }
    }


def _peak_rss(log: Path, top_k: int) -> int:
    done = subprocess.run(
        [
            *(sys.executable, "-c", RSS_PROBE, "analyze", str(log), "-f", "json"),
            *("-k", str(top_k), "--no-cache", "-o", os.devnull),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def bench_d(small: Path, large: Path, top_k: int, repeat: int) -> dict[str, Any]:
    # the peak with decoding threads varies by 10% from run to run (how far the threads get
    # ahead): a median of at least three, interleaved
    runs = max(3, repeat)
    peaks: dict[Path, list[int]] = {small: [], large: []}
    for _ in range(runs):
        for log, values in peaks.items():
            values.append(_peak_rss(log, top_k))
    small_rss, large_rss = (statistics.median(peaks[log]) for log in (small, large))
    return {
        "d": {
            "ratio": large_rss / small_rss - 1,
            "bytes": {f"peak RSS, {small.name}": small_rss, f"peak RSS, {large.name}": large_rss},
        }
    }


def bench_e(data: Path, tokens: int, experts: int, top_k: int, repeat: int) -> dict[str, Any]:
    from routelog import ingest

    try:
        import torch
    except ImportError:
        return {"e": {"skipped": "torch is not installed"}}
    if ".pt" not in ingest.FORMATS:
        return {"e": {"skipped": "this routelog has no .pt reader (routelog/ingest/pt.py)"}}
    import numpy as np
    import reference

    path = data / f"tokens{tokens}_e{experts}.pt"
    layers = synth.LAYERS
    if not path.exists():
        rng = np.random.default_rng(3)
        logits = rng.standard_normal((tokens, experts), dtype=np.float32) * 1.5
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        per_layer = list(torch.from_numpy(probs).chunk(layers))
        torch.save({"step": 0, "router_probs": per_layer, "top_k": top_k}, path)

    def by_hand() -> None:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        tensors = payload["router_probs"]
        probs = torch.cat(tensors).numpy()
        layer = np.repeat(np.arange(len(tensors)), [len(t) for t in tensors])
        reference.metrics_of_arrays(np.zeros(len(probs), dtype=np.int64), layer, probs, top_k)

    times = median_times(
        {
            "routelog analyze (.pt)": _cli(
                "analyze", str(path), "-f", "json", "-k", str(top_k), "--no-cache"
            ),
            "torch.load + numpy script": by_hand,
        },
        repeat,
    )
    ours, theirs = times.values()
    return {"e": {"ratio": ours / theirs, "seconds": times}}


def bench_f(repeat: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "routelog", "--version"]
    subprocess.run(command, check=True, capture_output=True)
    times = []
    for _ in range(max(repeat, 5)):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"f": {"ratio": median, "seconds": {"routelog --version": median}}}


def bench_g_h(data: Path, tokens: int, experts: int, top_k: int, repeat: int) -> dict[str, Any]:
    import cluster

    try:
        import distributed  # noqa: F401
    except ImportError:
        return {k: {"skipped": "needs routelog[dask]"} for k in "gh"}
    per_file = max(tokens // 40, 1000)
    run = _run_dir(data, 40, per_file, experts, seed=300)
    child = subprocess.run(
        [sys.executable, HERE / "cluster.py", run, "--top-k", str(top_k), "--repeat", str(repeat)],
        env={**os.environ, **cluster.LIKE_FOR_LIKE},
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    times = measured["seconds"]
    one, two = times["dask local:1"], times["dask local:2"]
    ceiling = times["ceiling: 1 plain process"] / times["ceiling: 2 plain processes"]
    return {
        "g": {"ratio": one / two, "machine_ceiling": ceiling, **measured},
        "h": {"ratio": one / times["plain, --jobs 1"], **measured},
    }


S3_SERVER_PYTHON = HERE.parent / ".venv-s3" / "bin" / "python"
"""The interpreter of the S3 server's own environment (``make bench`` builds it, ``.venv-s3``):
MiniStack, an AWS emulator, served by hypercorn. It pins its own botocore, so it does not
share routelog's environment. The test suite's server, moto, hands objects over at about
0.2 GB/s here, slower than routelog reads the same files from disk: with it, (i) measured
moto. MiniStack serves them at about 1 GB/s."""


def _s3_server(python: Path) -> tuple[subprocess.Popen[bytes], str]:
    """MiniStack's S3, alone, in its own process on a free port of 127.0.0.1."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            str(python.absolute()),
            "-m",
            "hypercorn",
            "ministack.app:app",
            "--bind",
            f"127.0.0.1:{port}",
        ],
        env={"PATH": os.environ.get("PATH", ""), "SERVICES": "s3", "GATEWAY_PORT": str(port)},
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"http://127.0.0.1:{port}"
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the S3 server ({python} -m hypercorn ministack.app:app) did not start")


def bench_i(
    data: Path, tokens: int, experts: int, top_k: int, repeat: int, server: Path
) -> dict[str, Any]:
    try:
        import boto3
    except ImportError:
        return {"i": {"skipped": "needs boto3 (the dev extra)"}}
    if not server.exists():
        return {"i": {"skipped": f"needs the S3 server's environment ({server}): make bench"}}
    import zipfile

    from routelog import api, storage

    per_file = max(tokens // 10, 1000)
    run = _run_dir(data, 10, per_file, experts, seed=500)
    pt = data / f"pt_t{per_file}_e{experts}.pt"
    if not pt.exists():
        import numpy as np
        import torch

        probs = np.random.default_rng(7).dirichlet(np.ones(experts), per_file).astype(np.float32)
        layers = list(torch.from_numpy(probs).chunk(synth.LAYERS))
        torch.save({"step": 0, "router_probs": layers, "top_k": top_k}, pt)
    process, endpoint = _s3_server(server)
    saved = {n: os.environ.get(n) for n in ("AWS_ENDPOINT_URL", "AWS_REGION")}
    secrets = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    saved.update({n: os.environ.get(n) for n in secrets})
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", **secrets})
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        for file in sorted(run.glob("*.parquet")):
            s3.upload_file(str(file), "bench", f"run/{file.name}")
        s3.upload_file(str(pt), "bench", "pt/step_000000.pt")
        remote_pt = storage.locate("s3://bench/pt/step_000000.pt")
        assert isinstance(remote_pt, storage.Remote)

        def spill() -> None:
            with storage.spilled(remote_pt) as local, zipfile.ZipFile(local) as archive:
                for name in archive.namelist():
                    archive.read(name)

        def ranged() -> None:
            with storage.open_random(remote_pt) as handle, zipfile.ZipFile(handle) as archive:
                for name in archive.namelist():
                    archive.read(name)

        listed = storage.discover(storage.Remote("s3://bench/run"))

        def fetch() -> None:
            # in pieces, as routelog streams: pyarrow's S3 stream read() whole, without a size,
            # took 4.7 s for a 49 MB object where 8 MB pieces take 0.2 s
            for remote in listed:
                with storage.open_stream(remote) as stream:
                    while stream.read(storage.SPILL_CHUNK):
                        pass

        times = median_times(
            {
                "GET the 10 objects whole (the server's floor)": fetch,
                "disk, 10 Parquet files": lambda: api.analyze([run], top_k=top_k),
                "s3://, the same 10 files": lambda: api.analyze(["s3://bench/run"], top_k=top_k),
                ".pt object: spill, then read": spill,
                ".pt object: ranged reads": ranged,
            },
            repeat,
        )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        process.wait(timeout=10)
    disk, remote = times["disk, 10 Parquet files"], times["s3://, the same 10 files"]
    return {"i": {"ratio": remote / disk, "seconds": times}}


def bench_j(data: Path, tokens: int, experts: int, top_k: int, repeat: int) -> dict[str, Any]:
    """Seconds per byte of payload: Megatron trace + sidecar over Parquet (same logits)."""
    root = megatron.write_pair(
        data / f"megatron_t{tokens}_e{experts}_k{top_k}",
        tokens=tokens,
        experts=experts,
        top_k=top_k,
    )
    sizes = megatron.payload_bytes(root)
    times = median_times(
        {
            "routelog analyze (megatron trace + sidecar)": _cli(
                "analyze", str(root / "trace"), "-f", "json", "--no-cache"
            ),
            "routelog analyze (parquet)": _cli(
                "analyze", str(root / "log.parquet"), "-f", "json", "-k", str(top_k), "--no-cache"
            ),
        },
        repeat,
    )
    trace, parquet = times.values()
    per_gb = {
        "megatron trace + sidecar": trace / sizes["megatron trace + sidecar"] * 1e9,
        "parquet": parquet / sizes["parquet"] * 1e9,
    }
    return {
        "j": {
            "ratio": per_gb["megatron trace + sidecar"] / per_gb["parquet"],
            "seconds": times,
            "seconds_per_gb": per_gb,
            "payload_bytes": sizes,
            "per_token_ratio": trace / parquet,
        }
    }


def _verdict(name: str, entry: dict[str, Any]) -> str:
    if "skipped" in entry:
        return "skipped"
    op, target = TARGETS[name]
    if op == ">=":
        return "met" if entry["ratio"] >= target else "MISSED"
    met = entry["ratio"] <= target if op == "<=" else entry["ratio"] < target
    return "met" if met else "MISSED"


def _table(results: dict[str, Any]) -> str:
    labels = {
        "a": "analyze vs decode floor",
        "b": "analyze vs hand-written script",
        "a2": "analyze vs decode floor, E=256 k=8",
        "b2": "analyze vs hand-written script, E=256 k=8",
        "c": "re-analysis (1 of 21 files new) vs full",
        "d": "peak RSS growth for 4x data",
        "e": ".pt vs torch.load + script",
        "f": "routelog --version (s)",
        "g": "dask local:1 vs local:2, 40 files (speed-up)",
        "h": "dask local:1 vs plain --jobs 1",
        "i": "s3:// (local server) vs the same files on disk",
        "j": "megatron trace vs parquet, per byte",
        "k": "training step, Recorder every=10 vs none",
        "l": "training step, Recorder every=1 vs none",
    }
    lines = [f"{'':2} {'measure':42} {'value':>8} {'target':>8}  verdict"]
    for name, entry in results.items():
        op, target = TARGETS[name]
        value = "-" if "skipped" in entry else f"{entry['ratio']:.3f}"
        lines.append(
            f"{name:2} {labels[name]:42} {value:>8} {op + str(target):>8}  {_verdict(name, entry)}"
        )
        if "machine_ceiling" in entry:
            lines.append(
                f"{'':5}the machine's own scaling (plain processes): {entry['machine_ceiling']:.3f}"
            )
        detail = entry.get("seconds") or entry.get("bytes") or {"reason": entry.get("skipped")}
        for what, amount in detail.items():
            shown = f"{amount / 1e6:.0f} MB" if "bytes" in entry else amount
            shown = f"{shown:.3f} s" if isinstance(shown, float) else shown
            lines.append(f"{'':5}{what}: {shown}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per measure")
    parser.add_argument(
        "--ab-tokens",
        type=int,
        default=1_000_000,
        help="tokens of the (a), (b) log (--experts, --top-k); (a2), (b2): half, E=256, k=8",
    )
    parser.add_argument("--quick", action="store_true", help="200k tokens (a2: 100k), 3 rounds")
    parser.add_argument("--only", default="abcdefghijkl", help="measures to run, e.g. ab")
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--s3-python",
        type=Path,
        default=S3_SERVER_PYTHON,
        help="python of the environment with MiniStack, (i)'s S3 server",
    )
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.ab_tokens, args.repeat = 200_000, 200_000, 3
    from routelog import __version__, api

    _user_pool()  # before any measure runs the CLI

    print(
        f"routelog {__version__} bench: {args.tokens} tokens x {args.experts} experts, "
        f"k={args.top_k} ((a), (b): {args.ab_tokens} tokens; (a2), (b2): "
        f"{args.ab_tokens // 2} x 256, k=8), {args.repeat} rounds, {api.default_jobs()} cores",
        file=sys.stderr,
    )
    log = _log(args.data, args.tokens, args.experts)
    results: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (
            "ab",
            lambda: {
                **bench_a_b(_log(args.data, args.ab_tokens, args.experts), args.top_k, args.repeat),
                **bench_a_b(_log(args.data, args.ab_tokens // 2, 256), 8, args.repeat, "2"),
            },
        ),
        ("c", lambda: bench_c(args.data, args.tokens, args.experts, args.top_k, args.repeat)),
        (
            "d",
            lambda: bench_d(
                _log(args.data, args.tokens // 4, args.experts), log, args.top_k, args.repeat
            ),
        ),
        ("e", lambda: bench_e(args.data, args.tokens, args.experts, args.top_k, args.repeat)),
        ("f", lambda: bench_f(args.repeat)),
        ("gh", lambda: bench_g_h(args.data, args.tokens, args.experts, args.top_k, args.repeat)),
        (
            "i",
            lambda: bench_i(
                args.data, args.tokens, args.experts, args.top_k, args.repeat, args.s3_python
            ),
        ),
        ("j", lambda: bench_j(args.data, args.tokens, args.experts, args.top_k, args.repeat)),
        ("kl", lambda: recorder.bench_k_l(args.repeat)),
    ]
    for names, measure in steps:
        if set(names) & set(args.only):
            print(f"  measuring {names}", file=sys.stderr)
            results.update({k: v for k, v in measure().items() if k[0] in args.only})
    print(_table(results))
    document = {
        "routelog_version": __version__,
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "machine": {
            "cores": api.default_jobs(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1min_at_end": os.getloadavg()[0],
        },
        "config": {
            "tokens": args.tokens,
            "ab_tokens": args.ab_tokens,
            "experts": args.experts,
            "top_k": args.top_k,
        },
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "results": {k: {**v, "verdict": _verdict(k, v)} for k, v in results.items()},
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
