"""SGLang expert-distribution dumps (``--expert-distribution-recorder-mode``, files in
``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``; ``python/sglang/srt/eplb/expert_distribution.py``).

Modes ``stat`` and ``stat_approx`` write ``expert_distribution_recorder_{unix_time}.pt`` on
rank 0: ``{"rank": 0, "logical_count": int32 [S, L, E], ...}``, the counts of S forward passes
in a circular buffer (all-zero rows where unused) over L layers (dense layers are all-zero
rows) and E logical experts, already summed over ranks. One dump is one step: the dumps of a
directory are numbered 0, 1, 2, ... in the order of their time stamps, and each step's counts
are summed over the buffer's non-zero passes.

Modes ``per_pass`` and ``per_token`` write ``expert_distribution_recorder_{unix_time}_{rank}.pt``
per rank: ``{"records": [{"forward_pass_id", "rank", "gatherer_key", "global_physical_count":
int32 [L, E_physical], ...}], "last_physical_to_logical_map": [L, E_physical]}``; ``per_token``
records add ``topk_ids_of_layer`` int32 [L, T, 8], padded with -1. Ids and counts name
PHYSICAL experts (replicas placed by expert-parallel load balancing): they are mapped to
logical experts with ``last_physical_to_logical_map`` before anything is counted. The step
is the record's ``forward_pass_id``; ranks' records of one forward pass add up.

Layers through which no token was routed (dense layers) are left out and listed in a warning.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo, _torchfile
from routelog.modelconfig import find_model_config
from routelog.options import MAX_EXPERTS

if TYPE_CHECKING:
    from routelog.options import Options

STAT_NAME = re.compile(r"^expert_distribution_recorder_(\d+(?:\.\d+)?)\.pt$")
PADDING = -1


def _stat_dumps(directory: Path) -> list[Path]:
    """The stat-mode dumps of a directory, in the order of their time stamps."""
    found = [(float(m.group(1)), p) for p in directory.iterdir() if (m := STAT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def depends(path: Path) -> list[Path]:
    """A stat dump's step is its place among its directory's dumps; config.json gives E, k."""
    config = find_model_config(path)
    siblings = _stat_dumps(path.parent) if STAT_NAME.match(path.name) else []
    return [*siblings, *([config.path] if config is not None else [])]


def scan(path: Path, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read a stat dump (counts per step) or a per-pass/per-token dump (per forward pass)."""
    content = _torchfile.load(path)
    if not isinstance(content, dict):
        raise InputError(
            f"{path}: expected SGLang's dict with 'logical_count' or 'records', "
            f"found {type(content).__name__}"
        )
    config = find_model_config(path)
    top_k = config.top_k if config is not None else None
    if "logical_count" in content:
        yield from _stat(path, content["logical_count"], top_k, options, info)
    elif "records" in content:
        yield from _records(path, content, config, options, info)
    else:
        keys = ", ".join(repr(k) for k in list(content)[:8])
        raise InputError(
            f"{path}: an SGLang dump holds 'logical_count' (stat) or 'records' "
            f"(per_pass, per_token); found {keys}"
        )


def _stat(
    path: Path, counts: Any, top_k: int | None, options: Options, info: FileInfo
) -> Iterator[Batch]:
    info.layout = "stat dump"
    info.payload = "counts"
    if not (isinstance(counts, np.ndarray) and counts.ndim == 3 and counts.dtype.kind in "iu"):
        raise InputError(f"{path}: 'logical_count' must be an integer tensor [S, L, E]")
    if (counts < 0).any():
        layer = int(np.argwhere(counts < 0)[0][1])
        raise InputError(f"{path}: negative count in 'logical_count' layer {layer}")
    used = counts.reshape(len(counts), -1).any(axis=1)
    info.rows += int(used.sum())
    summed = counts[used].sum(axis=0, dtype=np.int64)
    n_experts = summed.shape[1]
    step = _stat_dumps(path.parent).index(path)
    routed = summed.any(axis=1)
    _warn_dense(info, ~routed)
    layers = np.flatnonzero(routed)
    if options.layers is not None:
        layers = np.array([la for la in layers if la in options.layers], dtype=np.int64)
    if options.steps is not None and step not in options.steps:
        return
    if len(layers) == 0:
        return
    frame = pl.DataFrame(
        {"step": np.full(len(layers), step, dtype=np.int64), "layer": layers.astype(np.int32)}
    ).with_columns(pl.Series("counts", summed[layers]).cast(pl.Array(pl.Int64, n_experts)))
    yield Batch("counts", frame, n_experts, top_k=top_k)


