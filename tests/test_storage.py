"""Object storage: runs in an S3 bucket, against a real S3 server (moto) on 127.0.0.1.

Requests go through a counting TCP proxy in front of the server, so the tests can tell how
many bytes routelog fetched (ranged reads) without trusting routelog's own account.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from routelog import storage
from routelog.cli import app
from routelog.storage import Remote, locate
from tests.conftest import SAMPLES, dirichlet
from tests.objectstore import KEYS, Store, _bucket, _upload, free_port, serving

# the cloud layer (the ``cloud`` extra: pyarrow.fs at the tested release) and the S3 server;
# `make test-min` installs neither at these versions, so there the module skips
pytest.importorskip(
    "pyarrow", minversion=".".join(map(str, storage.PYARROW_FLOOR)), reason="needs routelog[cloud]"
)
pytest.importorskip("pyarrow.fs", reason="needs routelog[cloud]")
boto3 = pytest.importorskip("boto3")

runner = CliRunner()
BIN = Path(sys.executable).parent
HEALTHY = SAMPLES / "healthy"


def _analyze_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["analyze", *args, "--format", "json", "-k", "2"])
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _without_locations(document: dict[str, Any]) -> dict[str, Any]:
    """The JSON document less the fields that name where the run is."""
    for run in document["runs"]:
        run.pop("path")
    return document


def test_a_bucket_prefix_gives_the_same_json_as_the_directory(store: Store) -> None:
    bucket = _bucket(store.client, "runs")
    _upload(store.client, bucket, "exp/healthy", HEALTHY)
    store.client.put_object(Bucket=bucket, Key="exp/healthy/notes.txt", Body=b"not a log")
    hidden = "exp/healthy/.hidden/step_000001.parquet"
    store.client.put_object(Bucket=bucket, Key=hidden, Body=b"x")
    remote = _analyze_json(f"healthy={store.scheme}://runs/exp/healthy", "--no-cache")
    local = _analyze_json(f"healthy={HEALTHY}", "--no-cache")
    assert remote["runs"][0]["path"] == f"{store.scheme}://runs/exp/healthy"
    assert remote["runs"][0]["ignored_files"] == [f"{store.scheme}://runs/exp/healthy/notes.txt"]
    remote["runs"][0]["ignored_files"] = []
    assert _without_locations(remote) == _without_locations(local)
    assert remote["runs"][0]["files"] == len(list(HEALTHY.glob("*.parquet")))


def test_results_are_byte_for_byte_those_of_the_same_files_on_disk(
    store: Store, tmp_path: Path
) -> None:
    """Parquet, JSONL, gzipped JSONL and .pt in one prefix; the JSON differs only in path."""
    rng = np.random.default_rng(7)
    run = tmp_path / "mixed"
    run.mkdir()
    probs = dirichlet(rng, 64, 8).astype(np.float32)
    pl.DataFrame(
        {"step": [0] * 64, "layer": [0] * 64, "token": list(range(64)), "probs": probs.tolist()}
    ).write_parquet(run / "step_000000.parquet")
    lines = "".join(
        json.dumps({"step": 1, "layer": 0, "token": t, "probs": probs[t].tolist()}) + "\n"
        for t in range(64)
    )
    (run / "step_000001.jsonl").write_text(lines)
    (run / "step_000002.jsonl.gz").write_bytes(
        gzip.compress(lines.replace('"step": 1', '"step": 2').encode())
    )
    torch = pytest.importorskip("torch")
    torch.save({"step": 3, "router_probs": [torch.tensor(probs)]}, run / "step_000003.pt")
    bucket = _bucket(store.client, "mixed")
    _upload(store.client, bucket, "run", run)
    url = f"{store.scheme}://mixed/run"
    remote = runner.invoke(app, ["analyze", f"mixed={url}", "-k", "2", "--format", "json"])
    local = runner.invoke(app, ["analyze", f"mixed={run}", "-k", "2", "--format", "json"])
    assert remote.exit_code == 0, remote.output
    assert local.exit_code == 0, local.output
    assert remote.stdout.replace(json.dumps(url), json.dumps(str(run))) == local.stdout
    payloads = json.loads(remote.stdout)["runs"][0]
    assert payloads["files"] == 4


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    assert locate(f"file://{HEALTHY}") == HEALTHY
    assert locate("file://localhost/tmp/x") == Path("/tmp/x")
    url = _analyze_json(f"h=file://{HEALTHY}", "--no-cache")
    path = _analyze_json(f"h={HEALTHY}", "--no-cache")
    assert url == path


def test_parquet_is_read_by_ranged_requests(store: Store) -> None:
    """One column of one row group of a large object costs a small part of the object
    (counted on S3; on GCS the same reads run, uncounted: see tests/objectstore.py)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    frame = pl.DataFrame(
        {
            "step": np.zeros(200_000, dtype=np.int64),
            "layer": np.repeat(np.arange(4, dtype=np.int32), 50_000),
            "probs": dirichlet(rng, 200_000, 16).astype(np.float32),
        }
    )
    body = frame.to_arrow()
    path = Path("big.parquet")
    pq.write_table(body, path, row_group_size=50_000, compression="none")
    size = path.stat().st_size
    bucket = _bucket(store.client, "ranged")
    store.client.put_object(Bucket=bucket, Key="big.parquet", Body=path.read_bytes())
    remote = locate(f"{store.scheme}://ranged/big.parquet")
    assert isinstance(remote, Remote)
    proxy = store.proxy
    before = proxy.received if proxy else 0
    with storage.open_random(remote) as handle:
        layers = pq.ParquetFile(handle).read_row_group(1, columns=["layer"])
    assert layers["layer"].to_pylist() == [1] * 50_000
    if proxy is not None:
        fetched = proxy.received - before
        assert fetched < size / 20, (fetched, size)
    # a whole analysis fetches the object about once (row group by row group), not more
    before = proxy.received if proxy else 0
    remote_json = _analyze_json(f"{store.scheme}://ranged/big.parquet", "--no-cache")
    if proxy is not None:
        fetched = proxy.received - before
        assert size * 0.9 < fetched < size * 1.2, (fetched, size)
    assert _without_locations(remote_json) == _without_locations(
        _analyze_json(str(path), "--no-cache")
    )


