"""Megatron-LM router traces (``--moe-routing-trace-path DIR``): ``router_trace_rank{r}.jsonl``.

One JSON record per (step, block, layer) and rank, as ``megatron/core/transformer/moe/
router_trace.py`` writes it::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 2, "top_indices": [[12, 45], ...]}

With ``--capture-logits`` the tracer also writes ``logits_rank{r}.bin``, raw bfloat16
pre-top-k router logits, and each record gains ``logit_offset``, ``logit_bytes`` and
``logit_shape`` [T, E]: such records become probability rows (every metric); records without
logits become top-k id rows (the count metrics). bfloat16 is decoded without torch: each
uint16 is the high half of a float32.

E comes from ``logit_shape``, else ``--num-experts``, else ``router_state_rank{r}.pt`` (the
router weights, [E, hidden] per layer), else the model's ``config.json``. Records of the
multi-token-prediction block (``"block": "mtp"``, with ``mtp_idx``) reuse decoder layer
numbers: they are left out, and a warning says how many. Each rank routes its own tokens, so
the records of one step add up over ranks (their files merge like any other files of a run).
Hidden-state sidecars are not read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo, _torchfile, table
from routelog.ingest.jsonl import repeated_key_lines, unique_keys
from routelog.ingest.payload import bad_ids, to_probabilities
from routelog.modelconfig import find_model_config
from routelog.options import MAX_EXPERTS

if TYPE_CHECKING:
    import pyarrow as pa

    from routelog.options import Options

BLOCK_BYTES = 1 << 24
"""Bytes of the trace read at a time (cut back to the last whole line)."""
BATCH_TOKENS = 1 << 16
"""Tokens whose logits are decoded at a time (whole records): bounds memory to about
BATCH_TOKENS x E x 8 bytes, whatever the size of a block of the trace."""

SCHEMA: dict[str, Any] = {
    "step": pl.Int64,
    "block": pl.String,
    "layer": pl.Int64,
    "mtp_idx": pl.Int64,
    "num_tokens": pl.Int64,
    "topk": pl.Int64,
    "top_indices": pl.List(pl.List(pl.Int64)),
    "logit_offset": pl.Int64,
    "logit_bytes": pl.Int64,
    "logit_shape": pl.List(pl.Int64),
}
"""The record fields routelog reads (others, such as the hidden-state ``hs_*``, are ignored)."""

REQUIRED = ("step", "layer", "topk", "top_indices")
LOGIT_FIELDS = ("logit_offset", "logit_bytes", "logit_shape")
LAYOUT = "router trace"
_RANK = re.compile(r"rank(\d+)")


def _rank(path: Path) -> str:
    found = _RANK.findall(path.name)
    return found[-1] if found else "0"


def logits_path(path: Path) -> Path:
    """The bfloat16 logits sidecar of a trace file."""
    return path.with_name(f"logits_rank{_rank(path)}.bin")


def router_state_path(path: Path) -> Path:
    """The router-weight dump (``--moe-routing-trace-dump-router-weights``) of a trace file."""
    return path.with_name(f"router_state_rank{_rank(path)}.pt")


def depends(path: Path) -> list[Path]:
    """The sidecars and the config.json whose contents change how the trace is read."""
    found = [p for p in (logits_path(path), router_state_path(path)) if p.is_file()]
    config = find_model_config(path)
    return [*found, *([config.path] if config is not None else [])]


@dataclass
class _Context:
    """What a file's records share: where they are, how many experts, the logits."""

    path: Path
    options: Options
    info: FileInfo
    n_experts: int | None = None
    logits: np.ndarray | None = None  # the sidecar as uint16, memory-mapped
    mtp_records: int = 0
    without_logits: int = 0
    with_logits: int = 0