def _warn_dense(info: FileInfo, dense: np.ndarray) -> None:
    if dense.any():
        layers = ", ".join(str(int(la)) for la in np.flatnonzero(dense))
        plural = "layers" if int(dense.sum()) > 1 else "layer"
        info.warn(f"{plural} {layers} routed no tokens (dense layers): left out")


def _records(
    path: Path, content: dict[str, Any], config: Any, options: Options, info: FileInfo
) -> Iterator[Batch]:
    records = content["records"]
    mapping = content.get("last_physical_to_logical_map")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path}: 'records' must be a list of dicts")
    if not (isinstance(mapping, np.ndarray) and mapping.ndim == 2 and mapping.dtype.kind in "iu"):
        raise InputError(
            f"{path}: 'last_physical_to_logical_map' must be an integer [L, E_physical]"
        )
    mapping = mapping.astype(np.int64)
    n_experts = options.num_experts
    if n_experts is None and config is not None:
        n_experts = config.num_experts
    if n_experts is None:
        n_experts = int(mapping.max()) + 1 if mapping.size else 1
    if n_experts > MAX_EXPERTS:
        raise InputError(
            f"{path}: 'last_physical_to_logical_map' names logical expert {n_experts - 1}, "
            f"beyond the {MAX_EXPERTS} experts routelog handles"
        )
    if mapping.size and (mapping.min() < 0 or mapping.max() >= n_experts):
        raise InputError(
            f"{path}: 'last_physical_to_logical_map' names logical experts outside [0, {n_experts})"
        )
    per_token = any("topk_ids_of_layer" in r for r in records)
    info.layout = "per-token dump" if per_token else "per-pass dump"
    info.payload = "top-k ids" if per_token else "counts"
    top_k = config.top_k if config is not None else None
    routed = np.zeros(len(mapping), dtype=bool)
    for index, record in enumerate(records):
        place = f"{path} record {index}"
        step = record.get("forward_pass_id")
        if isinstance(step, bool) or not isinstance(step, int):
            _bad(f"{place}: no integer 'forward_pass_id'", options, info)
            continue
        if per_token:
            batches = _per_token(record, step, mapping, n_experts, place, routed, options, info)
        else:
            batches = _per_pass(
                record, step, mapping, n_experts, top_k, place, routed, options, info
            )
        yield from batches
    _warn_dense(info, ~routed)


def _bad(message: str, options: Options, info: FileInfo) -> None:
    if not options.skip_bad_rows:
        raise InputError(f"{message} (use --skip-bad-rows to skip such records)")
    info.skipped_rows += 1


def _layers(options: Options, n_layers: int) -> np.ndarray:
    every = np.arange(n_layers)
    if options.layers is None:
        return every
    layers = options.layers
    kept: np.ndarray = every[np.array([int(layer) in layers for layer in every], dtype=bool)]
    return kept


