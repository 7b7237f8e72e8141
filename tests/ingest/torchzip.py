"""Hand-made torch.save files: a pickle assembler and the zip layout torch writes.

The tests of the .pt reader need files torch would never write (a BUILD on a storage, a memo
index of 2^28, a zip bomb), so this writes ``data.pkl`` opcode by opcode and lays the archive
out as ``torch.save`` does: ``archive/data.pkl``, ``archive/byteorder``, ``archive/data/<key>``
(stored), ``archive/version``. Used by ``tests/ingest/test_pt.py``, the fuzzing tests and
``tests/corpus/make_corpus.py``; needs neither torch nor routelog.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

REBUILD = ("torch._utils", "_rebuild_tensor_v2")


class Pickle:
    """A protocol-2 pickle built one opcode at a time; each method returns ``self``."""

    def __init__(self, *, legacy: bool = False) -> None:
        self.data = bytearray(pickle.PROTO + b"\x02")
        self.legacy = legacy  # persistent ids as the pre-zip format writes them

    def raw(self, code: bytes) -> Pickle:
        self.data += code
        return self

    def mark(self) -> Pickle:
        return self.raw(pickle.MARK)

    def text(self, value: str) -> Pickle:
        encoded = value.encode()
        return self.raw(pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded)

    def int(self, value: int) -> Pickle:
        if -(1 << 31) <= value < 1 << 31:
            return self.raw(pickle.BININT + struct.pack("<i", value))
        encoded = pickle.encode_long(value)
        return self.raw(pickle.LONG1 + bytes([len(encoded)]) + encoded)

    def ints(self, values: tuple[int, ...]) -> Pickle:
        self.mark()
        for value in values:
            self.int(value)
        return self.raw(pickle.TUPLE)

    def global_(self, module: str, name: str) -> Pickle:
        return self.raw(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def put(self, index: int) -> Pickle:
        if index < 256:
            return self.raw(pickle.BINPUT + bytes([index]))
        return self.raw(pickle.LONG_BINPUT + struct.pack("<I", index))

    def get(self, index: int) -> Pickle:
        if index < 256:
            return self.raw(pickle.BINGET + bytes([index]))
        return self.raw(pickle.LONG_BINGET + struct.pack("<I", index))

    def storage(self, key: str, numel: int, kind: str = "FloatStorage") -> Pickle:
        """Push the persistent id torch writes for a storage (``BINPERSID``); the legacy
        format adds a sixth item, ``view_metadata`` (None)."""
        self.mark().text("storage").global_("torch", kind).text(key).text("cpu").int(numel)
        if self.legacy:
            self.raw(pickle.NONE)  # view_metadata
        return self.raw(pickle.TUPLE + pickle.BINPERSID)

    def tensor_call(self) -> Pickle:
        """Push ``_rebuild_tensor_v2`` and a MARK: then push storage, offset, size, stride
        and finish with :meth:`tensor_args`."""
        return self.global_(*REBUILD).mark()

    def tensor_args(self, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> Pickle:
        self.int(offset).ints(size).ints(stride)
        self.raw(pickle.NEWFALSE).global_("collections", "OrderedDict")
        return self.raw(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)

    def tensor(
        self,
        key: str,
        numel: int,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        kind: str = "FloatStorage",
    ) -> Pickle:
        """Push one tensor, as torch pickles it."""
        return self.tensor_call().storage(key, numel, kind).tensor_args(offset, size, stride)

    def done(self) -> bytes:
        return bytes(self.data + pickle.STOP)


def contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def router_pickle(
    layers: int,
    tokens: int,
    experts: int,
    step: int | None = 1,
    key: str = "router_logits",
    *,
    legacy: bool = False,
) -> Pickle:
    """``{"step": step, key: (t0, ..., tL-1)}``, layer i in storage ``str(i)``, float32."""
    p = Pickle(legacy=legacy).raw(pickle.EMPTY_DICT).mark()
    if step is not None:
        p.text("step").int(step)
    p.text(key).mark()
    for layer in range(layers):
        p.tensor(str(layer), tokens * experts, 0, (tokens, experts), (experts, 1))
    return p.raw(pickle.TUPLE + pickle.SETITEMS)


def write(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes],
    *,
    compress: bool = False,
    compress_pickle: bool = False,
    extra: list[tuple[str, bytes]] | None = None,
) -> Path:
    """A zip laid out like torch.save's: ``archive/data.pkl``, byteorder, data/KEY, version
    (every member stored, as torch does, unless ``compress``; ``compress_pickle`` deflates
    only data.pkl, to keep long hostile pickles small)."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        pickle_method = zipfile.ZIP_DEFLATED if compress or compress_pickle else method
        archive.writestr(member("archive/data.pkl", pickle_method), data_pkl)
        archive.writestr(member("archive/byteorder", method), "little")
        for key, data in storages.items():
            archive.writestr(member(f"archive/data/{key}", method), data)
        archive.writestr(member("archive/version", method), "3\n")
        for name, data in extra or []:
            archive.writestr(member(name, method), data)
    return path


def member(name: str, method: int = zipfile.ZIP_STORED) -> zipfile.ZipInfo:
    """A zip entry with a fixed date, so that the files written are the same on every run."""
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = method
    info.external_attr = 0o644 << 16
    return info


LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}


def write_legacy(
    path: Path,
    object_pkl: bytes,
    storages: dict[str, bytes],
    *,
    itemsize: int = 4,
    counts: dict[str, int] | None = None,
    keys: list[str] | None = None,
    header: list[bytes] | None = None,
) -> Path:
    """A file laid out like ``torch.save(..., _use_new_zipfile_serialization=False)``: the
    magic number, protocol version and system info pickles (``header`` replaces them), the
    object's pickle (built with ``Pickle(legacy=True)``), the list of storage ``keys``, then
    per key an int64 element count (``counts`` overrides it) and the storage's bytes."""
    keys = list(storages) if keys is None else keys
    parts = header or [
        pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps(LEGACY_SYS_INFO, protocol=2),
    ]
    parts += [object_pkl, pickle.dumps(keys, protocol=2)]
    for key in keys:
        data = storages.get(key, b"")
        count = (counts or {}).get(key, len(data) // itemsize)
        parts += [struct.pack("<q", count), data]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts))
    return path
