"""Synthetic routing logs for the benchmark: per-token float32 probabilities, zstd Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 1 << 17
"""Rows per Parquet row group, as a streaming dump writer flushes them (32 MB at E=64)."""
LAYERS = 8


def write_log(
    path: Path, *, tokens: int, experts: int, step: int = 0, seed: int = 0, chunk: int = 1 << 18
) -> Path:
    """Write ``tokens`` routed tokens spread over ``LAYERS`` layers as one Parquet file.

    Probabilities are a softmax of Gaussian logits (a router a few steps into training), so
    rows are valid, top-k choices are unbalanced enough to be interesting, and the payload
    barely compresses, as real router outputs do.
    """
    rng = np.random.default_rng(seed)
    bias = rng.normal(0.0, 0.5, size=experts).astype(np.float32)
    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("layer", pa.int32()),
            ("token", pa.int64()),
            ("probs", pa.list_(pa.float32(), experts)),
        ]
    )
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, tokens, chunk):
            n = min(chunk, tokens - start)
            logits = rng.standard_normal((n, experts), dtype=np.float32) * 1.5 + bias
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            index = np.arange(start, start + n)
            layer = (index * LAYERS // tokens).astype(np.int32)
            values = pa.array(probs.ravel(), type=pa.float32())
            batch = pa.record_batch(
                [
                    pa.array(np.full(n, step, dtype=np.int64)),
                    pa.array(layer),
                    pa.array(index - layer.astype(np.int64) * (tokens // LAYERS)),
                    pa.FixedSizeListArray.from_arrays(values, experts),
                ],
                schema=schema,
            )
            writer.write_table(pa.Table.from_batches([batch]), row_group_size=ROW_GROUP_ROWS)
    tmp.replace(path)
    return path