def _per_pass(
    record: dict[str, Any],
    step: int,
    mapping: np.ndarray,
    n_experts: int,
    top_k: int | None,
    place: str,
    routed: np.ndarray,
    options: Options,
    info: FileInfo,
) -> Iterator[Batch]:
    physical = record.get("global_physical_count")
    if not (isinstance(physical, np.ndarray) and physical.shape == mapping.shape):
        shape = list(physical.shape) if isinstance(physical, np.ndarray) else None
        _bad(
            f"{place}: 'global_physical_count' {shape} does not match the map "
            f"{list(mapping.shape)}",
            options,
            info,
        )
        return
    if physical.dtype.kind not in "iu" or (physical < 0).any():
        _bad(f"{place}: 'global_physical_count' must hold non-negative integers", options, info)
        return
    info.rows += 1
    n_layers = len(mapping)
    info.dense.claim(info.path, n_layers, n_experts, physical.size, "physical counts")
    flat = (np.arange(n_layers)[:, None] * n_experts + mapping).ravel()
    weights = physical.astype(np.int64).ravel()
    logical = np.bincount(flat, weights=weights, minlength=n_layers * n_experts)
    counts = logical.astype(np.int64).reshape(n_layers, n_experts)
    has = np.asarray(counts.any(axis=1), dtype=bool)
    routed |= has
    if options.steps is not None and step not in options.steps:
        return
    layers = _layers(options, n_layers)
    layers = layers[has[layers]]
    if len(layers) == 0:
        return
    frame = pl.DataFrame(
        {"step": np.full(len(layers), step, dtype=np.int64), "layer": layers.astype(np.int32)}
    ).with_columns(pl.Series("counts", counts[layers]).cast(pl.Array(pl.Int64, n_experts)))
    yield Batch("counts", frame, n_experts, top_k=top_k)


def _per_token(
    record: dict[str, Any],
    step: int,
    mapping: np.ndarray,
    n_experts: int,
    place: str,
    routed: np.ndarray,
    options: Options,
    info: FileInfo,
) -> Iterator[Batch]:
    ids = record.get("topk_ids_of_layer")
    n_layers, n_physical = mapping.shape
    if not (
        isinstance(ids, np.ndarray)
        and ids.ndim == 3
        and ids.dtype.kind in "iu"
        and len(ids) == n_layers
    ):
        shape = list(ids.shape) if isinstance(ids, np.ndarray) else None
        _bad(f"{place}: 'topk_ids_of_layer' {shape} is not [{n_layers}, T, k]", options, info)
        return
    ids = ids.astype(np.int64)
    outside: np.ndarray = (ids < PADDING) | (ids >= n_physical)
    if outside.any():
        layer, token, _ = (int(x) for x in np.argwhere(outside)[0])
        _bad(
            f"{place}: physical expert id {int(ids[layer, token][outside[layer, token]][0])} "
            f"(layer {layer}, token {token}) is outside the map's {n_physical} physical experts",
            options,
            info,
        )
        return
    info.rows += ids.shape[1]
    valid = ids != PADDING
    flat = np.arange(n_layers)[:, None, None] * n_physical + np.where(valid, ids, 0)
    logical = np.where(valid, mapping.ravel()[flat], n_experts)  # padding sorts last
    per_token = valid.sum(axis=2)
    routed |= per_token.any(axis=1)
    if options.steps is not None and step not in options.steps:
        return
    batches = []
    for layer in _layers(options, n_layers):
        width = int(per_token[layer].max()) if ids.shape[1] else 0
        if width == 0:
            continue  # a dense layer, or a pass without tokens: no routing
        tokens = per_token[layer] > 0
        short = tokens & (per_token[layer] != width)
        chosen = np.sort(logical[layer][tokens], axis=1)[:, :width]
        repeated = (chosen[:, 1:] == chosen[:, :-1]).any(axis=1)
        if short.any() or repeated.any():
            what = "fewer ids than the others" if short.any() else "a logical expert twice"
            _bad(f"{place}: a token of layer {layer} has {what}", options, info)
            return
        frame = pl.DataFrame(
            {
                "step": np.full(len(chosen), step, dtype=np.int64),
                "layer": np.full(len(chosen), layer, dtype=np.int32),
            }
        ).with_columns(
            pl.Series("topk_ids", chosen.astype(np.int32)).cast(pl.Array(pl.Int32, width))
        )
        batches.append(Batch("topk", frame, n_experts, top_k=width))
    yield from batches
