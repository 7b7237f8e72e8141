"""PyTorch input: router outputs saved with ``torch.save``, read without torch.

Accepted payloads (tensors are read by :mod:`routelog.ingest._torchfile`, which runs nothing
from the file):

- HuggingFace ``outputs.router_logits``: a tuple or list of L tensors, each [B*S, E] or
  [B, S, E] (layer i is item i), bare or in a dict under ``router_logits``, ``router_probs``,
  ``probs`` or ``logits``, with optional ``step``, ``attention_mask`` ([B, S], 0 = padding)
  and ``top_k``, and ``topk_ids``: the experts the router selected, laid out like the
  payload (L tensors [T, k] or [B, S, k], [L, T, k], or a dict by layer). With them, counts
  come from the selection and ``selection_mismatch`` compares it with the probabilities;
- one tensor [T, E] (layer 0) or [L, T, E];
- a dict ``{layer: tensor}`` keyed by layer index or by a name whose last number is the layer
  (``model.layers.3.block_sparse_moe.gate``).

``token`` is the row's position within its layer's tensor (flattened over batch and sequence).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo, _torchfile
from routelog.ingest.payload import (
    PAYLOAD_KINDS,
    Locate,
    bad_ids,
    looks_like_probabilities,
    step_from_name,
    to_probabilities,
)

if TYPE_CHECKING:
    from routelog.options import Options

META_KEYS = ("step", "attention_mask", "top_k", "topk_ids")
MAX_LAYERS = 1024
"""Layer tensors read from one file (models have tens; each costs a pass through the kernels)."""
INT64_LIMIT = 1 << 63
INT32_LIMIT = 1 << 31
BATCH_ROWS = 1 << 17
"""Rows converted at a time: bounds memory to about BATCH_ROWS x E x 8 bytes per batch."""
PROBE_ROWS = 1024
"""Rows checked first when deciding whether logits are really probabilities (a quick no)."""
EXPECTED = "expected a tensor, a list of tensors or a dict with router_logits"

_NUMBER = re.compile(r"\d+")


@dataclass
class _Payload:
    """What a .pt file holds, before any conversion."""

    layers: list[tuple[int, np.ndarray]]  # (layer, [T, E] matrix), in file order
    name: str  # the key the tensors were under, or "tensors" when bare
    kind: Literal["probs", "logits"]
    layout: str
    step: object = None
    attention_mask: object = None
    top_k: object = None
    topk_ids: object = None


def scan(path: Path, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read a .pt/.pth file into one probability batch per layer (and per BATCH_ROWS rows)."""
    payload = _payload(_torchfile.load(path), path)
    _check_size(payload.layers, path)
    info.layout = payload.layout
    step = _step(payload.step, path, info)
    top_k = _top_k(payload.top_k, path)
    keep = _attention_mask(payload.attention_mask, payload.layers, path)
    selected = _selections(payload.topk_ids, payload.layers, path)
    kind = payload.kind
    if kind == "logits" and _holds_probabilities(payload.layers, keep):
        info.warn(
            f"{payload.name} hold probabilities (softmax already applied); read as probabilities"
        )
        kind = "probs"
    info.payload = "probabilities" if kind == "probs" else "logits"
    masked = 0 if keep is None else int((~keep).sum())
    info.rows += sum(len(matrix) for _, matrix in payload.layers)
    info.masked_rows += masked * len(payload.layers)
    if options.steps is not None and step not in options.steps:
        return
    for layer, matrix in payload.layers:
        if options.layers is not None and layer not in options.layers:
            continue
        ids = selected.get(layer)
        batches = _layer_batches(matrix, keep, step, layer, kind, top_k, path, options, info, ids)
        yield from batches


def _payload(content: Any, path: Path) -> _Payload:
    """Recognise the payload structure, or raise naming what was found."""
    if not isinstance(content, dict):
        layers, layout = _layers(content, path, top_level=True)
        return _Payload(layers, "router_logits", "logits", layout)
    keys = [k for k in PAYLOAD_KINDS if k in content]
    if len(keys) > 1:
        raise InputError(f"{path}: ambiguous payload, both {keys[0]!r} and {keys[1]!r}")
    meta = {k: content.get(k) for k in META_KEYS}
    if keys:
        layers, layout = _layers(content[keys[0]], path, top_level=True)
        return _Payload(layers, keys[0], PAYLOAD_KINDS[keys[0]], f"{keys[0]}: {layout}", **meta)
    rest = {k: v for k, v in content.items() if k not in META_KEYS}
    if not rest or not all(isinstance(v, np.ndarray) for v in rest.values()):
        raise InputError(f"{path}: {EXPECTED}; found {_describe(content)}")
    layers, layout = _layers(rest, path, top_level=False)
    return _Payload(layers, "router_logits", "logits", layout, **meta)


