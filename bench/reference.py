"""The hand-written competitor: what a competent engineer writes with pyarrow and numpy.

It reads the same Parquet file and computes the same metrics per (step, layer) as
``routelog analyze`` (token, load and assignment entropy, max load share, max_vio, load_cv,
dead experts, aux loss, top-1 probability) with vectorized numpy: the whole file in one
multi-threaded ``pyarrow`` read, the probabilities as one zero-copy (T, E) view, then per
(step, layer) block one vectorized pass per statistic (``argpartition`` for the top-k); no
validation, no streaming. Whole-file passes instead of per-block ones were measured slower
(1.5x: temporaries of the whole file's size), and so was ``np.add.reduceat`` along rows.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _entropy(q: np.ndarray) -> np.ndarray:
    """-sum q ln q along the last axis; zeros are clipped to the tiniest float, so 0 ln 0 = 0
    (a masked ``np.log(q, where=q > 0)`` is 3 to 4 times slower)."""
    logs = np.log(np.maximum(q, np.finfo(q.dtype).tiny))
    result: np.ndarray = -(q * logs).sum(axis=-1, dtype=np.float64)
    return result


def metrics(path: Path, top_k: int, dead_fraction: float = 0.1) -> list[dict[str, float]]:
    """One dict of metrics per (step, layer), like the rows of ``routelog analyze``."""
    table = pq.read_table(path, columns=["step", "layer", "probs"])
    probs_column = table.column("probs").combine_chunks()
    n_experts = probs_column.type.list_size
    probs = probs_column.flatten().to_numpy().reshape(-1, n_experts)
    step = table.column("step").to_numpy()
    layer = table.column("layer").to_numpy()
    return metrics_of_arrays(step, layer, probs, top_k, dead_fraction)


def metrics_of_arrays(
    step: np.ndarray, layer: np.ndarray, probs: np.ndarray, top_k: int, dead_fraction: float = 0.1
) -> list[dict[str, float]]:
    """The metrics of (T,) step and layer ids and (T, E) probabilities."""
    n_experts = probs.shape[1]
    keys = step * 1_000_003 + layer
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    bounds = np.r_[starts, len(keys)]
    contiguous = bool(np.all(order == np.arange(len(order))))
    rows = []
    for start, stop in itertools.pairwise(bounds):
        block = probs[start:stop] if contiguous else probs[order[start:stop]]
        n_tokens = len(block)
        token_entropy = float(_entropy(block).mean())
        if top_k == 1:
            chosen = block.argmax(axis=1)[:, None]
        else:
            chosen = np.argpartition(block, n_experts - top_k, axis=1)[:, n_experts - top_k :]
        counts = np.bincount(chosen.ravel(), minlength=n_experts).astype(np.float64)
        share = counts / counts.sum()
        mean_probs = block.mean(axis=0, dtype=np.float64)
        load_entropy = float(_entropy(mean_probs))
        log_e = np.log(n_experts)
        rows.append(
            {
                "step": int(step[order[start]]),
                "layer": int(layer[order[start]]),
                "n_tokens": n_tokens,
                "token_entropy": token_entropy,
                "token_entropy_norm": token_entropy / log_e,
                "load_entropy": load_entropy,
                "load_entropy_norm": load_entropy / log_e,
                "assign_entropy": float(_entropy(share)),
                "mutual_info": load_entropy - token_entropy,
                "max_load_share": float(share.max()),
                "max_vio": float(counts.max() / counts.mean() - 1),
                "load_cv": float(counts.std() / counts.mean()),
                "dead_experts": int((share < dead_fraction / n_experts).sum()),
                "aux_loss": float(n_experts * (counts / n_tokens * mean_probs).sum()),
                "top1_prob": float(block.max(axis=1).mean(dtype=np.float64)),
            }
        )
    return rows


if __name__ == "__main__":
    for row in metrics(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1):
        print(row)
