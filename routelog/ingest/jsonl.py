"""JSONL input (``.jsonl``, ``.ndjson``, optionally ``.gz``): blocks of lines -> table layouts.

The decompressed text is read in blocks of whole lines (bounded memory) and each block is
parsed by Polars' vectorized ndjson reader, then handed to :mod:`routelog.ingest.table`, so
JSONL and Parquet share every layout. Python's ``json`` module only runs when a block fails
to parse or has a column of the wrong type: it finds the bad line and names it ``file:LINE``
(1-based), or, with ``--skip-bad-rows``, blanks it out and counts it.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo, table
from routelog.ingest.payload import PAYLOAD_KINDS

if TYPE_CHECKING:
    from routelog.ingest.payload import Locate
    from routelog.options import Options

BLOCK_BYTES = 1 << 24
"""Decompressed bytes read at a time (cut back to the last whole line)."""
MAX_LINE_BYTES = 1 << 26
"""Longest line read (64 MiB: a batched line of 4096 tokens x 256 experts is ~10 MiB);
a longer one is a bad row, so memory stays bounded by this and BLOCK_BYTES."""
BOM = b"\xef\xbb\xbf"
NEG_INF = re.compile(rb"(?<=[\[,:])(\s*)-Infinity")
"""``-Infinity`` as a value (what Python's json writes for a masked logit): Polars' reader
does not parse it, so it is rewritten to the lowest float64, which payload checks map back."""
LOWEST = b"-1.7976931348623157e308"
OTHER_DATASET = re.compile(rb'"dataset"\s*:\s*(?!"|null\b)')
"""A ``dataset`` key whose value may not be a string (Polars would read a 5 as "5" when
other lines hold strings): the lines it finds are decided by ``json``."""

WHITESPACE = np.array([ord(c) for c in " \t\r\n"], dtype=np.uint8)
MAX_KEY_NAMES = 64
"""Key names (a block's columns) compared byte for byte; other keys are compared by parts."""
MAX_SPACES = 8
"""Whitespace bytes looked past between a key and its colon in bulk; lines with more are
checked one by one."""

INTEGER_KEYS = frozenset({*table.STEP_COLUMNS, "layer", *table.EXPERT_COLUMNS, "expert", "count"})
FLOAT_PAYLOADS = frozenset(PAYLOAD_KINDS)
COUNT_PAYLOADS = frozenset({*table.COUNT_COLUMNS, table.ID_COLUMN})


def scan(
    path: Path, options: Options, info: FileInfo, *, stream: IO[bytes] | None = None
) -> Iterator[Batch]:
    """Read a JSONL file block by block into canonical batches.

    ``stream`` (optional) is an open binary stream to read instead of ``path`` (an object in
    a bucket, still compressed when its name ends in ``.gz``); ``path`` still names it.
    """
    layout: table.Layout | None = None
    row_offset = 0
    for block, first_line in _blocks(path, options, info, stream):
        parsed = _parse(block, first_line, path, layout, options, info)
        if parsed is None:
            continue
        frame, block = parsed
        if layout is None:
            layout = table.detect_layout(frame.schema, path)
            info.layout = layout.name
            info.payload = layout.payload_name
            problem = table.type_problem(frame.schema, layout)
            if problem is not None:  # the first block decided the layout; re-check its lines
                parsed = _parse(block, first_line, path, layout, options, info, force=True)
                if parsed is None:
                    continue
                frame, block = parsed
        yield from table.batches(
            _with_columns(frame, layout),
            layout,
            path,
            row_offset=row_offset,
            options=options,
            info=info,
            locate=_locator(path, block, first_line, row_offset),
        )
        row_offset += frame.height
    if layout is None:
        raise InputError(f"{path}: no JSON lines (the file holds only blank lines)")


def _locator(path: Path, block: bytes, first_line: int, offset: int) -> Locate:
    """Row index of the file -> ``file:LINE``; line numbers are only counted when asked for."""
    numbers: list[np.ndarray] = []

    def locate(row: int) -> str:
        if not numbers:
            numbers.append(_line_numbers(block, first_line))
        return f"{path}:{numbers[0][row - offset]}"

    return locate


def _with_columns(frame: pl.DataFrame, layout: table.Layout) -> pl.DataFrame:
    """A block may lack a column that every line left out: add it as nulls, checked later."""
    needed = ["layer", layout.payload, *([layout.step] if layout.step else []), *layout.wide]
    needed += [layout.selection] if layout.selection else []
    if layout.kind == "expert_counts":
        needed += ["expert", "count"]
    missing = [c for c in dict.fromkeys(needed) if c not in frame.columns and c != table.WIDE]
    return frame.with_columns(pl.lit(None).alias(c) for c in missing) if missing else frame


def _blocks(
    path: Path, options: Options, info: FileInfo, source: IO[bytes] | None = None
) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines of the decompressed text, with the number of each first line.

    Memory is bounded whatever the file holds: a line longer than ``MAX_LINE_BYTES`` (a
    gigabyte of gzip without a newline) is a bad row, named or (``--skip-bad-rows``) skipped
    and counted while the rest of it is read past, never accumulated. A UTF-8 byte-order mark
    at the start of the file is dropped. ``source`` (optional) is an open binary stream to
    read instead of ``path`` (an object in a bucket).
    """
    compressed = path.name.lower().endswith(".gz")
    line = 1
    carry = b""
    skipping = False  # inside an over-long line, reading past its end
    first = True
    try:
        with _open(path, compressed, source) as stream:
            while True:
                chunk = stream.read(BLOCK_BYTES)
                if first:
                    chunk = chunk.removeprefix(BOM)
                    first = False
                if not chunk:
                    if carry:
                        yield carry, line
                    return
                if skipping:
                    cut = chunk.find(b"\n")
                    if cut < 0:
                        continue
                    chunk, skipping, line = chunk[cut + 1 :], False, line + 1
                data = carry + chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    if len(carry) > MAX_LINE_BYTES:
                        _long_line(path, line, options, info)
                        carry, skipping = b"", True
                    continue
                block, carry = data[: cut + 1], data[cut + 1 :]
                yield block, line
                line += block.count(b"\n")
                if len(carry) > MAX_LINE_BYTES:
                    _long_line(path, line, options, info)
                    carry, skipping = b"", True
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: not a valid gzip file, or truncated ({exc})") from exc


def _long_line(path: Path, line: int, options: Options, info: FileInfo) -> None:
    if not options.skip_bad_rows:
        raise InputError(
            f"{path}:{line}: line longer than {MAX_LINE_BYTES >> 20} MiB "
            "(use --skip-bad-rows to drop such lines)"
        )
    info.skipped_rows += 1


def _open(
    path: Path, compressed: bool, source: IO[bytes] | None = None
) -> gzip.GzipFile | io.BufferedReader | IO[bytes]:
    if source is not None:
        return gzip.GzipFile(fileobj=source, mode="rb") if compressed else source
    return gzip.open(path, "rb") if compressed else path.open("rb")


def _line_numbers(block: bytes, first_line: int) -> np.ndarray:
    """1-based numbers of the lines of ``block`` that are not blank (Polars skips blank ones)."""
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    if not block.endswith(b"\n"):
        ends = np.append(ends, len(data))
    starts = np.r_[0, ends[:-1] + 1]
    visible = np.r_[0, np.cumsum(~np.isin(data, WHITESPACE), dtype=np.int32)]
    numbers: np.ndarray = first_line + np.flatnonzero(visible[ends] > visible[starts])
    return numbers


def _parse(
    block: bytes,
    first_line: int,
    path: Path,
    layout: table.Layout | None,
    options: Options,
    info: FileInfo,
    *,
    force: bool = False,
) -> tuple[pl.DataFrame, bytes] | None:
    """Parse one block; find, then raise on or blank out, bad lines (returns the block used)."""
    if not block.strip():
        return None
    problem = None
    if not force:
        frame, problem = _read(block, layout)
        if frame is not None and problem is None:
            return _checked(frame, block)
    block = _drop_bad_lines(block, first_line, path, layout, options, info, problem)
    if not block.strip():  # every line was bad (a truncated last line alone): all skipped
        return None
    frame, problem = _read(block, layout)
    if frame is None or problem is not None:
        _raise_at_first_failing_line(block, first_line, path, layout, problem)
    assert frame is not None
    return _checked(frame, block)


def _raise_at_first_failing_line(
    block: bytes, first_line: int, path: Path, layout: table.Layout | None, problem: str | None
) -> None:
    """Name the line that makes the block unreadable (each line alone was fine, e.g. a type
    that clashes with the lines before it): the shortest failing prefix, by bisection."""
    lines = block.split(b"\n")
    low, high = 0, len(lines)  # lines[:high] fails; lines[:low] reads
    while high - low > 1:
        middle = (low + high) // 2
        frame, found = _read(b"\n".join(lines[:middle]), layout)
        if frame is None or found is not None:
            high, problem = middle, found
        else:
            low = middle
    raise InputError(f"{path}:{first_line + high - 1}: cannot read this line ({problem})")


def _read(block: bytes, layout: table.Layout | None) -> tuple[pl.DataFrame | None, str | None]:
    if b"-Infinity" in block:
        block = NEG_INF.sub(rb"\1" + LOWEST, block)
    try:
        frame = pl.read_ndjson(io.BytesIO(block), infer_schema_length=None)
    except pl.exceptions.PolarsError as exc:
        return None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if repeated_key_lines(block, frame.columns):
        return None, "a repeated key"
    if "dataset" in frame.columns and _other_dataset(block):
        return None, "'dataset' must be a string"
    if layout is not None and frame.height:
        return frame, table.type_problem(_with_columns(frame, layout).schema, layout)
    return frame, None


def _other_dataset(block: bytes) -> bool:
    """Whether a line of ``block`` gives ``dataset`` a value that is not a string or null
    (the usual block, all strings, costs one regular-expression search)."""
    for match in OTHER_DATASET.finditer(block):
        start = block.rfind(b"\n", 0, match.start()) + 1
        end = block.find(b"\n", match.end())
        line = block[start : None if end < 0 else end]
        try:
            value = json.loads(line)
        except ValueError:
            continue  # the line checks name it
        if isinstance(value, dict) and _value_problem("dataset", value.get("dataset"), {}):
            return True
    return False


def repeated_key_lines(block: bytes, names: Iterable[str] = ()) -> list[int]:
    """Indices (in ``block.split(b"\\n")``) of the lines of a parsed JSONL block in which an
    object holds one key twice, exactly as ``json.loads(object_pairs_hook=unique_keys)`` says.

    Vectorized for the usual line, a flat object without escapes: its keys are the strings
    followed by ``:`` (after any whitespace), compared byte for byte with ``names`` (the
    first MAX_KEY_NAMES) and counted per line; other keys are compared by length and their
    first and last 8 bytes (equal keys always agree there). Lines that could hide a repeat
    from this (a backslash, so an escaped key such as ``"l\\u0061yer"``; more than one
    ``{``, so nested objects; more than MAX_SPACES spaces before a colon) and lines where two
    keys agree are parsed with ``json`` to decide.
    """
    data = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(data == ord("\n"))
    n_lines = len(newlines) + 1

    def line_of(positions: np.ndarray) -> np.ndarray:
        found: np.ndarray = np.searchsorted(newlines, positions)
        return found

    check = np.zeros(n_lines, dtype=bool)
    check[line_of(np.flatnonzero(data == ord("\\")))] = True
    check |= np.bincount(line_of(np.flatnonzero(data == ord("{"))), minlength=n_lines) > 1
    quotes = np.flatnonzero(data == ord('"'))
    where = line_of(quotes)
    clean = ~check[where]
    quotes, where = quotes[clean], where[clean]
    opens, closes = quotes[0::2], quotes[1::2]
    if len(opens) != len(closes) or (where[0::2] != where[1::2]).any():
        return _exact(block, np.arange(n_lines))  # not JSON the parser accepted: decide slowly
    lines = where[0::2]
    after = closes + 1  # the next byte that is not whitespace: a colon after a key
    for _ in range(MAX_SPACES):
        spaced = np.flatnonzero(np.isin(data[np.minimum(after, len(data) - 1)], WHITESPACE))
        if not len(spaced):
            break
        after[spaced] += 1
    else:
        check[lines[np.isin(data[np.minimum(after, len(data) - 1)], WHITESPACE)]] = True
    is_key = data[np.minimum(after, len(data) - 1)] == ord(":")
    opens, closes, lines = opens[is_key], closes[is_key], lines[is_key]
    lengths = closes - opens - 1
    ident = np.full(len(opens), -1, dtype=np.int64)
    for number, name in enumerate([n.encode() for n in dict.fromkeys(names)][:MAX_KEY_NAMES]):
        candidates = np.flatnonzero(lengths == len(name))
        if len(name):
            window = data[opens[candidates, None] + 1 + np.arange(len(name))]
            candidates = candidates[(window == np.frombuffer(name, dtype=np.uint8)).all(axis=1)]
        ident[candidates] = number
    known = ident >= 0
    pairs = np.sort(lines[known] * MAX_KEY_NAMES + ident[known])
    check[pairs[1:][pairs[1:] == pairs[:-1]] // MAX_KEY_NAMES] = True
    other = ~known  # keys beyond the names: equal keys share length, first and last 8 bytes
    if other.any():
        start, length, line = opens[other] + 1, lengths[other], lines[other]
        head = _word(data, start, np.minimum(length, 8))
        tail = _word(data, start + np.maximum(length - 8, 0), np.minimum(length, 8))
        rows = np.stack([line, length, head, tail])[:, np.lexsort((tail, head, length, line))]
        check[rows[0, 1:][(rows[:, 1:] == rows[:, :-1]).all(axis=0)]] = True
    return _exact(block, np.flatnonzero(check))


def _word(data: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``counts[i]`` (at most 8) bytes of ``data`` from ``starts[i]``, as one int64 each."""
    index = np.minimum(starts[:, None] + np.arange(8), len(data) - 1)
    window = data[index]
    window[np.arange(8) >= counts[:, None]] = 0
    words: np.ndarray = np.ascontiguousarray(window).view(np.int64).ravel()
    return words


def _exact(block: bytes, candidates: np.ndarray) -> list[int]:
    if not len(candidates):
        return []
    lines = block.split(b"\n")
    found = []
    for index in candidates.tolist():
        try:
            json.loads(lines[index], object_pairs_hook=unique_keys)
        except RepeatedKey:
            found.append(index)
        except (ValueError, RecursionError):
            continue  # another problem, found and named by the line checks
    return found


def _checked(frame: pl.DataFrame, block: bytes) -> tuple[pl.DataFrame, bytes] | None:
    return (frame, block) if frame.height else None


def _drop_bad_lines(
    block: bytes,
    first_line: int,
    path: Path,
    layout: table.Layout | None,
    options: Options,
    info: FileInfo,
    problem: str | None,
) -> bytes:
    """Check each line with ``json``: raise on the first bad one, or blank them all out."""
    lines = block.split(b"\n")
    depths: dict[str, int] = {}
    if layout is not None and not layout.wide and layout.kind != "expert_counts":
        depths[layout.payload] = 1 + int(layout.nested)
    bad: list[tuple[int, str]] = []
    for index, text in enumerate(lines):
        if not text.strip():
            continue
        found = line_problem(text, depths)
        if found is not None:
            bad.append((index, found))
    if not bad:
        _raise_at_first_failing_line(block, first_line, path, layout, problem)
    if not options.skip_bad_rows:
        index, found = bad[0]
        raise InputError(
            f"{path}:{first_line + index}: {found} (use --skip-bad-rows to drop such lines)"
        )
    info.skipped_rows += len(bad)
    for index, _ in bad:
        lines[index] = b""
    return b"\n".join(lines)


def line_problem(text: bytes, depths: dict[str, int]) -> str | None:
    """What is wrong with one JSONL line, or None; ``depths`` holds the nesting seen so far.

    Examples
    --------
    >>> line_problem(b'{"step": 1, "layer": 0, "probs": [0.5, 0.5]}', {})
    >>> print(line_problem(b'{"step": 1, "layer": "x", "probs": [1.0]}', {}))
    'layer' must be an integer, not "x"
    """
    try:
        value = json.loads(
            text.removeprefix(BOM),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=unique_keys,
        )
    except (ValueError, RecursionError) as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        return f"not valid JSON ({message})"
    if not isinstance(value, dict):
        return f"not a JSON object (a line holds {type(value).__name__})"
    for key, item in value.items():
        found = _value_problem(key, item, depths)
        if found is not None:
            return found
    return None


def _reject_constant(name: str) -> float:
    if name == "-Infinity":  # a masked logit; probabilities and counts refuse it later
        return -math.inf
    raise ValueError(f"{name} is not a JSON number")


class RepeatedKey(ValueError):
    """A JSON object holds one key twice."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key repeated within one object (at any depth): the one
    rule for repeated keys, in the line checks and in :func:`repeated_key_lines`."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise RepeatedKey(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} overflows a float")
    return number


INT64 = (-(1 << 63), (1 << 63) - 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problem(key: str, value: Any, depths: dict[str, int]) -> str | None:
    if value is None:
        return None
    if key in INTEGER_KEYS and not _is_int(value):
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{key!r} does not fit a 64-bit integer: {_short(value)}"
        return f"{key!r} must be an integer, not {_short(value)}"
    if key == "dataset" and not isinstance(value, str):
        return f"'dataset' must be a string, not {_short(value)}"
    if key in ("token", "mask"):
        ok = _is_int if key == "token" else (lambda v: isinstance(v, (bool, int)))
        if not (ok(value) or (isinstance(value, list) and all(map(ok, value)))):
            return f"{key!r} must be {'an integer' if key == 'token' else 'a boolean'} or a list"
    if table.WIDE_COLUMN.match(key) and not _is_number(value):
        return f"{key!r} must be a number, not {_short(value)}"
    if key == table.WEIGHT_COLUMN:
        return _list_problem(key, value, _is_number, depths, allowed=(1,))
    if key in FLOAT_PAYLOADS:
        return _list_problem(key, value, _is_number, depths, allowed=(1, 2))
    if key in COUNT_PAYLOADS:
        return _list_problem(key, value, _is_int, depths, allowed=(1, 2))
    return None


def _list_problem(
    key: str, value: Any, ok: Any, depths: dict[str, int], *, allowed: tuple[int, ...]
) -> str | None:
    """A list of numbers (depth 1) or of lists of numbers (depth 2), nested like earlier lines."""
    what = "integers" if ok is _is_int else "numbers"
    if not isinstance(value, list):
        return f"{key!r} must be a list of {what}, not {_short(value)}"
    nested = bool(value) and all(isinstance(v, list) for v in value)
    items = [x for v in value for x in v] if nested else value
    depth = 2 if nested else 1
    if depth not in allowed or not all(x is None or ok(x) for x in items):
        return f"{key!r} must be a list of {what}" + (" or of such lists" if 2 in allowed else "")
    expected = depths.setdefault(key, depth)
    if depth != expected:
        return f"{key!r} is {'batched' if depth == 2 else 'per-token'}, unlike earlier lines"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 30 else text[:27] + "..."
