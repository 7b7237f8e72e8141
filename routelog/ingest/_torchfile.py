"""Read what ``torch.save`` writes, without torch and without running code from the file.

``torch.save`` writes a zip archive: ``<archive>/data.pkl`` is a pickle of the saved object in
which every tensor is a call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` and every storage a persistent id ``("storage", torch.FloatStorage, key, location,
numel)`` whose bytes are the uncompressed member ``<archive>/data/<key>``;
``<archive>/byteorder`` says ``little`` or ``big``.

The pickle is untrusted input, read in three guarded steps:

1. **Scan.** Every opcode of ``data.pkl`` is parsed (``pickletools``) before anything is built:
   opcodes that need the extension registry, out-of-band buffers or protocol-0 class calls are
   refused, every length an opcode claims must fit in the pickle, and no memo index may exceed
   the number of opcodes (so the C unpickler never sizes its memo, or a bytes object, from a
   claim).
2. **Unpickle.** ``find_class`` admits only the tensor rebuilders, the storage classes and
   ``collections.OrderedDict`` (the empty backward hooks torch pickles with each tensor), each
   mapped to routelog's own stand-in rather than to torch; any other global (``os.system``, a
   custom class) is refused when the pickle names it, before anything could call it. The
   stand-ins are immutable to the pickle: ``BUILD`` (``__setstate__``), item assignment and
   appends on them are refused, so a storage's length or a tensor's view cannot be rewritten
   after it was checked. A tensor is only a record (storage, offset, shape, stride), checked
   when it is created, in Python integers, against the storage's declared length; identical
   records are one object, and all records together may not claim more elements than a bound
   tied to the file's size.
3. **Materialise.** Each storage is mapped once, only as far as its views reach: a view of a
   read-only memory map of the file when the member is stored (strides and offsets honoured,
   no copy), or inflated into a buffer of exactly that many bytes when it is deflated, within
   a budget proportional to the file's size (zip bombs). bfloat16, which numpy lacks, becomes
   float32.

The pre-zip ("legacy") format, ``torch.save(..., _use_new_zipfile_serialization=False)``, is
three small pickles (a magic number, the protocol version 1001, a dict of the writer's byte
order and type sizes), the pickle of the object (its storages are persistent ids
``("storage", torch.FloatStorage, key, location, numel, None)``), a pickle of the list of
storage keys, then each storage in that order: an int64 element count and its bytes. It goes
through the same three steps, by :class:`_Legacy`: every pickle is scanned and bounded before
it is read, the header pickles may hold nothing but plain values, and each storage's count is
checked against the one its persistent id declares and, with its bytes, against the file's real
size before the bytes are mapped. torch is never imported.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import mmap
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from routelog.errors import InputError, UnsafeFileError

TENSOR_REBUILDERS = ("_rebuild_tensor_v2", "_rebuild_tensor")
"""Functions of ``torch._utils`` a tensor pickles as; routelog's ``_Rebuilder`` stands in."""

STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",  # raw bits; widened to float32 when a tensor is rebuilt
    "DoubleStorage": "f8",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
"""How a pre-zip torch file starts: protocol 2, then the magic number 0x1950a86a20f9469cfc6c."""
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