def test_a_missing_bucket_is_one_line(store: Store) -> None:
    result = runner.invoke(app, ["analyze", f"{store.scheme}://no-such-bucket/run"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"routelog: error: {store.scheme}://no-such-bucket/run: cannot read "
        "(no such bucket 'no-such-bucket')"
    ], result.stderr
    assert "Traceback" not in result.output


def test_a_missing_prefix_is_one_line(store: Store) -> None:
    _bucket(store.client, "runs")
    result = runner.invoke(app, ["analyze", f"{store.scheme}://runs/nothing/here"])
    assert result.exit_code == 2, result.output
    assert f"{store.scheme}://runs/nothing/here: no such object or prefix" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unsupported_scheme_is_a_usage_error() -> None:
    result = runner.invoke(app, ["analyze", "ftp://host/run"])
    assert result.exit_code == 2, result.output
    assert "unsupported URL scheme ftp://" in result.stderr


def test_without_the_cloud_extra_a_url_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage, "PYARROW_FLOOR", (999, 0, 0))
    result = runner.invoke(app, ["analyze", "s3://runs/exp"])
    assert result.exit_code == 2, result.output
    assert "pip install 'routelog[cloud]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_changed_object_is_never_served_stale(store: Store, tmp_path: Path) -> None:
    """Same key, same size, new content: the cache entry is not used; unchanged, it is."""
    rng = np.random.default_rng(3)
    bucket = _bucket(store.client, "changing")

    def put(alpha: float) -> None:
        lines = "".join(
            json.dumps({"step": 0, "layer": 0, "probs": [round(float(x), 6) for x in row]}) + "\n"
            for row in dirichlet(rng, 32, 4, alpha)
        )
        store.client.put_object(Bucket=bucket, Key="run/step_000000.jsonl", Body=lines.encode())

    put(1.0)
    first = _analyze_json(f"{store.scheme}://changing/run")
    cache_files = sorted(Path(os.environ["ROUTELOG_CACHE_DIR"]).iterdir())
    again = _analyze_json(f"{store.scheme}://changing/run")
    assert again == first
    assert sorted(Path(os.environ["ROUTELOG_CACHE_DIR"]).iterdir()) == cache_files  # a hit
    put(0.05)
    changed = _analyze_json(f"{store.scheme}://changing/run")
    fresh = _analyze_json(f"{store.scheme}://changing/run", "--no-cache")
    assert changed == fresh
    assert changed["metrics"] != first["metrics"]


