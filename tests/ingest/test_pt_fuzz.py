"""Property-based fuzzing of the .pt reader: pickles, zip layouts, mutated files.

For every generated file, ``routelog analyze FILE`` either exits 0 with every metric in its
range, or exits 2 with exactly one line on stderr; never a traceback, exit 70, more than
256 MiB of Python/numpy allocations, or a run of more than 60 s. The default run is short (a
few hundred examples, for ``make test``); ``ROUTELOG_FUZZ=long`` selects the ``fuzz``
hypothesis profile of ``tests/conftest.py`` (what ``make fuzz`` runs).
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
import tempfile
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from routelog.cli import app
from tests.ingest import torchzip
from tests.ingest.torchzip import Pickle
from tests.ranges import assert_metrics_in_range

runner = CliRunner()

LONG = os.environ.get("ROUTELOG_FUZZ") == "long"
MEMORY_BOUND = 256 << 20
TIME_BOUND = 60.0
T, E = 8, 4


def _examples(short: int) -> int:
    """``short`` examples in make test; the loaded profile's count under ROUTELOG_FUZZ=long."""
    return settings().max_examples if LONG else short


FUZZ = settings(
    max_examples=_examples(80),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _storages(layers: int = 2) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {str(i): rng.standard_normal(T * E).astype("<f4").tobytes() for i in range(layers)}


SKELETON = torchzip.router_pickle(2, T, E).done()


def _analyze(data: bytes, name: str = "step_1.pt") -> None:
    """Write ``data`` as a file and check the CLI's outcome against the contract."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_bytes(data)
        tracemalloc.start()
        start = time.monotonic()
        try:
            result = runner.invoke(app, ["analyze", str(path), "--no-cache", "--format", "json"])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        elapsed = time.monotonic() - start
        assert path.read_bytes() == data, "the reader modified its input"
    assert elapsed < TIME_BOUND, elapsed
    assert peak < MEMORY_BOUND, peak
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("routelog: error: "), lines[0]
    else:
        assert_metrics_in_range(json.loads(result.stdout))


def _file(data_pkl: bytes, *, compress: bool = False) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = torchzip.write(Path(directory) / "f.pt", data_pkl, _storages(), compress=compress)
        return path.read_bytes()


# --- mutated valid files -----------------------------------------------------------------

_mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.floats(0, 1, exclude_max=True),
    st.binary(min_size=1, max_size=8),
)


LEGACY_SKELETON = torchzip.router_pickle(2, T, E, legacy=True).done()


def _legacy_file() -> bytes:
    """The skeleton in the pre-zip format (`_use_new_zipfile_serialization=False`)."""
    with tempfile.TemporaryDirectory() as directory:
        path = torchzip.write_legacy(Path(directory) / "f.pt", LEGACY_SKELETON, _storages())
        return path.read_bytes()


@FUZZ
@given(
    st.sampled_from(["stored", "deflated", "legacy"]), st.lists(_mutation, min_size=1, max_size=6)
)
def test_mutated_files(layout: str, mutations: list[tuple[str, float, bytes]]) -> None:
    if layout == "legacy":
        data = bytearray(_legacy_file())
    else:
        data = bytearray(_file(SKELETON, compress=layout == "deflated"))
    for kind, where, value in mutations:
        if not data:
            break
        at = int(where * len(data))
        if kind == "flip":
            data[at] ^= value[0] or 1
        elif kind == "set":
            data[at : at + len(value)] = value
        elif kind == "insert":
            data[at:at] = value
        elif kind == "delete":
            del data[at : at + len(value)]
        else:
            del data[at:]
    _analyze(bytes(data))


# --- pickles: random opcodes around a valid skeleton -------------------------------------


def _snippets(data: bytes) -> list[bytes]:
    """``data`` cut at opcode boundaries."""
    starts = [pos for _, _, pos in pickletools.genops(data)]
    return [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]


_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "FloatStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("collections", "OrderedDict"),
    ("builtins", "eval"),
    ("torch", "Tensor"),
]
_TEXT = ["storage", "0", "1", "cpu", "step", "router_logits", "probs", "top_k", "layers.3"]
_BARE = [bytes([op]) for op in b"b02(1sueat)]}RQ\x85\x86\x87\x88\x89N\x94\x8f\x90\x91"]
_huge = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**80), 2**80),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**12]),
)
_shape = st.lists(_huge, min_size=0, max_size=4).map(tuple)


def _int(value: int) -> bytes:
    return bytes(Pickle().int(value).data[2:])


def _tensor(key: str, numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    try:
        return bytes(Pickle().tensor(key, numel, offset, size, stride).data[2:])
    except (OverflowError, struct.error):
        return b"N"


_snippet = st.one_of(
    st.sampled_from(_BARE),
    st.integers(0, 255).map(lambda i: pickle.BINGET + bytes([i])),
    st.integers(0, 255).map(lambda i: pickle.BINPUT + bytes([i])),
    st.integers(0, 2**32 - 1).map(lambda i: pickle.LONG_BINPUT + struct.pack("<I", i)),
    st.integers(0, 2**32 - 1).map(lambda i: pickle.LONG_BINGET + struct.pack("<I", i)),
    _huge.map(_int),
    st.sampled_from(_GLOBALS).map(lambda g: pickle.GLOBAL + f"{g[0]}\n{g[1]}\n".encode()),
    st.sampled_from(_TEXT).map(lambda t: bytes(Pickle().text(t).data[2:])),
    st.builds(
        _tensor,
        st.sampled_from(["0", "1", "2", "../0"]),
        st.one_of(st.just(T * E), _huge),
        _huge,
        _shape,
        _shape,
    ),
    st.binary(max_size=9),
)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["insert", "replace", "delete"]), st.floats(0, 1), _snippet),
        min_size=1,
        max_size=8,
    )
)
def test_pickles_around_a_skeleton(edits: list[tuple[str, float, bytes]]) -> None:
    snippets = _snippets(SKELETON)
    body, stop = snippets[1:-1], snippets[-1]  # keep PROTO first and STOP last
    for kind, where, snippet in edits:
        at = min(int(where * len(body)), len(body) - 1) if body else 0
        if kind == "insert" or not body:
            body.insert(at, snippet)
        elif kind == "replace":
            body[at] = snippet
        else:
            del body[at]
    _analyze(_file(snippets[0] + b"".join(body) + stop))


# --- zip layouts ---------------------------------------------------------------------------

_NAMES = [
    "archive/data.pkl",
    "archive/byteorder",
    "archive/data/0",
    "archive/data/1",
    "archive/version",
    "other/data.pkl",
    "archive/data/",
]
_member = st.tuples(
    st.sampled_from(_NAMES),
    st.sampled_from(["right", "short", "long", "empty", "garbage", "big-endian"]),
    st.booleans(),
)


def _content(name: str, kind: str, storages: dict[str, bytes]) -> bytes:
    if name.endswith("data.pkl"):
        right = SKELETON
    elif name.endswith("byteorder"):
        right = b"big" if kind == "big-endian" else b"little"
    else:
        right = storages.get(name.rsplit("/", 1)[-1], b"3\n")
    return {
        "right": right,
        "big-endian": right,
        "short": right[: len(right) // 2],
        "long": right + right,
        "empty": b"",
        "garbage": b"\x80\x02\xff" + bytes(range(40)),
    }[kind]


@FUZZ
@given(
    st.lists(_member, min_size=1, max_size=8),
    st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
)
def test_zip_layouts(members: list[tuple[str, str, bool]], cut: float | None) -> None:
    storages = _storages()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "z.pt"
        with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
            warnings.simplefilter("ignore")  # duplicate names are part of the fuzzing
            for name, kind, deflate in members:
                method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = method
                with archive.open(info, "w") as stream:
                    stream.write(_content(name, kind, storages))
        data = path.read_bytes()
    if cut is not None:
        data = data[: int(cut * len(data))]
    _analyze(data)
