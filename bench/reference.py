"""The hand-written competitor: what a competent engineer writes with pyarrow and numpy.

It reads the same Parquet file and computes the same metrics per (step, layer) as
``routelog analyze`` (token, load and assignment entropy, max load share, max_vio, load_cv,
dead experts, aux loss, top-1 probability): the whole file in one ``pyarrow`` read (on all
cores), the probabilities as one zero-copy (T, E) numpy view, and each statistic as one
vectorized pass over all tokens (``argpartition`` for the top-k, ``bincount`` and
``add.reduceat`` to sum per group); no validation, no streaming, the whole file in memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _entropy(q: np.ndarray) -> np.ndarray:
    """-sum q ln q along the last axis (0 ln 0 = 0: zeros are clipped to the tiniest float)."""
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
    if np.any(keys[1:] < keys[:-1]):  # rows come sorted by (step, layer) in most logs
        order = np.argsort(keys, kind="stable")
        step, layer, probs, keys = step[order], layer[order], probs[order], keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    n_tokens = np.diff(np.r_[starts, len(keys)])
    group = np.repeat(np.arange(len(starts)), n_tokens)
    if top_k == 1:
        chosen = probs.argmax(axis=1)[:, None]
    else:
        chosen = np.argpartition(probs, n_experts - top_k, axis=1)[:, n_experts - top_k :]
    counts = np.bincount(
        (group[:, None] * n_experts + chosen).ravel(), minlength=len(starts) * n_experts
    ).reshape(len(starts), n_experts)
    token_entropy = np.add.reduceat(_entropy(probs), starts) / n_tokens
    mean_probs = np.add.reduceat(probs, starts, axis=0, dtype=np.float64) / n_tokens[:, None]
    top1 = np.add.reduceat(probs.max(axis=1), starts, dtype=np.float64) / n_tokens
    log_e = np.log(n_experts)
    rows = []
    for g, start in enumerate(starts):  # one row per (step, layer), from E-sized vectors
        c = counts[g].astype(np.float64)
        share = c / c.sum()
        load_entropy = float(_entropy(mean_probs[g]))
        rows.append(
            {
                "step": int(step[start]),
                "layer": int(layer[start]),
                "n_tokens": int(n_tokens[g]),
                "token_entropy": float(token_entropy[g]),
                "token_entropy_norm": float(token_entropy[g]) / log_e,
                "load_entropy": load_entropy,
                "load_entropy_norm": load_entropy / log_e,
                "assign_entropy": float(_entropy(share)),
                "mutual_info": load_entropy - float(token_entropy[g]),
                "max_load_share": float(share.max()),
                "max_vio": float(c.max() / c.mean() - 1),
                "load_cv": float(c.std() / c.mean()),
                "dead_experts": int((share < dead_fraction / n_experts).sum()),
                "aux_loss": float(n_experts * (c / n_tokens[g] * mean_probs[g]).sum()),
                "top1_prob": float(top1[g]),
            }
        )
    return rows


if __name__ == "__main__":
    for row in metrics(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1):
        print(row)
