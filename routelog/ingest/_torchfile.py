"""Read what ``torch.save`` writes, without torch and without running code from the file.

``torch.save`` writes a zip archive: ``<archive>/data.pkl`` is a pickle of the saved object in
which every tensor is a call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` and every storage a persistent id ``("storage", torch.FloatStorage, key, location,
numel)`` whose bytes are the uncompressed member ``<archive>/data/<key>``;
``<archive>/byteorder`` says ``little`` or ``big``.

The pickle is read by an unpickler whose ``find_class`` admits only the tensor rebuilders, the
storage classes and ``collections.OrderedDict`` (which torch pickles as the empty backward
hooks of each tensor), each mapped to routelog's own stand-in rather than to torch. Any other
global (``os.system``, ``builtins.eval``, a custom class) is refused when the pickle names it,
before anything could call it, so a file can build nothing but numpy arrays and plain
containers. Tensors become read-only numpy views of a memory map of the file (strides and
offsets honoured, no copy), except bfloat16, which numpy lacks and which becomes float32.

The pre-zip ("legacy") format is read with ``torch.load(weights_only=True)`` when torch is
installed, and refused with a hint otherwise.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import mmap
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from routelog.errors import InputError, UnsafeFileError

TENSOR_REBUILDERS = ("_rebuild_tensor_v2", "_rebuild_tensor")
"""Functions of ``torch._utils`` a tensor pickles as; routelog's ``_rebuild`` stands in."""

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

_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.]+$")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths


def load(path: Path) -> Any:
    """The object saved in a .pt file, with tensors as numpy arrays.

    Raises ``UnsafeFileError`` when the pickle names anything but tensors and plain
    containers, and ``InputError`` when the file is not a torch file or cannot be read.
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


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside a persistent id; not callable."""

    name: str
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _Storage:
    """The flat elements of one storage, and whether they are bfloat16 bits."""

    values: np.ndarray
    bfloat16: bool


def _rebuild(storage: object, offset: object, size: object, stride: object, *_: object) -> Any:
    """``torch._utils._rebuild_tensor_v2`` for numpy: a strided, bounds-checked view."""
    if not (
        isinstance(storage, _Storage)
        and _is_int(offset)
        and isinstance(size, tuple | list)
        and isinstance(stride, tuple | list)
        and len(size) == len(stride)
        and all(_is_int(n) and n >= 0 for n in size)
        and all(_is_int(s) and s >= 0 for s in stride)
    ):
        raise ValueError("malformed tensor record")
    assert isinstance(offset, int)
    values = storage.values
    shape = tuple(int(n) for n in size)
    if 0 in shape:
        view = np.empty(shape, dtype=values.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if offset < 0 or last >= values.size:
            raise ValueError(f"tensor reaches element {last} of a storage of {values.size}")
        itemsize = values.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            values[offset:],
            shape=shape,
            strides=tuple(int(s) * itemsize for s in stride),
            writeable=False,
        )
    if storage.bfloat16:
        return (view.astype(np.uint32) << 16).view(np.float32)
    return view


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: tensors, storages and plain containers, nothing else."""

    def __init__(self, data: bytes, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in TENSOR_REBUILDERS:
            return _rebuild
        if module == "torch" and name in STORAGE_DTYPES:
            dtype = np.dtype(STORAGE_DTYPES[name]).newbyteorder(self._archive.byteorder)
            return _StorageType(name, dtype)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        # protocol 2 pickles name Python 3 globals by their Python 2 names; report the former
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        raise UnsafeFileError(
            f"{self._archive.path}: refused to load global {module}.{name} "
            "(routelog reads only tensors and plain containers from .pt files; nothing was run)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_int(pid[4])
        ):
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            values = self._archive.storage(key, storage_type.dtype, numel)
            self._storages[key] = _Storage(values, storage_type.name == "BFloat16Storage")
        return self._storages[key]


class _Archive:
    """The members of a torch zip archive, and zero-copy access to its storages."""

    def __init__(self, path: Path, archive: zipfile.ZipFile) -> None:
        self.path = path
        self._zip = archive
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise InputError(f"{path}: a zip file, but not one torch.save wrote (no data.pkl)")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.byteorder: Literal["<", ">"] = "<"
        if f"{self.prefix}byteorder" in archive.namelist():
            order = archive.read(f"{self.prefix}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise InputError(f"{path}: unknown byteorder {order!r}")
            self.byteorder = "<" if order == "little" else ">"
        self._map: mmap.mmap | None = None

    def pickle_bytes(self) -> bytes:
        return self._zip.read(f"{self.prefix}data.pkl")

    def storage(self, key: str, dtype: np.dtype[Any], numel: int) -> np.ndarray:
        """The storage's elements: a view of a memory map when the member is stored."""
        name = f"{self.prefix}data/{key}"
        if not _STORAGE_KEY.match(key) or name not in self._zip.NameToInfo:
            raise ValueError(f"no storage {key!r} in the archive")
        member = self._zip.getinfo(name)
        if numel < 0 or numel * dtype.itemsize > member.file_size:
            raise ValueError(f"storage {key!r} holds {member.file_size} bytes, not {numel} values")
        if member.compress_type != zipfile.ZIP_STORED:
            return np.frombuffer(self._zip.read(member), dtype=dtype, count=numel)
        if self._map is None:
            with self.path.open("rb") as stream:
                self._map = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        header = _LOCAL_HEADER.unpack_from(self._map, member.header_offset)
        if header[0] != b"PK\x03\x04":
            raise ValueError(f"storage {key!r}: bad zip header")
        start = member.header_offset + _LOCAL_HEADER.size + header[1] + header[2]
        if start + numel * dtype.itemsize > len(self._map):
            raise ValueError(f"storage {key!r} runs past the end of the file")
        return np.frombuffer(self._map, dtype=dtype, count=numel, offset=start)


def _load_zip(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            members = _Archive(path, archive)
            return _RestrictedUnpickler(members.pickle_bytes(), members).load()
    except InputError:
        raise
    except Exception as exc:  # a crafted pickle can raise anything; nothing it named ran
        raise InputError(f"{path}: cannot read the torch archive ({_first_line(exc)})") from exc


def _load_legacy(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise InputError(
            f"{path}: legacy (pre-zip) torch format; re-save with torch.save(...) or install torch"
        ) from None
    try:
        content = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path}: refused by torch.load(weights_only=True) ({_first_line(exc)})"
        ) from exc
    except Exception as exc:
        raise InputError(f"{path}: cannot read legacy torch file ({_first_line(exc)})") from exc
    return _to_numpy(content, torch)


def _to_numpy(value: Any, torch: Any) -> Any:
    """Tensors -> numpy arrays, through plain containers (what weights_only loading yields)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v, torch) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v, torch) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_numpy(v, torch) for v in value)
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
