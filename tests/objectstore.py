"""Object-storage servers for the tests, started on 127.0.0.1 by the suite: moto's S3 server
(behind a counting proxy, so a test can tell how many bytes routelog fetched without trusting
routelog's own account).

Test modules import the fixtures they use (``from tests.objectstore import s3, s3_server``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def s3_server() -> Iterator[CountingProxy]:
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