MAX_PICKLE_BYTES = 4 << 20
"""Largest ``data.pkl`` read; a router dump's is a few kilobytes (tensors are other members)."""
MAX_OPCODES = 1 << 19
"""Most opcodes in ``data.pkl``; each builds at most one object, so this bounds what the
pickle can make routelog allocate (about 100 bytes an object; a dump of 1024 layers has
about 60,000 opcodes)."""
INFLATE_FLOOR = 64 << 20
INFLATE_RATIO = 32
"""The deflated members of a file inflate to at most max(INFLATE_FLOOR, INFLATE_RATIO x the
file's size) bytes in all; torch.save never compresses, so only a re-zipped file inflates."""
VIEW_FLOOR = 1 << 24
VIEW_RATIO = 16
"""The distinct tensors of a file hold at most max(VIEW_FLOOR, VIEW_RATIO x the file's size in
bytes) elements in all: stride-0 broadcasts and overlapping views cannot claim 10^12 values."""
MAX_DIMS = 32
MAX_DEPTH = 64
"""Deepest nesting of containers accepted (a router dump nests three or four levels)."""
REFUSED_OPCODES = frozenset(
    {"INST", "OBJ", "PERSID", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
)
"""Opcodes torch.save never writes and routelog does not run: protocol-0 class calls, text
persistent ids, the copyreg extension registry, out-of-band buffers."""
INT64_LIMIT = 1 << 63

_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})
_OPCODE_TABLE: list[tuple[str, int, bool] | None] = [None] * 256
for _op in pickletools.opcodes:  # (name, argument width or kind, needs a look) by first byte
    _OPCODE_TABLE[ord(_op.code)] = (
        _op.name,
        _op.arg.n if _op.arg is not None else 0,
        _op.name in REFUSED_OPCODES or _op.name in _MEMO_OPCODES or _op.name == "STOP",
    )
_COUNT_BYTES = {
    pickletools.TAKEN_FROM_ARGUMENT1: 1,
    pickletools.TAKEN_FROM_ARGUMENT4: 4,
    pickletools.TAKEN_FROM_ARGUMENT4U: 4,
    pickletools.TAKEN_FROM_ARGUMENT8U: 8,
}
_SIGNED4 = pickletools.TAKEN_FROM_ARGUMENT4
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.]{1,64}$")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths
_READ_CHUNK = 1 << 20
_SCALARS = frozenset({int, float, str, bytes, bool, type(None), complex})


def load(path: Path) -> Any:
    """The object saved in a .pt file, with tensors as numpy arrays.

    Raises ``UnsafeFileError`` when the pickle names anything but tensors and plain
    containers or tries to alter routelog's stand-ins, and ``InputError`` when the file is not
    a torch file, cannot be read, or claims more than its size allows.
    """
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with path.open("rb") as stream:
        head = stream.read(len(LEGACY_MAGIC))
    if head == LEGACY_MAGIC:
        return _load_legacy(path)
    if head.startswith(b"PK\x03\x04"):
        raise InputError(
            f"{path}: truncated or corrupt zip archive (a torch.save file still being "
            "written, or cut short by a copy?)"
        )
    raise InputError(f"{path}: not a PyTorch file (neither a torch.save zip archive nor legacy)")


class _Refused(Exception):
    """A pickle tried to alter one of routelog's stand-ins (its message says which)."""


class _Immutable:
    """Base of the stand-ins: the pickle cannot set their state, items or attributes."""

    __slots__ = ()
    _WHAT = "object"

    def __setstate__(self, state: object) -> None:
        raise _Refused(
            f"refused to set the state of a {self._WHAT} (pickle BUILD; nothing was run)"
        )


class _StorageType(_Immutable):
    """Stands in for ``torch.FloatStorage`` & co. inside a persistent id; not callable."""

    __slots__ = ("dtype", "name")
    _WHAT = "storage type"

    def __init__(self, name: str, dtype: np.dtype[Any]) -> None:
        self.name = name
        self.dtype = dtype


class _Storage(_Immutable):
    """One storage as its persistent id declares it: member key, dtype, element count."""

    __slots__ = ("bfloat16", "dtype", "key", "numel")
    _WHAT = "storage"

    def __init__(self, key: str, dtype: np.dtype[Any], numel: int, bfloat16: bool) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.bfloat16 = bfloat16


class _Tensor(_Immutable):
    """A checked view record; becomes a numpy array once the pickle is fully read."""

    __slots__ = ("end", "offset", "shape", "storage", "strides")
    _WHAT = "tensor"

    def __init__(
        self,
        storage: _Storage,
        offset: int,
        shape: tuple[int, ...],
        strides: tuple[int, ...],
        end: int,
    ) -> None:
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.strides = strides
        self.end = end  # elements of the storage the view needs (0 when empty)


