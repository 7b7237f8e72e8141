"""Routed-expert id arrays (``.npy``, ``.npz``): what vLLM and SGLang return with
``return_routed_experts`` and RL frameworks save for routing replay.

Each array is ``[tokens, num_hidden_layers, k]`` integers (int16/int32/uint8/uint16 and the
like): the k experts every token was routed to in every decoder layer. An ``.npz`` may hold
several such arrays (one per request), all with the same layers and k. Layers without an MoE
block are all zeros there; they are not routing (they would read as every token on expert 0)
and are left out: the layers the model's ``config.json`` (found beside the file or in a
parent) does not list as MoE, or, without one, each layer whose ids are all zero although k
is at least 2 (ids within a token are distinct in a real top-k). The layers left out are
listed in a warning.

The step comes from the file name (``step_000200.npy``) or a parent directory's name, as for
the other formats; E from ``--num-experts`` or ``config.json`` (``num_local_experts``,
``num_experts``, ``n_routed_experts``, ...). ``.npy`` files are memory-mapped and read in
chunks of tokens; nothing is unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo
from routelog.ingest.payload import bad_ids, step_from_name
from routelog.modelconfig import ModelConfig, find_model_config

if TYPE_CHECKING:
    from routelog.options import Options

CHUNK_TOKENS = 1 << 15
"""Tokens converted at a time: bounds memory to about CHUNK_TOKENS x layers x k x 8 bytes."""
LAYOUT = "routed-expert ids"


def recognise(path: Path, source: Any = None) -> bool:
    """Whether a file found in a run directory holds routed-expert ids: its (first) array's
    header says [tokens, layers, k] integers. Only the header is read (from ``source``, an
    open seekable file such as an object in a bucket, instead of ``path`` if given)."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(source or path, allow_pickle=False) as archive:
                if not archive.files:
                    return False
                with archive.zip.open(f"{archive.files[0]}.npy") as member:
                    return _is_ids(member)
        if source is not None:
            return _is_ids(source)
        with path.open("rb") as stream:
            return _is_ids(stream)
    except (ValueError, OSError, EOFError, KeyError):
        return False


def _is_ids(stream: Any) -> bool:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    return len(shape) == 3 and dtype.kind in "iu"


def depends(path: Path) -> list[Path]:
    """The model's config.json: it says which layers are MoE, E and k."""
    config = find_model_config(path)
    return [config.path] if config is not None else []


def scan(path: Path, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read every [T, L, k] array of the file into top-k id batches, dense layers left out."""
    info.layout = LAYOUT
    info.payload = "top-k ids"
    step = step_from_name(path)
    if step is None:
        raise InputError(
            f"{path}: no step in the file name (name it like step_000200.npy, or put it in a "
            "directory such as global_step200/)"
        )
    arrays = _arrays(path)
    config = find_model_config(path)
    n_experts = _experts(path, options, config)
    n_layers, k = arrays[0][1].shape[1:]
    dense = _dense_layers(arrays, n_layers, k, config, path)
    if dense.any():
        left = ", ".join(str(int(la)) for la in np.flatnonzero(dense))
        reason = f"not MoE in {config.path.name}" if config and config.moe_layers else "all zeros"
        info.warn(f"dense layers {left} left out ({reason})")
    if config is not None and config.top_k is not None and config.top_k != k:
        info.warn(f"arrays hold k={k} ids per token, but {config.path.name} says k={config.top_k}")
    kept = np.flatnonzero(~dense)
    if options.layers is not None:
        layers = options.layers
        kept = kept[np.array([int(layer) in layers for layer in kept], dtype=bool)]
    if options.steps is not None and step not in options.steps:
        return
    for name, array in arrays:
        info.rows += len(array) * len(kept)
        for start in range(0, len(array), CHUNK_TOKENS):
            block = np.asarray(array[start : start + CHUNK_TOKENS][:, kept, :], dtype=np.int64)
            batch = _batch(block, kept, start, step, n_experts, name, path, options, info)
            if batch is not None:
                yield batch


def _arrays(path: Path) -> list[tuple[str, np.ndarray]]:
    """The file's arrays, each checked to be [T, L, k] integers with the same L and k."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = [(f"{path}[{name!r}]", archive[name]) for name in archive.files]
        else:
            arrays = [(str(path), np.load(path, mmap_mode="r", allow_pickle=False))]
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable numpy file ({exc})") from None
    if not arrays:
        raise InputError(f"{path}: the archive holds no arrays")
    for name, array in arrays:
        if array.ndim != 3 or array.dtype.kind not in "iu":
            raise InputError(
                f"{name}: expected routed expert ids [tokens, layers, k] of integers, "
                f"found {array.dtype} {list(array.shape)}"
            )
        if array.shape[1:] != arrays[0][1].shape[1:] or array.shape[2] == 0:
            raise InputError(
                f"{name}: shape {list(array.shape)} does not match {list(arrays[0][1].shape)}"
            )
    return arrays


def _experts(path: Path, options: Options, config: ModelConfig | None) -> int:
    if options.num_experts is not None:
        return options.num_experts
    if config is not None and config.num_experts is not None:
        return config.num_experts
    raise InputError(
        f"{path}: expert ids do not say how many experts there are: pass --num-experts E, or "
        "keep the model's config.json beside the files"
    )


def _dense_layers(
    arrays: list[tuple[str, np.ndarray]],
    n_layers: int,
    k: int,
    config: ModelConfig | None,
    path: Path,
) -> np.ndarray:
    """Which layers are not routing: by config.json's MoE layers, else all-zero ids (k >= 2)."""
    if config is not None and config.moe_layers is not None:
        if config.num_layers is not None and config.num_layers != n_layers:
            raise InputError(
                f"{path}: arrays have {n_layers} layers, but {config.path} says "
                f"num_hidden_layers={config.num_layers}"
            )
        return ~np.isin(np.arange(n_layers), sorted(config.moe_layers))
    zero = np.ones(n_layers, dtype=bool)
    if k < 2:
        return ~zero  # with one id per token, all zeros is a real (collapsed) routing
    for _, array in arrays:
        for start in range(0, len(array), CHUNK_TOKENS):
            zero &= ~np.asarray(array[start : start + CHUNK_TOKENS]).any(axis=(0, 2))
    return zero


def _batch(
    block: np.ndarray,
    kept: np.ndarray,
    start: int,
    step: int,
    n_experts: int,
    name: str,
    path: Path,
    options: Options,
    info: FileInfo,
) -> Batch | None:
    """One chunk [c, layers, k] -> top-k id rows, layer by layer; bad token rows raise or go."""
    tokens, _, k = block.shape
    ids = block.transpose(1, 0, 2).reshape(-1, k)
    outside, repeated = bad_ids(ids, n_experts)
    bad = outside | repeated
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        if not options.skip_bad_rows:
            layer, token = int(kept[row // tokens]), start + row % tokens
            problem = (
                f"an expert id outside [0, {n_experts})"
                if outside[row]
                else ("an expert id repeated within one token")
            )
            raise InputError(
                f"{name} token {token} layer {layer}: {problem} "
                "(use --skip-bad-rows to drop such rows)"
            )
        info.skipped_rows += int(bad.sum())
    keep = ~bad
    if not keep.any():
        return None
    frame = pl.DataFrame(
        {
            "step": np.full(int(keep.sum()), step, dtype=np.int64),
            "layer": np.repeat(kept.astype(np.int32), tokens)[keep],
        }
    ).with_columns(pl.Series("topk_ids", ids[keep].astype(np.int32)).cast(pl.Array(pl.Int32, k)))
    return Batch("topk", frame, n_experts, top_k=k)