def _check_size(layers: list[tuple[int, np.ndarray]], path: Path) -> None:
    """The work a file asks for is bounded by its size: one tensor listed as 100,000 layers,
    or broadcast to 10^12 rows, is refused before any of it is computed."""
    if len(layers) > MAX_LAYERS:
        raise InputError(
            f"{path}: {len(layers)} layer tensors; routelog reads at most {MAX_LAYERS} per file"
        )
    values = sum(matrix.size for _, matrix in layers)
    budget = max(_torchfile.VIEW_FLOOR, _torchfile.VIEW_RATIO * path.stat().st_size)
    if values > budget:
        raise InputError(
            f"{path}: its layer tensors hold {values} values in all, more than the {budget} "
            "a file of this size can (the same tensor repeated as many layers, or broadcast)"
        )


def _layers(value: Any, path: Path, *, top_level: bool) -> tuple[list[tuple[int, np.ndarray]], str]:
    """(layer, [T, E] matrix) pairs of a tensor, a sequence of tensors or a dict of tensors."""
    if isinstance(value, np.ndarray):
        if value.ndim == 2:
            return [(0, _checked(value, path, 0))], f"tensor [T, E] = {_shape(value)}"
        if value.ndim == 3 and top_level:
            layers = [(i, _checked(m, path, i)) for i, m in enumerate(value)]
            return layers, f"tensor [L, T, E] = {_shape(value)}"
    elif isinstance(value, list | tuple) and value and _all_tensors(value):
        layers = [(i, _matrix(t, path, i)) for i, t in enumerate(value)]
        return layers, f"{type(value).__name__} of {len(value)} layer tensors {_shape(value[0])}"
    elif isinstance(value, dict) and value and _all_tensors(value.values()):
        numbered = [(_layer_number(key, path), t) for key, t in value.items()]
        seen: dict[int, object] = {}
        for (layer, _), key in zip(numbered, value, strict=True):
            if layer in seen:
                raise InputError(
                    f"{path}: keys {_show(seen[layer])} and {_show(key)} both name layer {layer}"
                )
            seen[layer] = key
        layers = [(layer, _matrix(t, path, layer)) for layer, t in numbered]
        return layers, f"dict of {len(value)} layer tensors {_shape(numbered[0][1])}"
    raise InputError(f"{path}: {EXPECTED}; found {_describe(value)}")


def _all_tensors(values: Any) -> bool:
    return all(isinstance(v, np.ndarray) for v in values)


def _matrix(tensor: np.ndarray, path: Path, layer: int) -> np.ndarray:
    """One layer's tensor as [T, E]: [B*S, E] as is, [B, S, E] flattened over B and S."""
    if tensor.ndim == 3:
        tensor = tensor.reshape(-1, tensor.shape[-1])  # a view when the strides allow
    if tensor.ndim != 2:
        raise InputError(
            f"{path}: layer {layer} tensor has shape {_shape(tensor)}, expected [T, E] or [B, S, E]"
        )
    return _checked(tensor, path, layer)


def _checked(matrix: np.ndarray, path: Path, layer: int) -> np.ndarray:
    if not np.issubdtype(matrix.dtype, np.floating):
        raise InputError(
            f"{path}: layer {layer} tensor holds {matrix.dtype} values, "
            "expected floating-point router logits or probabilities"
        )
    if matrix.shape[1] == 0:
        raise InputError(f"{path}: layer {layer} tensor has no experts (shape {_shape(matrix)})")
    return matrix