class _Rebuilder(_Immutable):
    """``torch._utils._rebuild_tensor_v2``: checks a view and returns its ``_Tensor``."""

    __slots__ = ("_unpickler",)
    _WHAT = "tensor rebuilder"

    def __init__(self, unpickler: _RestrictedUnpickler) -> None:
        self._unpickler = unpickler

    def __call__(
        self, storage: object, offset: object, size: object, stride: object, *_: object
    ) -> _Tensor:
        if not isinstance(storage, _Storage):
            raise ValueError("malformed tensor record (no storage)")
        if not (
            _is_int(offset)
            and isinstance(size, tuple | list)
            and isinstance(stride, tuple | list)
            and len(size) == len(stride)
        ):
            raise ValueError("malformed tensor record")
        if len(size) > MAX_DIMS:
            raise ValueError(f"tensor of {len(size)} dimensions (at most {MAX_DIMS})")
        assert isinstance(offset, int)
        numbers = (offset, *size, *stride)
        if not all(_is_int(n) for n in numbers):
            raise ValueError("malformed tensor record (a size or stride is not an integer)")
        if not all(0 <= n < INT64_LIMIT for n in numbers):
            raise ValueError("tensor offset, size or stride negative or beyond int64")
        shape = tuple(int(n) for n in size)
        strides = tuple(int(s) for s in stride)
        end = 0
        if 0 not in shape:  # Python integers: no overflow, whatever the pickle claims
            end = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
            if end > storage.numel:
                raise ValueError(
                    f"tensor reaches element {end - 1} of a storage of {storage.numel}"
                )
        return self._unpickler.tensor(_Tensor(storage, offset, shape, strides, end))


def _printable(text: str) -> str:
    """A name from the file, shortened, its control characters escaped (no terminal codes)."""
    text = text[:80]
    return text if text.isprintable() else repr(text)[1:-1]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(n: int) -> str:
    """A byte count for people: 512 bytes, 64.0 MiB."""
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _scan(data: bytes, path: Path, what: str = "data.pkl") -> int:
    """Walk every opcode before anything is built: refused opcodes, arguments that claim more
    bytes than the pickle holds, memo indices beyond the opcode count.

    The C unpickler allocates what an opcode claims (a BINBYTES8 of 2^40 bytes, a memo of
    2^28 slots) before it finds the data missing; after this scan every claim is bounded by
    the pickle's own length. Returns the length of the pickle (up to its STOP); ``what``
    names it in messages.
    """
    end = len(data)
    pos = count = 0
    highest = -1
    table = _OPCODE_TABLE
    stopped = False
    while pos < end:
        entry = table[data[pos]]
        if entry is None:
            raise InputError(f"{path}: {what} holds an unknown pickle opcode at byte {pos}")
        name, width, special = entry
        pos += 1
        count += 1
        if count > MAX_OPCODES:
            raise InputError(
                f"{path}: {what} holds more than {MAX_OPCODES} opcodes "
                "(routelog reads router dumps, not arbitrary pickles)"
            )
        start = pos
        if width >= 0:
            pos += width
        elif width == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if name == "GLOBAL" else 1):
                newline = data.find(b"\n", pos)
                pos = end + 1 if newline < 0 else newline + 1
        else:
            size = _COUNT_BYTES[width]
            length = int.from_bytes(data[pos : pos + size], "little", signed=width == _SIGNED4)
            pos += size + max(length, 0)
            if length < 0 or pos > end:
                raise InputError(
                    f"{path}: {what}: {name} at byte {start - 1} claims {length} bytes, "
                    f"more than the pickle's {end} (truncated or forged)"
                )
        if special:
            if name in REFUSED_OPCODES:
                raise UnsafeFileError(
                    f"{path}: refused pickle opcode {name} in {what} "
                    "(torch.save never writes it; nothing was run)"
                )
            if name == "STOP":
                stopped = True
                break
            highest = max(highest, _memo_index(name, data[start:pos]))
    if not stopped or pos > end:
        raise InputError(f"{path}: {what} ends before its STOP opcode (truncated)")
    if highest >= count:
        raise InputError(
            f"{path}: {what} names memo entry {highest} but holds only {count} opcodes"
        )
    return pos


