"""TensorRT-LLM expert statistics (``EXPERT_STATISTIC_ITER_RANGE=a-b``,
``EXPERT_STATISTIC_PATH=DIR``; ``tensorrt_llm/_torch/expert_statistic.py``).

Each rank writes ``rank{r}.safetensors``, whose tensors are keyed ``"{iter}_{layer}"`` and hold
int64 [num_experts] counts of expert slots routed in that iteration and decoder layer (layer
numbers are absolute decoder indices: DeepSeek-R1's MoE layers are 3-60). Rank 0 also writes
``meta_info.json``: ``{"num_experts", "num_experts_per_token"}``. The iteration is the step;
ranks of one iteration and layer add up (their files merge like any files of a run).

The file is read with the ``safetensors`` package's numpy API (no torch).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from routelog.errors import InputError
from routelog.ingest import Batch, FileInfo
from routelog.ingest.table import MAX_COUNT
from routelog.modelconfig import find_model_config

if TYPE_CHECKING:
    from routelog.options import Options

META_NAME = "meta_info.json"
MAX_META_BYTES = 1 << 20
KEY = re.compile(r"^(\d+)_(\d+)$")
LAYOUT = "expert statistic"


def depends(path: Path) -> list[Path]:
    """meta_info.json beside the file, and the model's config.json (k when meta is absent)."""
    meta = path.with_name(META_NAME)
    config = find_model_config(path)
    return [*([meta] if meta.is_file() else []), *([config.path] if config else [])]


def _meta(path: Path) -> tuple[int | None, int | None]:
    """(num_experts, num_experts_per_token) from meta_info.json; (None, None) without one."""
    meta = path.with_name(META_NAME)
    if not meta.is_file():
        return None, None
    try:
        if meta.stat().st_size > MAX_META_BYTES:
            raise InputError(f"{meta}: too large for TensorRT-LLM's meta_info.json")
        document = json.loads(meta.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{meta}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InputError(f"{meta}: expected a JSON object")
    values = []
    for key in ("num_experts", "num_experts_per_token"):
        value = document.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"{meta}: {key} must be a positive integer, not {value!r}")
        if value is not None and value < 1:
            raise InputError(f"{meta}: {key} must be a positive integer, not {value!r}")
        values.append(value)
    return values[0], values[1]


def scan(path: Path, options: Options, info: FileInfo) -> Iterator[Batch]:
    """Read one rank's statistics into a batch of counts per (iteration, layer)."""
    from safetensors import SafetensorError, safe_open

    info.layout = LAYOUT
    info.payload = "counts"
    n_experts, top_k = _meta(path)
    if top_k is None:
        config = find_model_config(path)
        top_k = config.top_k if config is not None else None
    rows: list[tuple[int, int, np.ndarray]] = []
    empty = 0
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = sorted(handle.keys(), key=_order)
            for key in keys:
                place = f"{path} key {key!r}"
                found = KEY.match(key)
                if found is None:
                    _bad(f"{place}: not '{{iter}}_{{layer}}'", options, info)
                    continue
                step, layer = int(found.group(1)), int(found.group(2))
                info.rows += 1
                if not _selected(step, layer, options):
                    continue
                counts = _counts(handle.get_tensor(key), place, n_experts, options, info)
                if counts is None:
                    continue
                if n_experts is None:
                    n_experts = len(counts)
                if counts.sum() == 0:
                    empty += 1  # an iteration without tokens: no routing to count
                    continue
                rows.append((step, layer, counts))
    except SafetensorError as exc:
        raise InputError(f"{path}: not a valid safetensors file ({exc})") from None
    if empty:
        info.warn(f"{empty} all-zero counts (no tokens routed) left out")
    if not rows or n_experts is None:
        return
    frame = pl.DataFrame(
        {
            "step": np.array([r[0] for r in rows], dtype=np.int64),
            "layer": np.array([r[1] for r in rows], dtype=np.int32),
        }
    ).with_columns(
        pl.Series("counts", np.stack([r[2] for r in rows])).cast(pl.Array(pl.Int64, n_experts))
    )
    yield Batch("counts", frame, n_experts, top_k=top_k)


def _order(key: str) -> tuple[int, int, str]:
    found = KEY.match(key)
    return (int(found.group(1)), int(found.group(2)), key) if found else (-1, -1, key)


def _selected(step: int, layer: int, options: Options) -> bool:
    if options.layers is not None and layer not in options.layers:
        return False
    return options.steps is None or step in options.steps


def _bad(message: str, options: Options, info: FileInfo) -> None:
    if not options.skip_bad_rows:
        raise InputError(f"{message} (use --skip-bad-rows to skip such entries)")
    info.skipped_rows += 1


def _counts(
    tensor: Any, place: str, n_experts: int | None, options: Options, info: FileInfo
) -> np.ndarray | None:
    """One entry's counts, checked: 1-D, integer, E long, non-negative."""
    values = np.asarray(tensor)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        _bad(
            f"{place}: expected int64 [num_experts] counts, found {values.dtype} "
            f"{list(values.shape)}",
            options,
            info,
        )
        return None
    if n_experts is not None and len(values) != n_experts:
        _bad(f"{place}: {len(values)} counts, but num_experts is {n_experts}", options, info)
        return None
    if len(values) == 0 or (values < 0).any():
        _bad(f"{place}: negative or no counts", options, info)
        return None
    if (values > MAX_COUNT).any() or int(values.astype(np.float64).sum()) > MAX_COUNT:
        # an int64 sum would wrap round (a uint64 one already has): exact only up to 2^53
        _bad(f"{place}: counts beyond 2^53 tokens", options, info)
        return None
    return values.astype(np.int64)