def _layer_number(key: object, path: Path) -> int:
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        number = key
    else:
        numbers = _NUMBER.findall(key) if isinstance(key, str) else []
        if not numbers:
            raise InputError(f"{path}: cannot tell the layer of key {_show(key)} (no number in it)")
        digits = numbers[-1].lstrip("0") or "0"
        if len(digits) > 20:  # int() of a million digits is slow, and surely out of range
            raise InputError(
                f"{path}: key {_show(key)} names a layer of {len(digits)} digits, beyond int32"
            )
        number = int(digits)
    if number >= INT32_LIMIT:
        raise InputError(
            f"{path}: key {_show(key)} names layer {_show(number)}, beyond int32 "
            f"(layers are 0 to {INT32_LIMIT - 1})"
        )
    return number


def _show(value: object) -> str:
    """A short repr of a key or value read from the file: never the whole of a huge one."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 128 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    return f"a {type(value).__name__}"


def _shape(value: Any) -> str:
    return "[" + ", ".join(str(n) for n in value.shape) + "]"


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(_show(k) for k in list(value)[:12])
        return f"dict with keys {keys}" + (", ..." if len(value) > 12 else "")
    if isinstance(value, list | tuple):
        kinds = sorted(
            {type(v).__name__ if not isinstance(v, np.ndarray) else "tensor" for v in value}
        )
        return f"{type(value).__name__} of {len(value)} items ({', '.join(kinds) or 'empty'})"
    if isinstance(value, np.ndarray):
        return f"tensor of shape {_shape(value)}"
    return type(value).__name__


def _scalar_int(value: object, key: str, path: Path) -> int | None:
    """An int saved as a Python int or a one-element integer tensor."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1 and np.issubdtype(value.dtype, np.integer):
        number = int(value.reshape(()))
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise InputError(f"{path}: {key!r} must be an integer, found {_describe(value)}")
    if not -INT64_LIMIT <= number < INT64_LIMIT:
        raise InputError(f"{path}: {key!r} is {_show(number)}, beyond int64")
    return number


def _step(value: object, path: Path, info: FileInfo) -> int:
    """The payload's step, else the file name's; the content wins when both differ."""
    content = _scalar_int(value, "step", path)
    named = step_from_name(path)
    if content is not None and named is not None and content != named:
        info.warn(
            f"step {content} in the file differs from step {named} in its name; using {content}"
        )
    step = content if content is not None else named
    if step is None:
        raise InputError(
            f"{path}: no 'step' in the payload, and no step in the file name "
            "(name it like step_000200.pt, iter-200.pt or global_step200.pt)"
        )
    return step  # a name's step beyond int64 is refused where it is read (payload)


def _top_k(value: object, path: Path) -> int | None:
    k = _scalar_int(value, "top_k", path)
    if k is not None and k < 1:
        raise InputError(f"{path}: 'top_k' must be at least 1, found {k}")
    return k


def _attention_mask(
    value: object, layers: list[tuple[int, np.ndarray]], path: Path
) -> np.ndarray | None:
    """Which rows are real tokens: attention_mask [B, S] flattened, 0 marking padding."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise InputError(f"{path}: 'attention_mask' must be a tensor, found {_describe(value)}")
    flat = value.reshape(-1)
    other = (flat != 0) & (flat != 1)  # NaN too: a mask is 0 (padding) or 1 (a token)
    if other.any():
        at = int(np.flatnonzero(other)[0])
        raise InputError(
            f"{path}: attention_mask holds {flat[at].item()!r} at token {at}: "
            "expected 0 (padding) or 1"
        )
    keep: np.ndarray = flat != 0
    for layer, matrix in layers:
        if len(matrix) != keep.size:
            raise InputError(
                f"{path}: attention_mask {_shape(value)} covers {keep.size} tokens, "
                f"but layer {layer} has {len(matrix)} rows"
            )
    return keep


def _selections(
    value: object, layers: list[tuple[int, np.ndarray]], path: Path
) -> dict[int, np.ndarray]:
    """``topk_ids`` per layer as [T, k] int64, each checked against its layer's [T, E]."""
    if value is None:
        return {}
    found: list[tuple[int, np.ndarray]]
    if isinstance(value, np.ndarray) and value.ndim == 3 and len(layers) > 1:
        found = list(enumerate(value))
    elif isinstance(value, np.ndarray):
        found = [(layers[0][0] if len(layers) == 1 else 0, value)]
    elif isinstance(value, list | tuple) and _all_tensors(value):
        found = [(layer, t) for (layer, _), t in zip(layers, value, strict=False)]
        if len(value) != len(layers):
            raise InputError(
                f"{path}: 'topk_ids' holds {len(value)} tensors for {len(layers)} layers"
            )
    elif isinstance(value, dict) and _all_tensors(value.values()):
        found = [(_layer_number(key, path), t) for key, t in value.items()]
    else:
        raise InputError(
            f"{path}: 'topk_ids' must be tensors like the payload, found {_describe(value)}"
        )
    widths = dict(layers)
    out: dict[int, np.ndarray] = {}
    for layer, ids in found:
        if layer not in widths:
            raise InputError(f"{path}: 'topk_ids' has layer {layer}, which has no router tensor")
        if ids.ndim == 3:
            ids = ids.reshape(-1, ids.shape[-1])
        matrix = widths[layer]
        if ids.ndim != 2 or len(ids) != len(matrix) or ids.shape[1] == 0:
            raise InputError(
                f"{path}: layer {layer} 'topk_ids' has shape {_shape(ids)}, "
                f"expected [{len(matrix)}, k] like its {_shape(matrix)} router tensor"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"{path}: layer {layer} 'topk_ids' holds {ids.dtype}, not integers")
        out[layer] = ids.astype(np.int64)
    return out