def _memo_index(name: str, arg: bytes) -> int:
    """The index of a memo opcode's argument: 1 or 4 bytes, or decimal digits and a newline."""
    if name not in ("PUT", "GET"):
        return int.from_bytes(arg, "little")
    digits = arg.strip()
    return int(digits) if digits.isdigit() and len(digits) <= 20 else INT64_LIMIT


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: tensor records, storages and plain containers, nothing else."""

    def __init__(self, data: bytes, archive: _Archive | _Legacy) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._rebuilder = _Rebuilder(self)
        self._storages: dict[str, _Storage] = {}
        self.tensors: dict[tuple[str, int, tuple[int, ...], tuple[int, ...]], _Tensor] = {}
        self._elements = 0
        self._element_budget = max(VIEW_FLOOR, VIEW_RATIO * archive.size)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in TENSOR_REBUILDERS:
            return self._rebuilder
        if module == "torch" and name in STORAGE_DTYPES:
            dtype = np.dtype(STORAGE_DTYPES[name]).newbyteorder(self._archive.byteorder)
            return _StorageType(name, dtype)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        # protocol 2 pickles name Python 3 globals by their Python 2 names; report the former
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        raise UnsafeFileError(
            f"{self._archive.path}: refused to load global {_printable(module)}.{_printable(name)} "
            "(routelog reads only tensors and plain containers from .pt files; nothing was run)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and (len(pid) == 5 or (len(pid) == 6 and pid[5] is None))  # 6: legacy format
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_int(pid[4])
        ):
            # never repr(pid): a pickle can make its repr exponentially long
            raise ValueError(f"unexpected persistent id (a {type(pid).__name__})")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not 0 <= numel < INT64_LIMIT:
            raise ValueError(f"storage {key[:64]!r} declares {numel} elements")
        known = self._storages.get(key)
        if known is not None:
            if known.dtype != storage_type.dtype or known.numel != numel:
                raise ValueError(
                    f"storage {key!r} declared twice, as {known.numel} x {known.dtype.name} "
                    f"and as {numel} x {storage_type.dtype.name}"
                )
            return known
        self._archive.check_storage(key, storage_type.dtype, numel)
        storage = _Storage(key, storage_type.dtype, numel, storage_type.name == "BFloat16Storage")
        self._storages[key] = storage
        return storage

    def tensor(self, record: _Tensor) -> _Tensor:
        """The one record of this view (identical views are one object), within the budget."""
        key = (record.storage.key, record.offset, record.shape, record.strides)
        known = self.tensors.get(key)
        if known is not None:
            return known
        self._elements += math.prod(record.shape)
        if self._elements > self._element_budget:
            raise InputError(
                f"{self._archive.path}: tensors claim more than {self._element_budget} elements "
                f"in all, beyond what a file of {_size(self._archive.size)} can hold "
                "(stride-0 or overlapping views)"
            )
        self.tensors[key] = record
        return record


class _Archive:
    """The members of a torch zip archive, checked against the file's real size."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, size: int) -> None:
        self.path = path
        self.size = size
        self._zip = archive
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise InputError(f"{path}: a zip file, but not one torch.save wrote (no data.pkl)")
        if len(pickles) > 1:
            shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
            raise InputError(
                f"{path}: holds {len(pickles)} data.pkl members ({shown}); "
                "a torch.save file has exactly one"
            )
        self._counts = collections.Counter(names)
        self.prefix = pickles[0][: -len("data.pkl")]
        self._inflated = 0
        self._inflate_budget = max(INFLATE_FLOOR, INFLATE_RATIO * size)
        self.byteorder: Literal["<", ">"] = "<"
        if f"{self.prefix}byteorder" in archive.NameToInfo:
            raw = self._read(self._member(f"{self.prefix}byteorder"), 16)
            order = raw.decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise InputError(f"{path}: unknown byteorder {order[:16]!r}")
            self.byteorder = "<" if order == "little" else ">"
        self._map: mmap.mmap | None = None

    def _member(self, name: str) -> zipfile.ZipInfo:
        if self._counts[name] > 1:
            raise InputError(f"{self.path}: member {name} appears {self._counts[name]} times")
        member = self._zip.getinfo(name)
        if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(
                f"{self.path}: member {name} uses zip compression method "
                f"{member.compress_type}; routelog reads stored or deflated members"
            )
        return member

    def pickle_bytes(self) -> bytes:
        member = self._member(f"{self.prefix}data.pkl")
        if member.file_size > MAX_PICKLE_BYTES:
            raise InputError(
                f"{self.path}: data.pkl is {_size(member.file_size)} "
                f"(routelog reads at most {_size(MAX_PICKLE_BYTES)})"
            )
        data = self._read(member, member.file_size)
        if len(data) != member.file_size:
            raise InputError(f"{self.path}: data.pkl is shorter than its zip entry says")
        return data

    def _read(self, member: zipfile.ZipInfo, n: int) -> bytes:
        """At most ``n`` bytes of a member, charged to the inflation budget if compressed."""
        self._charge(member, n)
        with self._zip.open(member) as stream:
            return stream.read(n)

    def _charge(self, member: zipfile.ZipInfo, n: int) -> None:
        if member.compress_type == zipfile.ZIP_STORED:
            return
        self._inflated += n
        if self._inflated > self._inflate_budget:
            raise InputError(
                f"{self.path}: compressed member expands beyond {_size(self._inflate_budget)} "
                f"({member.filename} would inflate to {_size(n)} from "
                f"{_size(member.compress_size)}; a zip bomb?)"
            )

    def check_storage(self, key: str, dtype: np.dtype[Any], numel: int) -> None:
        """The member of ``key`` exists and can hold ``numel`` values; stored ones in the file."""
        name = f"{self.prefix}data/{key}"
        if not _STORAGE_KEY.match(key) or name not in self._zip.NameToInfo:
            raise ValueError(f"no storage {key[:64]!r} in the archive")
        member = self._member(name)
        if numel * dtype.itemsize > member.file_size:
            raise ValueError(f"storage {key!r} holds {member.file_size} bytes, not {numel} values")
        if member.compress_type == zipfile.ZIP_STORED and (
            member.compress_size != member.file_size
            or member.header_offset + member.compress_size > self.size
        ):
            raise ValueError(f"storage {key!r}: its zip entry claims bytes beyond the file")

    def values(self, storage: _Storage, count: int) -> np.ndarray:
        """The first ``count`` elements of a storage: mapped when stored, inflated if not."""
        member = self._member(f"{self.prefix}data/{storage.key}")
        nbytes = count * storage.dtype.itemsize
        if member.compress_type != zipfile.ZIP_STORED:
            self._charge(member, nbytes)
            buffer = np.empty(nbytes, dtype=np.uint8)
            with self._zip.open(member) as stream:
                done = 0
                while done < nbytes:
                    chunk = stream.read(min(_READ_CHUNK, nbytes - done))
                    if not chunk:
                        raise ValueError(f"storage {storage.key!r} inflates to fewer bytes")
                    buffer[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                    done += len(chunk)
            return buffer.view(storage.dtype)
        if self._map is None:
            with self.path.open("rb") as stream:
                self._map = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        header = _LOCAL_HEADER.unpack_from(self._map, member.header_offset)
        if header[0] != b"PK\x03\x04":
            raise ValueError(f"storage {storage.key!r}: bad zip header")
        start = member.header_offset + _LOCAL_HEADER.size + header[1] + header[2]
        if start + member.compress_size > len(self._map):
            raise ValueError(f"storage {storage.key!r} runs past the end of the file")
        return np.frombuffer(self._map, dtype=storage.dtype, count=count, offset=start)


def _load_zip(path: Path) -> Any:
    def read() -> Any:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = _Archive(path, archive, size)
            data = members.pickle_bytes()
            _scan(data, path)
            return _objects(data, members)

    return _guarded(path, "torch archive", read)


def _guarded(path: Path, what: str, read: Callable[[], Any]) -> Any:
    """``read()``, any failure as one line naming the file: what a crafted pickle raises
    (anything; nothing it named ran) becomes an ``InputError``."""
    try:
        return read()
    except InputError:
        raise
    except _Refused as exc:
        raise UnsafeFileError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise InputError(f"{path}: cannot read the {what} ({_first_line(exc)})") from exc


def _objects(data: bytes, archive: _Archive | _Legacy) -> Any:
    """The object pickled in ``data``, its tensors as arrays of ``archive``'s storages."""
    unpickler = _RestrictedUnpickler(data, archive)
    content = unpickler.load()
    arrays = _materialise(unpickler.tensors.values(), archive)
    return _replace_tensors(content, arrays)


def _materialise(tensors: Any, archive: _Archive | _Legacy) -> dict[int, np.ndarray]:
    """numpy arrays of the tensor records (by ``id``), each storage read once, as far as needed."""
    records: list[_Tensor] = list(tensors)
    reach: dict[str, int] = {}
    storages: dict[str, _Storage] = {}
    for record in records:
        key = record.storage.key
        reach[key] = max(reach.get(key, 0), record.end)
        storages[key] = record.storage
    values = {key: archive.values(storages[key], n) for key, n in reach.items() if n}
    arrays: dict[int, np.ndarray] = {}
    for record in records:
        storage = record.storage
        if record.end == 0:
            view = np.empty(record.shape, dtype=storage.dtype)
        else:
            itemsize = storage.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(
                values[storage.key][record.offset :],
                shape=record.shape,
                strides=tuple(s * itemsize for s in record.strides),
                writeable=False,
            )
        if storage.bfloat16:
            view = (view.astype(np.uint32) << 16).view(np.float32)
        arrays[id(record)] = view
    return arrays


def _replace_tensors(content: Any, arrays: dict[int, np.ndarray]) -> Any:
    """``content`` with every tensor record replaced by its array; shared containers stay
    shared (a pickle can nest references exponentially), cycles and deep nesting are refused."""
    done: dict[int, Any] = {}
    active: set[int] = set()

    def walk(value: Any, depth: int) -> Any:
        if isinstance(value, _Tensor):
            return arrays[id(value)]
        if not isinstance(value, dict | list | tuple | set | frozenset):
            return value
        if id(value) in done:
            return done[id(value)]
        if id(value) in active:
            raise ValueError(f"a {type(value).__name__} that contains itself")
        if depth >= MAX_DEPTH:
            raise ValueError(f"containers nested deeper than {MAX_DEPTH} levels")
        active.add(id(value))
        result: Any
        if isinstance(value, dict):
            for key in value:
                _hashable_key(key)
            result = type(value)(
                (key, item if type(item) in _SCALARS else walk(item, depth + 1))
                for key, item in value.items()
            )
        elif isinstance(value, set | frozenset):
            if any(isinstance(item, _Tensor) for item in value):
                raise ValueError("a tensor inside a set")
            result = value
        else:
            items = [item if type(item) in _SCALARS else walk(item, depth + 1) for item in value]
            result = items if isinstance(value, list) else tuple(items)
        active.discard(id(value))
        done[id(value)] = result
        return result

    return walk(content, 0)


def _hashable_key(key: Hashable) -> None:
    if isinstance(key, _Tensor):
        raise ValueError("a tensor used as a dict key")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles the small pickles around a legacy file's object: plain values only."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeFileError(
            f"{self._path}: refused to load global {_printable(module)}.{_printable(name)} "
            "in a legacy torch file's header (nothing was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ValueError("a persistent id outside the object's pickle")


class _Legacy:
    """A pre-zip torch file: its pickles and storages, checked against the file's real size.

    Offers the object's pickle (``pickle_bytes``) and, to the unpickler and
    :func:`_materialise`, what ``_Archive`` offers: ``check_storage`` and ``values``.
    """

    def __init__(self, path: Path, mapped: mmap.mmap) -> None:
        self.path = path
        self._map = mapped
        self.size = len(mapped)
        self.byteorder: Literal["<", ">"] = "<"
        magic, pos = self._plain(0, "magic number")
        if magic != LEGACY_MAGIC_NUMBER:
            raise InputError(f"{path}: not a PyTorch file (a pickle, but not torch's magic number)")
        version, pos = self._plain(pos, "protocol version")
        if version != LEGACY_PROTOCOL:
            raise InputError(
                f"{path}: legacy torch file of protocol version {_short(version)} "
                f"(routelog reads {LEGACY_PROTOCOL})"
            )
        info, pos = self._plain(pos, "system info")
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise InputError(
                f"{path}: legacy torch file not written on a little-endian machine "
                "(re-save it with a current torch.save)"
            )
        window = bytes(self._map[pos : pos + MAX_PICKLE_BYTES])
        length = _scan(window, path, "the pickle")
        self._pickle = window[:length]
        keys, self._data_start = self._plain(pos + length, "storage key list")
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise InputError(f"{path}: the storage key list is not a list of strings")
        repeated = [k for k, n in collections.Counter(keys).items() if n > 1]
        if repeated:
            raise InputError(f"{path}: storage {_printable(repeated[0])!r} listed twice")
        self._keys: list[str] = keys
        self._listed = set(keys)
        self._declared: dict[str, tuple[np.dtype[Any], int]] = {}
        self._offsets: dict[str, int] | None = None

    def _plain(self, pos: int, what: str) -> tuple[Any, int]:
        """The plain value pickled at ``pos`` (scanned, at most MAX_PICKLE_BYTES) and where
        the next byte after it is."""
        if pos >= self.size:
            raise InputError(f"{self.path}: legacy torch file ends before its {what} (truncated)")
        window = bytes(self._map[pos : pos + MAX_PICKLE_BYTES])
        length = _scan(window, self.path, f"the {what} pickle")
        return _PlainUnpickler(window[:length], self.path).load(), pos + length

    def pickle_bytes(self) -> bytes:
        return self._pickle

    def check_storage(self, key: str, dtype: np.dtype[Any], numel: int) -> None:
        """A storage the pickle declares: listed, and no larger than the file's data could be."""
        if key not in self._listed:
            raise ValueError(f"no storage {key[:64]!r} in the file's storage list")
        if numel * dtype.itemsize > self.size - self._data_start:
            raise ValueError(
                f"storage {key!r} declares {numel} values, more than the file's "
                f"{self.size - self._data_start} bytes of storage data hold"
            )
        self._declared[key] = (dtype, numel)

    def place(self) -> dict[str, int]:
        """Where each storage's bytes start: walked in listed order, each element count read
        and checked against its declaration and the file's size before going on."""
        if self._offsets is not None:
            return self._offsets
        offsets: dict[str, int] = {}
        pos = self._data_start
        for key in self._keys:
            if key not in self._declared:
                raise ValueError(f"storage {key[:64]!r} is listed but no tensor declares it")
            dtype, numel = self._declared[key]
            if pos + 8 > self.size:
                raise ValueError(f"the file ends before storage {key!r} (truncated)")
            count = int.from_bytes(self._map[pos : pos + 8], "little", signed=True)
            if count != numel:
                raise ValueError(
                    f"storage {key!r} holds {count} values, but its tensors declare {numel}"
                )
            end = pos + 8 + count * dtype.itemsize
            if end > self.size:
                raise ValueError(
                    f"storage {key!r} ends {end - self.size} bytes beyond the end of the file "
                    "(truncated)"
                )
            offsets[key] = pos + 8
            pos = end
        self._offsets = offsets
        return offsets

    def values(self, storage: _Storage, count: int) -> np.ndarray:
        """The first ``count`` elements of a storage, a view of the file's memory map."""
        offset = self.place()[storage.key]
        return np.frombuffer(self._map, dtype=storage.dtype, count=count, offset=offset)


def _load_legacy(path: Path) -> Any:
    def read() -> Any:
        with path.open("rb") as stream:
            mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        legacy = _Legacy(path, mapped)
        content = _objects(legacy.pickle_bytes(), legacy)
        legacy.place()  # every listed storage checked, even one no tensor reaches
        return content

    return _guarded(path, "legacy torch file", read)


def _short(value: object) -> str:
    """A value from a header pickle, for a message: short, escaped, never a huge int's digits."""
    if _is_int(value):
        assert isinstance(value, int)
        return str(value) if abs(value) < 10**20 else "a number beyond 10^20"
    return _printable(type(value).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