def scan(path: Path, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read a trace file block by block into probability (with logits) or top-k id batches."""
    info.layout = LAYOUT
    context = _Context(path, options, info, n_experts=options.num_experts)
    for block, first_line in _blocks(path):
        yield from _block_batches(block, first_line, context)
    kinds = []
    if context.with_logits:
        kinds.append("logits")
    if context.without_logits:
        kinds.append("top-k ids")
    info.payload = " + ".join(kinds) or "top-k ids"
    if context.with_logits and context.without_logits:
        info.warn(
            f"{context.without_logits} records have no logits: their tokens count in the "
            "count metrics only"
        )
    if context.mtp_records:
        info.warn(
            f"{context.mtp_records} multi-token-prediction (mtp) records left out: "
            "routelog reports the decoder's layers"
        )


def _blocks(path: Path) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines, with the 1-based number of each block's first line."""
    line = 1
    carry = b""
    with path.open("rb") as stream:
        while True:
            chunk = stream.read(BLOCK_BYTES)
            if not chunk:
                if carry.strip():
                    yield carry, line
                return
            data = carry + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            block, carry = data[: cut + 1], data[cut + 1 :]
            yield block, line
            line += block.count(b"\n")


def _line_numbers(lines: list[bytes], first_line: int) -> np.ndarray:
    """1-based numbers of the non-blank lines (one per record, in order)."""
    return first_line + np.flatnonzero([bool(text.strip()) for text in lines])


def _block_batches(block: bytes, first_line: int, context: _Context) -> Iterator[Batch]:
    lines = block.split(b"\n")
    frame = _parse(block, lines, first_line, context)
    if frame is None or frame.height == 0:
        return
    numbers = _line_numbers(lines, first_line)
    frame = frame.with_columns(pl.Series("__line", numbers[: frame.height]))
    frame = _drop_mtp(frame, context)
    frame = _check_required(frame, context)
    frame = table.select_rows(frame, context.options)
    if frame.height == 0:
        return
    context.info.rows += int(frame["top_indices"].list.len().sum())
    frame = frame.filter(pl.col("top_indices").list.len() > 0)
    if frame.height == 0:
        return
    has_logits = frame["logit_offset"].is_not_null()
    if context.n_experts is None:
        context.n_experts = _experts(frame, context)
    with_logits, without = frame.filter(has_logits), frame.filter(~has_logits)
    if without.height:
        yield from _topk_batches(without, context)
    if with_logits.height:
        yield from _logit_batches(with_logits, context)


def _parse(
    block: bytes, lines: list[bytes], first_line: int, context: _Context
) -> pl.DataFrame | None:
    """The block's records; on a parse failure, find the bad line (raise or blank it out)."""
    if not block.strip():
        return None
    import pyarrow as pa

    try:
        frame = _records(block, lines)
        if not repeated_key_lines(block, SCHEMA):
            return frame
    except (pa.ArrowException, pl.exceptions.PolarsError):
        pass
    bad = [(i, p) for i, text in enumerate(lines) if (p := _line_problem(text)) is not None]
    if not bad:
        raise InputError(
            f"{context.path}:{first_line}-{first_line + len(lines) - 1}: cannot read these lines"
        )
    if not context.options.skip_bad_rows:
        index, problem = bad[0]
        raise InputError(
            f"{context.path}:{first_line + index}: {problem} "
            "(use --skip-bad-rows to drop such records)"
        )
    context.info.skipped_rows += len(bad)
    for index, _ in bad:
        lines[index] = b""
    kept = b"\n".join(lines)
    if not kept.strip():
        return None
    return _records(kept, lines)


def _records(data: bytes, lines: list[bytes]) -> pl.DataFrame:
    """The JSON lines ``data`` (split into ``lines``) parsed by pyarrow's reader, in the types
    of SCHEMA (other fields ignored), on several threads: records are mostly nested lists of
    ids, which it parses in a third of the CPU time of Polars' reader (0.36 against 1.08 s
    for 16 MB). Its blocks hold the longest line whole (a line may not span two)."""
    import pyarrow as pa
    import pyarrow.json as pj

    longest = max((len(line) for line in lines), default=0)
    read = pj.ReadOptions(use_threads=True, block_size=max(1 << 20, 2 * longest + 2))
    parse = pj.ParseOptions(explicit_schema=_arrow_schema(), unexpected_field_behavior="ignore")
    table = pj.read_json(pa.BufferReader(data), read_options=read, parse_options=parse)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.select(pl.col(name).cast(dtype) for name, dtype in SCHEMA.items())


def _arrow_schema() -> pa.Schema:
    """SCHEMA in the Arrow types pyarrow's JSON reader converts to (it has no large lists)."""
    import pyarrow as pa

    def arrow(dtype: Any) -> pa.DataType:
        if isinstance(dtype, pl.List):
            return pa.list_(arrow(dtype.inner))
        return pa.string() if dtype == pl.String else pa.int64()

    return pa.schema([(name, arrow(dtype)) for name, dtype in SCHEMA.items()])


def _line_problem(text: bytes) -> str | None:
    """What keeps one trace line from being a record, or None."""
    if not text.strip():
        return None
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        return f"not valid JSON ({message})"
    if not isinstance(value, dict):
        return "not a JSON object"
    for key in ("step", "layer", "mtp_idx", "num_tokens", "topk", *LOGIT_FIELDS[:2]):
        item = value.get(key)
        if item is not None and (isinstance(item, bool) or not isinstance(item, int)):
            return f"{key!r} must be an integer, not {json.dumps(item)[:30]}"
    if value.get("block") is not None and not isinstance(value["block"], str):
        return "'block' must be a string"
    ids = value.get("top_indices")
    if ids is not None and not (
        isinstance(ids, list)
        and all(isinstance(row, list) and all(_is_int(x) for x in row) for row in ids)
    ):
        return "'top_indices' must be a list of lists of expert ids"
    shape = value.get("logit_shape")
    if shape is not None and not (isinstance(shape, list) and all(_is_int(x) for x in shape)):
        return "'logit_shape' must be a list of integers"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject(
    frame: pl.DataFrame, bad: np.ndarray | pl.Series, message: str, context: _Context
) -> pl.DataFrame:
    """Raise naming the first bad record, or drop and count the bad ones (--skip-bad-rows)."""
    mask = bad if isinstance(bad, pl.Series) else pl.Series(bad)
    mask = mask.fill_null(True)
    if not mask.any():
        return frame
    if not context.options.skip_bad_rows:
        line = int(frame.filter(mask)["__line"][0])
        raise InputError(
            f"{context.path}:{line}: {message} (use --skip-bad-rows to drop such records)"
        )
    context.info.skipped_rows += int(mask.sum())
    return frame.filter(~mask)


def _drop_mtp(frame: pl.DataFrame, context: _Context) -> pl.DataFrame:
    mtp = frame["mtp_idx"].is_not_null() | (frame["block"].fill_null("decoder") == "mtp")
    context.mtp_records += int(mtp.sum())
    return frame.filter(~mtp)


def _check_required(frame: pl.DataFrame, context: _Context) -> pl.DataFrame:
    for column in REQUIRED:
        frame = _reject(frame, frame[column].is_null(), f"no {column!r}", context)
    frame = _reject(frame, frame["topk"] < 1, "'topk' must be at least 1", context)
    frame = _reject(frame, frame["layer"] < 0, "'layer' must not be negative", context)
    lengths = frame["top_indices"].list.len()
    stated = frame["num_tokens"]
    frame = _reject(
        frame,
        stated.is_not_null() & (stated != lengths),
        "'num_tokens' differs from the number of 'top_indices' rows",
        context,
    )
    widths = frame.select(
        pl.col("top_indices").list.eval(pl.element().list.len()).alias("w"), "topk"
    )
    wrong_k = widths.select(
        (pl.col("w").list.min() != pl.col("topk")) | (pl.col("w").list.max() != pl.col("topk"))
    ).to_series()
    return _reject(frame, wrong_k, "a 'top_indices' row does not hold 'topk' expert ids", context)


def _experts(frame: pl.DataFrame, context: _Context) -> int:
    """E from the logits' shape, router_state_rank{r}.pt or config.json, else an error."""
    found, source = _experts_and_source(frame, context)
    if not 0 < found <= MAX_EXPERTS:
        raise InputError(
            f"{context.path}: {source} gives E={found}, outside the 1 to {MAX_EXPERTS} experts "
            "routelog handles"
        )
    return found


def _experts_and_source(frame: pl.DataFrame, context: _Context) -> tuple[int, str]:
    shapes = frame["logit_shape"].drop_nulls()
    if len(shapes) and len(shapes[0]) == 2:
        return int(shapes[0][1]), "'logit_shape'"
    state = router_state_path(context.path)
    if state.is_file():
        found = _experts_in_router_state(state)
        if found is not None:
            return found, state.name
    config = find_model_config(context.path)
    if config is not None and config.num_experts is not None:
        return config.num_experts, config.where
    raise InputError(
        f"{context.path}: the trace does not say how many experts there are: pass "
        f"--num-experts E, or keep {logits_path(context.path).name}, "
        f"{state.name} or the model's config.json beside it"
    )


def _experts_in_router_state(path: Path) -> int | None:
    """E from the router weights of ``router_state_rank{r}.pt``: {layer: {"weight": [E, H]}}."""
    state = _torchfile.load(path)
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a dict of router states per layer")
    for entry in state.values():
        weight = entry.get("weight") if isinstance(entry, dict) else None
        if isinstance(weight, np.ndarray) and weight.ndim == 2:
            return int(weight.shape[0])
    return None


def _ids(frame: pl.DataFrame, k: int) -> np.ndarray:
    """The records' top_indices as one [tokens, k] array, records in order."""
    flat = frame["top_indices"].explode().explode().to_numpy()
    return np.asarray(flat, dtype=np.int64).reshape(-1, k)


def _checked_ids(frame: pl.DataFrame, k: int, context: _Context) -> pl.DataFrame:
    """Drop or reject records with a null id, an id outside [0, E) or an id repeated within a
    token."""
    assert context.n_experts is not None
    null_id = pl.element().list.eval(pl.element().is_null()).list.any()
    nulls = frame.select(pl.col("top_indices").list.eval(null_id).list.any()).to_series()
    frame = _reject(frame, nulls, "a null expert id in 'top_indices'", context)
    for which, message in (
        (0, f"an expert id outside [0, {context.n_experts}) in 'top_indices'"),
        (1, "an expert id repeated within one token"),
    ):
        if frame.height == 0:
            break
        record = np.repeat(np.arange(frame.height), frame["top_indices"].list.len().to_numpy())
        tokens = bad_ids(_ids(frame, k), context.n_experts)[which]
        bad = np.bincount(record, weights=tokens, minlength=frame.height) > 0
        frame = _reject(frame, bad, message, context)
    return frame


def _topk_batches(frame: pl.DataFrame, context: _Context) -> Iterator[Batch]:
    assert context.n_experts is not None
    for k in sorted(frame["topk"].unique().to_list()):
        part = _checked_ids(frame.filter(pl.col("topk") == k), k, context)
        if part.height == 0:
            continue
        context.without_logits += part.height
        ids = _ids(part, k).astype(np.int32)
        lengths = part["top_indices"].list.len().to_numpy()
        out = pl.DataFrame(
            {
                "step": np.repeat(part["step"].to_numpy(), lengths),
                "layer": np.repeat(part["layer"].to_numpy(), lengths).astype(np.int32),
            }
        ).with_columns(pl.Series("topk_ids", ids).cast(pl.Array(pl.Int32, k)))
        yield Batch("topk", out, context.n_experts, top_k=k)


def _sidecar(context: _Context) -> np.ndarray:
    if context.logits is None:
        path = logits_path(context.path)
        if not path.is_file():
            raise InputError(
                f"{context.path}: records locate logits, but {path.name} is not beside it"
            )
        size = path.stat().st_size
        if size < 2:
            context.logits = np.zeros(0, dtype="<u2")
        else:
            context.logits = np.memmap(path, dtype="<u2", mode="r", shape=(size // 2,))
    return context.logits


def _logit_batches(frame: pl.DataFrame, context: _Context) -> Iterator[Batch]:
    """Records whose logits are in the sidecar -> probability rows (loop over records only)."""
    assert context.n_experts is not None
    n_experts = context.n_experts
    sidecar = _sidecar(context)
    name = logits_path(context.path).name
    tokens = frame["top_indices"].list.len()
    shape_ok = (frame["logit_shape"].list.len() == 2) & (
        frame["logit_shape"].list.get(0, null_on_oob=True) == tokens
    )
    frame = _reject(frame, ~shape_ok, "'logit_shape' is not [num_tokens, E]", context)
    frame = _reject(
        frame,
        frame["logit_shape"].list.get(1) != n_experts,
        f"'logit_shape' does not have E={n_experts} columns"
        + (" (--num-experts)" if context.options.num_experts is not None else " (as before)"),
        context,
    )
    nbytes = frame["logit_shape"].list.get(0) * n_experts * 2
    frame = _reject(
        frame,
        (frame["logit_bytes"] != nbytes) | (frame["logit_offset"] % 2 != 0),
        "'logit_bytes' does not match 'logit_shape' in bfloat16 (or the offset is odd)",
        context,
    )
    end = frame["logit_offset"] + frame["logit_bytes"]
    frame = _reject(
        frame,
        (frame["logit_offset"] < 0) | (end > 2 * len(sidecar)),
        f"its logits reach past the end of {name} ({2 * len(sidecar):,} bytes)",
        context,
    )
    for k in sorted(frame["topk"].unique().to_list()):
        part = _checked_ids(frame.filter(pl.col("topk") == k), k, context)
        if part.height == 0:
            continue
        lengths = part["top_indices"].list.len().to_numpy()
        group = (np.cumsum(lengths) - lengths) // BATCH_TOKENS
        grouped = part.with_columns(pl.Series("__batch", group))
        for chunk in grouped.partition_by("__batch", maintain_order=True):
            yield _logit_batch(chunk, k, sidecar, context)


def _logit_batch(frame: pl.DataFrame, k: int, sidecar: np.ndarray, context: _Context) -> Batch:
    assert context.n_experts is not None
    n_experts = context.n_experts
    starts = frame["logit_offset"].to_numpy() // 2
    counts = frame["top_indices"].list.len().to_numpy()
    bits = np.concatenate(
        [sidecar[s : s + n * n_experts] for s, n in zip(starts, counts, strict=True)]
    )
    wide = np.left_shift(bits, 16, dtype=np.uint32)  # bfloat16 is a float32's high half
    logits = wide.view(np.float32).reshape(-1, n_experts)
    record = np.repeat(np.arange(frame.height), counts)
    lines = frame["__line"].to_numpy()
    offsets = np.r_[0, np.cumsum(counts)]

    def locate(row: int) -> str:
        index = int(record[row])
        return f"{context.path}:{lines[index]} token {row - offsets[index]}"

    result = to_probabilities(logits, "logits", context.options, locate)
    context.info.skipped_rows += result.skipped
    ids = _ids(frame, k)[result.keep]  # the recorded selection: counts come from it
    context.with_logits += frame.height
    out = pl.DataFrame(
        {
            "step": np.repeat(frame["step"].to_numpy(), counts)[result.keep],
            "layer": np.repeat(frame["layer"].to_numpy(), counts)[result.keep].astype(np.int32),
        }
    ).with_columns(
        pl.Series("probs", result.probs),
        pl.Series("logit_lse", result.logit_lse),
        pl.Series("topk_ids", ids.astype(np.int32)).cast(pl.Array(pl.Int32, k)),
    )
    return Batch("probs", out, n_experts, top_k=k)