def _holds_probabilities(layers: list[tuple[int, np.ndarray]], keep: np.ndarray | None) -> bool:
    """Every real row of every layer non-negative and summing to 1 (softmax already applied)."""
    for _, matrix in layers:
        head = matrix[:PROBE_ROWS] if keep is None else matrix[:PROBE_ROWS][keep[:PROBE_ROWS]]
        if len(head) and not looks_like_probabilities(head):
            return False  # the usual case, decided without a pass over the whole tensor
    return all(looks_like_probabilities(m if keep is None else m[keep]) for _, m in layers)


def _locator(path: Path, layer: int, tokens: np.ndarray) -> Locate:
    return lambda row: f"{path} layer {layer} row {tokens[row]}"


def _layer_batches(
    matrix: np.ndarray,
    keep: np.ndarray | None,
    step: int,
    layer: int,
    kind: Literal["probs", "logits"],
    top_k: int | None,
    path: Path,
    options: Options,
    info: FileInfo,
    selected: np.ndarray | None = None,
) -> Iterator[Batch]:
    """One layer's rows in chunks; ``selected`` ([T, k] ids) travels along when given."""
    n_experts = matrix.shape[1]
    if selected is not None:
        top_k = selected.shape[1]
    for start in range(0, len(matrix), BATCH_ROWS):
        tokens = np.arange(start, min(start + BATCH_ROWS, len(matrix)), dtype=np.int64)
        chunk = matrix[start : start + BATCH_ROWS]
        if keep is not None:
            chunk = chunk[keep[tokens]]
            tokens = tokens[keep[tokens]]
        if len(tokens) == 0:
            continue
        locate = _locator(path, layer, tokens)
        ids = None
        if selected is not None:
            ids = selected[tokens]
            outside, repeated = bad_ids(ids, n_experts)
            bad = outside | repeated
            if bad.any() and not options.skip_bad_rows:
                raise InputError(
                    f"{locate(int(np.flatnonzero(bad)[0]))}: 'topk_ids' outside [0, {n_experts}) "
                    "or repeated (use --skip-bad-rows to drop such rows)"
                )
            info.skipped_rows += int(bad.sum())
            chunk, tokens, ids = chunk[~bad], tokens[~bad], ids[~bad]
            locate = _locator(path, layer, tokens)
        result = to_probabilities(chunk, kind, options, locate)
        info.skipped_rows += result.skipped
        tokens = tokens[result.keep]
        frame = pl.DataFrame(
            {
                "step": np.full(len(tokens), step, dtype=np.int64),
                "layer": np.full(len(tokens), layer, dtype=np.int32),
                "token": tokens,
            }
        ).with_columns(pl.Series("probs", result.probs))
        if result.logit_lse is not None:
            frame = frame.with_columns(pl.Series("logit_lse", result.logit_lse))
        if ids is not None:
            ids = ids[result.keep].astype(np.int32)
            frame = frame.with_columns(
                pl.Series("topk_ids", ids).cast(pl.Array(pl.Int32, ids.shape[1]))
            )
        yield Batch("probs", frame, n_experts, top_k)