def test_a_prefix_with_a_thousand_small_objects(s3: Any) -> None:
    """Listing pages through more than 1,000 keys; every object is read."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket = _bucket(s3, "many")
    # seeded in the server's own store (1,000 PUTs over HTTP would take moto ~15 s);
    # everything routelog does still goes through the server and pyarrow's S3 client
    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    rows = dirichlet(np.random.default_rng(5), 1000, 4)
    for i in range(1000):
        line = json.dumps({"step": i, "layer": 0, "probs": rows[i].round(6).tolist()})
        store.put_object(bucket, f"run/step_{i:06d}.jsonl", line.encode())
    store.put_object(bucket, "run/README.md", b"about")
    assert s3.list_objects_v2(Bucket=bucket, Prefix="run/")["IsTruncated"]  # > 1 page
    # routelog in its own process: the server, in this one, gets this one's interpreter
    command = [str(BIN / "routelog"), "analyze", "s3://many/run", "--no-cache", "-k", "2"]
    done = subprocess.run(
        [*command, "--format", "json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    summary = document["runs"][0]
    assert summary["files"] == 1000
    assert summary["rows"] == 1000
    assert summary["ignored_files"] == ["s3://many/run/README.md"]
    steps = sorted({m["step"] for m in document["metrics"]})
    assert steps == list(range(1000))


def test_inspect_and_check_baseline_take_urls(s3: Any) -> None:
    bucket = _bucket(s3, "runs")
    _upload(s3, bucket, "exp/healthy", HEALTHY)
    inspected = runner.invoke(app, ["inspect", "s3://runs/exp/healthy", "--format", "json"])
    assert inspected.exit_code == 0, inspected.output
    files = json.loads(inspected.stdout)["files"]
    assert files[0]["path"].startswith("s3://runs/exp/healthy/step_")
    checked = runner.invoke(
        app, ["check", str(HEALTHY), "-k", "2", "--baseline", "s3://runs/exp/healthy"]
    )
    assert checked.exit_code in (0, 1), checked.output
    assert "Traceback" not in checked.output


def test_a_bad_object_names_its_url(s3: Any) -> None:
    bucket = _bucket(s3, "bad")
    s3.put_object(Bucket=bucket, Key="run/step_000000.jsonl", Body=b'{"step": 0, "layer": 0}\n')
    s3.put_object(Bucket=bucket, Key="run/step_000001.parquet", Body=b"PAR1 not really")
    result = runner.invoke(app, ["analyze", "s3://bad/run/step_000000.jsonl"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("routelog: error: s3://bad/run/step_000000.jsonl: "), (
        result.stderr
    )
    result = runner.invoke(app, ["analyze", "s3://bad/run/step_000001.parquet"])
    assert result.exit_code == 2, result.output
    assert "s3://bad/run/step_000001.parquet: not a valid Parquet file" in result.stderr


def test_credentials_are_never_printed(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    result = runner.invoke(app, ["analyze", "s3://no-such-bucket/run", "--debug"])
    assert "sekrit-value-123" not in result.output


@pytest.fixture
def enforcing_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto server process that enforces IAM after its first few (setup) requests."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.skip("moto_server is not installed")
    port = free_port()
    env = {**os.environ, **KEYS, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    with serving([str(binary), "-H", "127.0.0.1", "-p", str(port)], port, env):
        yield f"http://127.0.0.1:{port}"


def test_access_denied_is_one_line(enforcing_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = {"endpoint_url": enforcing_server, "region_name": "us-east-1"}
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    s3 = boto3.client("s3", **setup)
    s3.create_bucket(Bucket="locked")
    s3.put_object(Bucket="locked", Key="run/step_000000.parquet", Body=b"PAR1")
    for name, value in {
        "AWS_ENDPOINT_URL": enforcing_server,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["analyze", "s3://locked/run"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "routelog: error: s3://locked/run: cannot read (access denied (check the credentials "
        "in AWS_* or ~/.aws, and the bucket policy))"
    ), result.stderr
    assert key["SecretAccessKey"] not in result.output


def test_storage_is_not_imported_for_help() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from routelog.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
        "assert 'pyarrow' not in sys.modules, 'pyarrow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_spilled_objects_are_removed(store: Store) -> None:
    bucket = _bucket(store.client, "spill")
    store.client.put_object(Bucket=bucket, Key="x/step_000000.pt", Body=b"abc")
    remote = locate(f"{store.scheme}://spill/x/step_000000.pt")
    assert isinstance(remote, Remote)
    with storage.spilled(remote) as local:
        assert local.read_bytes() == b"abc"
        assert local.name == "step_000000.pt"
        directory = local.parent
    assert not directory.exists()
    shutil.rmtree(directory, ignore_errors=True)


def test_dask_workers_read_objects_by_url(s3: Any) -> None:
    """A worker process opens the object itself (by URL, with the environment's credentials)."""
    pytest.importorskip("distributed")
    from routelog import api
    from routelog.executor import open_executor
    from routelog.render import data, report

    bucket = _bucket(s3, "runs")
    _upload(s3, bucket, "exp/healthy", HEALTHY)

    def document(executor: Any) -> str:
        result = api.analyze(["h=s3://runs/exp/healthy"], top_k=2, executor=executor)
        return data.to_json(report.analysis_document(result))

    with open_executor("local:1", 1) as cluster:
        remote = document(cluster)
    assert remote == document(None)


# --- framework layouts in a bucket: sidecars, config.json and routelog.toml as locally ---


def _megatron(base: Path) -> None:
    from tests.ingest.test_megatron_trace import write_trace

    write_trace(base / "run", logits=True, router_state=True)


def _megatron_config_above(base: Path) -> None:
    """No logits: E and k from the model's config.json one prefix above the run."""
    from tests.ingest.test_megatron_trace import write_trace

    write_trace(base / "run", logits=False)
    (base / "config.json").write_text(
        json.dumps({"num_local_experts": 8, "num_experts_per_tok": 2})
    )


def _sglang(base: Path) -> None:
    from tests.ingest.test_sglang import write_stat

    stamps = ["1700000003.5", "1700000001", "1700000002"]  # steps by time stamp, not by key
    write_stat(base / "run", stamps, np.random.default_rng(1))


def _trtllm(base: Path) -> None:
    from tests.ingest.test_trtllm import write_statistics

    write_statistics(base / "run", meta=True)


def _routed_ids(base: Path) -> None:
    """.npy ids, a model config.json above (dense layers, E, k) and a .npy that is no log."""
    from tests.ingest.test_routed_experts import _config, _routing

    run = base / "run"
    run.mkdir(parents=True)
    _config(base)
    rng = np.random.default_rng(4)
    for step in (0, 10):
        np.save(run / f"step_{step:04d}.npy", _routing(rng))
    np.save(run / "embeddings.npy", np.zeros((4, 16), dtype=np.float32))


def _parquet_with_run_config(base: Path) -> None:
    """k stated by the run's routelog.toml at its prefix (no -k given)."""
    shutil.copytree(HEALTHY, base / "run")
    (base / "run" / "routelog.toml").write_text("top_k = 2\n")


LAYOUTS = {
    "megatron": _megatron,
    "megatron-config-above": _megatron_config_above,
    "sglang": _sglang,
    "trtllm": _trtllm,
    "routed-ids": _routed_ids,
    "run-config": _parquet_with_run_config,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_framework_layout_in_a_bucket_reads_as_in_a_directory(
    store: Store, tmp_path: Path, layout: str
) -> None:
    """The JSON of the bucket run is the directory's, but for where it is."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    base = tmp_path / "base"
    LAYOUTS[layout](base)
    bucket = _bucket(store.client, "layouts")
    _upload(store.client, bucket, layout, base)
    url = f"{store.scheme}://layouts/{layout}"
    remote = runner.invoke(app, ["analyze", f"run={url}/run", "--format", "json", "--no-cache"])
    local = runner.invoke(app, ["analyze", f"run={base}/run", "--format", "json", "--no-cache"])
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout.replace(str(base), url)
    if layout == "run-config":  # k's source is named by its URL in the report
        table = runner.invoke(app, ["analyze", f"{url}/run", "--no-cache", "--width", "200"])
        assert f"k=2 (top_k in {url}/run/routelog.toml)" in table.stdout, table.stdout
    inspected = runner.invoke(app, ["inspect", f"{url}/run", "--format", "json"])
    assert inspected.exit_code == 0, inspected.output
    locally = runner.invoke(app, ["inspect", f"{base}/run", "--format", "json"])
    assert inspected.stdout == locally.stdout.replace(str(base), url)


def test_errors_in_a_layout_name_the_objects_by_url(store: Store, tmp_path: Path) -> None:
    """A bad config.json one prefix above, a sidecar shorter than its offsets: the one-line
    error is the local one, naming the object at fault by its URL."""
    pytest.importorskip("torch")
    from tests.ingest.test_megatron_trace import write_trace

    base = tmp_path / "base"
    write_trace(base / "above" / "run", logits=False)
    (base / "above" / "config.json").write_text("[1, 2]")
    write_trace(base / "cut", logits=True)
    logits = base / "cut" / "logits_rank1.bin"
    logits.write_bytes(logits.read_bytes()[:100])
    _upload(store.client, _bucket(store.client, "errors"), "x", base)
    url = f"{store.scheme}://errors/x"
    cases = (
        ("above/run", f"{url}/above/config.json: "),
        ("cut", f"{url}/cut/router_trace_rank1.jsonl:1: "),
    )
    for run, named in cases:
        remote = runner.invoke(app, ["analyze", f"{url}/{run}", "--no-cache"])
        local = runner.invoke(app, ["analyze", f"{base}/{run}", "--no-cache"])
        assert remote.exit_code == local.exit_code == 2, remote.output
        assert remote.stderr == local.stderr.replace(str(base), url)
        assert len(remote.stderr.strip().splitlines()) == 1
        assert named in remote.stderr, remote.stderr


def test_a_changed_sidecar_in_a_bucket_is_never_served_stale(store: Store, tmp_path: Path) -> None:
    """The cache keys a framework file by its sidecars' and config.json's ETags too."""
    pytest.importorskip("torch")
    from tests.ingest.test_megatron_trace import write_trace

    bucket = _bucket(store.client, "sidecars")
    write_trace(tmp_path / "a", logits=True, seed=3)
    write_trace(tmp_path / "b", logits=True, seed=4)
    _upload(store.client, bucket, "run", tmp_path / "a")
    first = _analyze_json(f"{store.scheme}://sidecars/run")
    assert _analyze_json(f"{store.scheme}://sidecars/run") == first
    logits = (tmp_path / "b" / "logits_rank0.bin").read_bytes()
    store.client.put_object(Bucket=bucket, Key="run/logits_rank0.bin", Body=logits)
    changed = _analyze_json(f"{store.scheme}://sidecars/run")
    assert changed == _analyze_json(f"{store.scheme}://sidecars/run", "--no-cache")
    assert changed["metrics"] != first["metrics"]


def test_spilled_layouts_are_removed(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is left in the temporary directory once a bucket's framework layout is read."""
    pytest.importorskip("torch")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    _megatron(tmp_path / "base")
    _upload(s3, _bucket(s3, "layouts"), "cleaned", tmp_path / "base")
    result = runner.invoke(app, ["analyze", "s3://layouts/cleaned/run", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert list(scratch.iterdir()) == []


def test_an_object_replaced_while_analyze_reads_it_is_one_line(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaced between two ranged reads: one line naming it, exit 2, nothing cached."""
    from routelog.ingest import parquet

    bucket = _bucket(store.client, "replacing")
    store.client.put_object(
        Bucket=bucket,
        Key="run/step_000000.parquet",
        Body=(HEALTHY / "step_000000.parquet").read_bytes(),
    )
    scan = parquet.scan

    def replace_midway(path: Path, *args: Any, **kwargs: Any) -> Any:
        for batch in scan(path, *args, **kwargs):
            other = (HEALTHY / "step_000100.parquet").read_bytes()
            store.client.put_object(Bucket=bucket, Key="run/step_000000.parquet", Body=other)
            yield batch

    monkeypatch.setattr(parquet, "scan", replace_midway)
    cache = Path(os.environ["ROUTELOG_CACHE_DIR"])
    before = sorted(cache.iterdir()) if cache.exists() else []
    url = f"{store.scheme}://replacing/run"
    result = runner.invoke(app, ["analyze", url, "-k", "2"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"routelog: error: {url}/step_000000.parquet: the object changed while it was read "
        "(nothing of it was used; read it again)\n"
    )
    assert (sorted(cache.iterdir()) if cache.exists() else []) == before
    monkeypatch.setattr(parquet, "scan", scan)
    assert _analyze_json(url)["runs"][0]["files"] == 1  # read again: the new version
