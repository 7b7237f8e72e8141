"""The hostile and odd .pt files of the regression corpus, built deterministically.

Each case is a function writing one file and its expected outcome; ``make_corpus.py`` writes
them all into ``tests/corpus/pt/`` with ``expected.toml``, and ``tests/ingest/test_pt.py``
builds some of them again to test the reader directly.
"""

from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.ingest import torchzip as tz
from tests.ingest.torchzip import Pickle

T, E = 16, 4


@dataclass(frozen=True)
class Case:
    """One corpus file: how to write it, and what ``routelog analyze FILE`` must do."""

    name: str
    write: Callable[[Path], object]
    exit: int
    stderr: str = ""
    args: list[str] = field(default_factory=list)


def _logits(seed: int = 0, n: int = T * E, dtype: str = "<f4") -> bytes:
    return np.random.default_rng(seed).standard_normal(n).astype(dtype).tobytes()


def _storages(layers: int = 1) -> dict[str, bytes]:
    return {str(i): _logits(i) for i in range(layers)}


def build_on_storage(state: dict[str, object] | None = None, *, legacy: bool = False) -> Pickle:
    """The audit's out-of-bounds read: a stride-0 view of a one-element storage claims N
    elements; BUILD puts it in place of another storage's data (or size), and a dense view
    of that storage then reads N elements from where the first one lies, past its end."""
    n = 64 * E
    p = Pickle(legacy=legacy)
    p.tensor("0", 1, 0, (n,), (0,)).put(0).raw(pickle.POP)
    p.storage("1", 1).put(1)
    p.raw(pickle.EMPTY_DICT)
    if state is None:
        p.text("values").get(0).raw(pickle.SETITEM)
    else:
        for key, value in state.items():
            p.text(key)
            p.int(value) if isinstance(value, int) else p.text(str(value))
            p.raw(pickle.SETITEM)
    p.raw(pickle.BUILD + pickle.POP)
    p.raw(pickle.EMPTY_DICT).mark().text("step").int(1).text("router_logits")
    p.tensor_call().get(1).tensor_args(0, (n // E, E), (E, 1)).raw(pickle.TUPLE1)
    return p.raw(pickle.SETITEMS)


def _attack(state: dict[str, object] | None = None) -> Callable[[Path], object]:
    def write(path: Path) -> object:
        storages = {"0": _logits(0, 1), "1": _logits(1, 1)}
        # unrelated members after the storages: what the old reader computed metrics from
        extra = [("archive/padding", _logits(2, 512))]
        return tz.write(path, build_on_storage(state).done(), storages, extra=extra)

    return write


def _build_on(target: str) -> Callable[[Path], object]:
    """BUILD with a harmless-looking state on a tensor record or on the rebuilder itself."""

    def write(path: Path) -> object:
        p = Pickle().raw(pickle.EMPTY_DICT).mark().text("step").int(1).text("router_logits")
        if target == "tensor":
            p.tensor("0", T * E, 0, (T, E), (E, 1))
        else:
            p.global_(*tz.REBUILD)
        p.raw(pickle.EMPTY_DICT).text("shape").int(10**6).raw(pickle.SETITEM + pickle.BUILD)
        p.raw(pickle.TUPLE1 + pickle.SETITEMS)
        return tz.write(path, p.done(), _storages())

    return write


def _one_tensor(
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    numel: int = T * E,
    kind: str = "FloatStorage",
    data: bytes | None = None,
) -> Callable[[Path], object]:
    def write(path: Path) -> object:
        p = Pickle().raw(pickle.EMPTY_DICT).mark().text("step").int(1).text("router_logits")
        p.tensor("0", numel, offset, size, stride, kind).raw(pickle.TUPLE1 + pickle.SETITEMS)
        return tz.write(path, p.done(), {"0": _logits() if data is None else data})

    return write


def _payload(step: int | None, extra: Callable[[Pickle], object] | None = None) -> Pickle:
    p = Pickle().raw(pickle.EMPTY_DICT).mark()
    if step is not None:
        p.text("step").int(step)
    if extra is not None:
        extra(p)
    return p


def _fields(step: int = 1, **items: int) -> Callable[[Path], object]:
    def write(path: Path) -> object:
        p = _payload(step)
        for key, value in items.items():
            p.text(key).int(value)
        p.text("router_logits").tensor("0", T * E, 0, (T, E), (E, 1)).raw(pickle.TUPLE1)
        return tz.write(path, p.raw(pickle.SETITEMS).done(), _storages())

    return write


def _layer_key(key: str | int) -> Callable[[Path], object]:
    def write(path: Path) -> object:
        p = _payload(1)
        p.int(key) if isinstance(key, int) else p.text(key)
        p.tensor("0", T * E, 0, (T, E), (E, 1))
        return tz.write(path, p.raw(pickle.SETITEMS).done(), _storages())

    return write


def _references(count: int, memoized: bool) -> Callable[[Path], object]:
    """One small tensor listed ``count`` times: one memoized object, or one call each."""

    def write(path: Path) -> object:
        p = _payload(1).text("router_logits").raw(pickle.EMPTY_LIST).mark()
        if memoized:
            p.tensor("0", T * E, 0, (T, E), (E, 1)).put(0)
            for _ in range(count - 1):
                p.get(0)
        else:  # the rebuilder and its arguments memoized: five bytes a call
            p.global_(*tz.REBUILD).put(0).mark().storage("0", T * E).int(0).ints((T, E))
            p.ints((E, 1)).raw(pickle.NEWFALSE + pickle.TUPLE).put(1).raw(pickle.POP + pickle.POP)
            for _ in range(count):
                p.get(0).get(1).raw(pickle.REDUCE)
        data = p.raw(pickle.APPENDS + pickle.SETITEMS).done()
        return tz.write(path, data, _storages(), compress_pickle=True)

    return write


def _memo(index: int) -> Callable[[Path], object]:
    def write(path: Path) -> object:
        p = _payload(1).text("router_logits").tensor("0", T * E, 0, (T, E), (E, 1)).put(index)
        return tz.write(path, p.raw(pickle.TUPLE1 + pickle.SETITEMS).done(), _storages())

    return write


def _raw_opcode(code: bytes) -> Callable[[Path], object]:
    def write(path: Path) -> object:
        return tz.write(path, _payload(1).raw(code).raw(pickle.SETITEMS).done(), _storages())

    return write


def _zip_bomb(path: Path) -> object:
    """A float64 storage of 96 MiB of zeros, deflated to about 100 KB."""
    n = 12 << 20
    p = _payload(1).text("router_logits")
    p.tensor("0", n, 0, (n // 8, 8), (8, 1), "DoubleStorage").raw(pickle.TUPLE1 + pickle.SETITEMS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(tz.member("archive/data.pkl"), p.done())
        archive.writestr(tz.member("archive/byteorder"), "little")
        with archive.open(tz.member("archive/data/0", zipfile.ZIP_DEFLATED), "w") as member:
            zeros = bytes(1 << 20)
            for _ in range(n * 8 >> 20):
                member.write(zeros)
    return path


def _lying_sizes(path: Path) -> object:
    """A deflated storage whose zip entries claim 1 TiB inflated (only 256 bytes are)."""
    n = 1 << 20
    p = _payload(1).text("router_logits")
    p.tensor("0", n, 0, (n // 8, 8), (8, 1), "DoubleStorage").raw(pickle.TUPLE1 + pickle.SETITEMS)
    tz.write(path, p.done(), {"0": bytes(256)}, compress=True)
    data = bytearray(path.read_bytes())
    # patch the uncompressed size in the central directory entry of archive/data/0
    name = b"archive/data/0"
    central = 0
    while True:
        central = data.index(b"PK\x01\x02", central)
        length = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + length] == name:
            struct.pack_into("<I", data, central + 24, 0xFFFFFFF0)
            break
        central += 4
    path.write_bytes(bytes(data))
    return path


def _members(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED):
    def write(path: Path) -> object:
        path.parent.mkdir(parents=True, exist_ok=True)
        with (
            warnings.catch_warnings(),  # zipfile warns about the duplicate names wanted here
            zipfile.ZipFile(path, "w", compression=method) as archive,
        ):
            warnings.simplefilter("ignore")
            for name, data in members:
                archive.writestr(tz.member(name, method), data)
        return path

    return write


def _good_pickle(layers: int = 1) -> bytes:
    return tz.router_pickle(layers, T, E).done()


def _nested(depth: int) -> Callable[[Path], object]:
    def write(path: Path) -> object:
        p = _payload(1).text("router_logits")
        p.raw(pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1))
        return tz.write(path, p.raw(pickle.SETITEMS).done(), _storages())

    return write


def _cycle(path: Path) -> object:
    p = _payload(1).text("router_logits").raw(pickle.EMPTY_LIST).put(0).get(0)
    return tz.write(path, p.raw(pickle.APPEND + pickle.SETITEMS).done(), _storages())


def _exponential(levels: int) -> Callable[[Path], object]:
    """l0 = [t]; l(i+1) = [li, li]: 2^levels paths to one tensor, in a few hundred bytes."""

    def write(path: Path) -> object:
        p = _payload(1).text("router_logits").raw(pickle.EMPTY_LIST)
        p.tensor("0", T * E, 0, (T, E), (E, 1)).raw(pickle.APPEND)
        for _ in range(levels):
            p.put(0).raw(pickle.POP).raw(pickle.EMPTY_LIST).mark().get(0).get(0)
            p.raw(pickle.APPENDS)
        return tz.write(path, p.raw(pickle.SETITEMS).done(), _storages())

    return write


def _many_objects(path: Path) -> object:
    """A million empty dicts from a 4 KB file (data.pkl deflated): refused by opcode count."""
    body = pickle.EMPTY_LIST + pickle.MARK + pickle.EMPTY_DICT * (1 << 20) + pickle.APPENDS
    return tz.write(path, pickle.PROTO + b"\x02" + body + pickle.STOP, {}, compress_pickle=True)


def _truncated(path: Path) -> object:
    tz.write(path, _good_pickle(2), _storages(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _storage_twice(path: Path) -> object:
    p = _payload(1).text("router_logits").mark()
    p.tensor("0", T * E, 0, (T, E), (E, 1))
    p.tensor("0", T * E // 2, 0, (T, E // 2), (E // 2, 1), "DoubleStorage")
    return tz.write(path, p.raw(pickle.TUPLE + pickle.SETITEMS).done(), _storages())


def _valid_f64_neg_inf(path: Path) -> object:
    values = np.random.default_rng(3).standard_normal((T, E))
    values[::2, 1] = -np.inf  # masked experts: softmax gives exactly 0 there
    p = _payload(1).text("router_logits")
    p.tensor("0", T * E, 0, (T, E), (E, 1), "DoubleStorage").raw(pickle.TUPLE1 + pickle.SETITEMS)
    return tz.write(path, p.done(), {"0": values.astype("<f8").tobytes()})


def _deflated_valid(path: Path) -> object:
    return tz.write(path, _good_pickle(2), _storages(2), compress=True)


def _stride0_small(path: Path) -> object:
    """A legitimately broadcast tensor (``expand``): 8 rows of the same 4 logits."""
    return _one_tensor(0, (8, E), (0, 1))(path)


def _legacy(
    pickle_: Pickle | None = None, cut: int = 0, **options: object
) -> Callable[[Path], object]:
    """A pre-zip file (3 layers of T x E float32 logits unless ``pickle_`` says otherwise),
    ``cut`` bytes short of its end; ``options`` go to ``torchzip.write_legacy``."""

    def write(path: Path) -> object:
        p = pickle_ or tz.router_pickle(3, T, E, legacy=True)
        tz.write_legacy(path, p.done(), _storages(3), **options)  # type: ignore[arg-type]
        if cut:
            path.write_bytes(path.read_bytes()[:-cut])
        return path

    return write


def _legacy_one_tensor(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> Pickle:
    p = Pickle(legacy=True).raw(pickle.EMPTY_DICT).mark().text("step").int(1)
    p.text("router_logits").tensor("0", numel, 0, size, stride)
    return p.raw(pickle.TUPLE1 + pickle.SETITEMS)


def _legacy_header_global() -> list[bytes]:
    evil = Pickle().global_("os", "system").text("true").raw(pickle.TUPLE1 + pickle.REDUCE)
    magic, version = (pickle.dumps(n, protocol=2) for n in (tz.LEGACY_MAGIC_NUMBER, 1001))
    return [magic, version, evil.done()]


def _sglang_dense_claim(path: Path) -> object:
    """An SGLang per-pass dump: 20,000 layers of one physical expert mapped to logical expert
    65535, so E = 65536: ~320 KB of payload once made routelog allocate 10 GiB of counters."""
    layers = 20_000
    p = Pickle().raw(pickle.EMPTY_DICT).mark().text("records").raw(pickle.EMPTY_LIST)
    p.raw(pickle.EMPTY_DICT).mark().text("forward_pass_id").int(0)
    p.text("global_physical_count").tensor("0", layers, 0, (layers, 1), (1, 1), "LongStorage")
    p.raw(pickle.SETITEMS + pickle.APPEND)
    p.text("last_physical_to_logical_map")
    p.tensor("1", layers, 0, (layers, 1), (1, 1), "LongStorage")
    ones = np.ones(layers, dtype="<i8").tobytes()
    mapping = np.full(layers, 65535, dtype="<i8").tobytes()
    return tz.write(path, p.raw(pickle.SETITEMS).done(), {"0": ones, "1": mapping})


CASES: list[Case] = [
    # valid controls: what the reader must keep reading
    Case("valid.pt", lambda p: tz.write(p, _good_pickle(3), _storages(3)), 0),
    Case("valid_deflated.pt", _deflated_valid, 0),
    Case("valid_broadcast.pt", _stride0_small, 0),
    # 1. BUILD on routelog's stand-ins: the out-of-bounds read of the audit
    Case("build_storage_values.pt", _attack(), 2, "refused to set the state of a storage"),
    Case("build_storage_numel.pt", _attack({"numel": 10**6}), 2, "state of a storage"),
    Case("build_tensor.pt", _build_on("tensor"), 2, "refused to set the state of a tensor"),
    Case("build_rebuilder.pt", _build_on("rebuilder"), 2, "state of a tensor rebuilder"),
    # views checked against the storage, in elements, overflow-safe
    Case("view_past_storage.pt", _one_tensor(1, (T, E), (E, 1)), 2, "tensor reaches element 64"),
    Case("view_negative_stride.pt", _one_tensor(60, (T, E), (-E, 1)), 2, "negative or beyond"),
    Case("view_negative_size.pt", _one_tensor(0, (-1, E), (E, 1)), 2, "negative or beyond"),
    Case("view_stride_2_63.pt", _one_tensor(0, (2, E), (1 << 63, 1)), 2, "beyond int64"),
    Case(
        "view_wraps_int64.pt",
        _one_tensor(0, (3, E), ((1 << 62) + 1, 1)),
        2,
        "tensor reaches element 9223372036854775813",
    ),
    Case("view_offset_2_100.pt", _one_tensor(1 << 100, (T, E), (E, 1)), 2, "beyond int64"),
    Case("view_40_dims.pt", _one_tensor(0, (1,) * 40, (1,) * 40), 2, "tensor of 40 dimensions"),
    Case("storage_numel_2_64.pt", _one_tensor(0, (T, E), (E, 1), numel=1 << 64), 2, "declares"),
    Case("storage_short.pt", _one_tensor(0, (T, E), (E, 1), data=bytes(100)), 2, "holds 100"),
    Case("storage_declared_twice.pt", _storage_twice, 2, "storage '0' declared twice"),
    # 2. resources: broadcasts, references, memo, zip bombs, nesting
    Case(
        "broadcast_10_12.pt",
        _one_tensor(0, (125_000_000_000, 8), (0, 0), numel=1),
        2,
        "tensors claim more than",
    ),
    Case("references_100k_memo.pt", _references(100_000, True), 2, "100000 layer tensors"),
    Case("references_100k_calls.pt", _references(100_000, False), 2, "100000 layer tensors"),
    Case("memo_2_28.pt", _memo(1 << 28), 2, "names memo entry 268435456"),
    Case("zipbomb.pt", _zip_bomb, 2, "compressed member expands beyond"),
    Case("zip_sizes_lie.pt", _lying_sizes, 2, "inflates to fewer bytes"),
    Case("nested_1000.pt", _nested(1000), 2, "nested deeper than 64 levels"),
    Case("objects_1m.pt", _many_objects, 2, "data.pkl holds more than 524288 opcodes"),
    Case("cycle.pt", _cycle, 2, "a list that contains itself"),
    Case("exponential_60.pt", _exponential(60), 2, "found list of 2 items (list)"),
    Case(
        "binbytes8_2_40.pt",
        _raw_opcode(pickle.BINBYTES8 + struct.pack("<Q", 1 << 40)),
        2,
        "claims 1099511627776 bytes",
    ),
    Case(
        "global_escapes.pt",
        _raw_opcode(pickle.GLOBAL + b"\x1b[2Jos\nsystem\x07\n"),
        2,
        "refused to load global \\x1b[2Jos.system\\x07",
    ),
    Case("opcode_ext1.pt", _raw_opcode(pickle.EXT1 + b"\x01"), 2, "refused pickle opcode EXT1"),
    Case("opcode_next_buffer.pt", _raw_opcode(pickle.NEXT_BUFFER), 2, "opcode NEXT_BUFFER"),
    Case("opcode_unknown.pt", _raw_opcode(b"\xff"), 2, "unknown pickle opcode at byte"),
    Case(
        "pickle_without_stop.pt",
        _members([("archive/data.pkl", b"\x80\x02}q\x00")]),
        2,
        "ends before its STOP opcode",
    ),
    # 3. integers beyond their type
    Case(
        "step_2_70.pt", _fields(step=1 << 70), 2, "'step' is 1180591620717411303424, beyond int64"
    ),
    Case("top_k_2_64.pt", _fields(top_k=1 << 64), 2, "'top_k' is 18446744073709551616"),
    Case("layer_key_2_40.pt", _layer_key(1 << 40), 2, "names layer 1099511627776, beyond int32"),
    Case("layer_name_2_31.pt", _layer_key("model.layers.2147483648.gate"), 2, "beyond int32"),
    Case("layer_name_5000_digits.pt", _layer_key("layers." + "9" * 5000), 2, "of 5000 digits"),
    # zip layouts: truncation, duplicates, methods
    Case("truncated.pt", _truncated, 2, "truncated or corrupt zip archive"),
    Case(
        "two_data_pkl.pt",
        _members(
            [
                ("archive/data.pkl", _good_pickle()),
                ("other/data.pkl", _good_pickle()),
                ("archive/data/0", _logits()),
            ]
        ),
        2,
        "holds 2 data.pkl members",
    ),
    Case(
        "data_pkl_twice.pt",
        _members(
            [
                ("archive/data.pkl", _good_pickle()),
                ("archive/data.pkl", _good_pickle()),
                ("archive/data/0", _logits()),
            ]
        ),
        2,
        "holds 2 data.pkl members (archive/data.pkl, archive/data.pkl)",
    ),
    Case(
        "storage_member_twice.pt",
        _members(
            [
                ("archive/data.pkl", _good_pickle()),
                ("archive/data/0", _logits(0)),
                ("archive/data/0", _logits(1)),
            ]
        ),
        2,
        "member archive/data/0 appears 2 times",
    ),
    Case(
        "bzip2_member.pt",
        _members(
            [("archive/data.pkl", _good_pickle()), ("archive/data/0", _logits())], zipfile.ZIP_BZIP2
        ),
        2,
        "zip compression method 12",
    ),
    # 5. the legacy (pre-zip) format, read by the same restricted unpickler, never by torch
    Case("legacy_valid.pt", _legacy(), 0),
    Case(
        "legacy_truncated_storage.pt",
        _legacy(cut=10),
        2,
        "storage '2' ends 10 bytes beyond the end of the file (truncated)",
    ),
    Case(
        "legacy_count_beyond_file.pt",
        _legacy(counts={"1": 1 << 62}),
        2,
        "storage '1' holds 4611686018427387904 values, but its tensors declare 64",
    ),
    Case(
        "legacy_huge_numel.pt",
        _legacy(_legacy_one_tensor(1 << 40, (1 << 20, 1 << 20), (1 << 20, 1))),
        2,
        "storage '0' declares 1099511627776 values, more than the file's",
    ),
    Case(
        "legacy_stride0_claim.pt",
        _legacy(_legacy_one_tensor(1, (10**6, 10**6), (0, 0))),
        2,
        "tensors claim more than",
    ),
    Case(
        "legacy_repeated_key.pt",
        _legacy(keys=["0", "1", "2", "1"]),
        2,
        "storage '1' listed twice",
    ),
    Case(
        "legacy_unlisted_storage.pt",
        _legacy(keys=["0", "1"]),
        2,
        "no storage '2' in the file's storage list",
    ),
    Case(
        "legacy_build_on_storage.pt",
        _legacy(build_on_storage(legacy=True)),
        2,
        "refused to set the state of a storage",
    ),
    Case(
        "legacy_header_global.pt",
        _legacy(header=_legacy_header_global()),
        2,
        "refused to load global os.system in a legacy torch file's header",
    ),
    Case(
        "legacy_only_magic.pt",
        lambda path: path.write_bytes(pickle.dumps(tz.LEGACY_MAGIC_NUMBER, protocol=2)),
        2,
        "legacy torch file ends before its protocol version (truncated)",
    ),
    # 6. dense per-expert counters bounded by the payload, whatever E the file claims
    Case(
        "expert_distribution_recorder_1.pt",
        _sglang_dense_claim,
        2,
        "E=65536 experts per (step, layer) group would take",
    ),
]
"""Every case; ``valid_neg_inf_f64.pt`` is built by test_pt only (its outcome is the shared
-inf validation's)."""

NEG_INF_F64 = Case("valid_neg_inf_f64.pt", _valid_f64_neg_inf, 0)
