"""The same routing as a Megatron-LM router trace (+ bf16 logits sidecar) and as Parquet.

For measure (g) of ``make bench``: reading ``router_trace_rank0.jsonl`` with its
``logits_rank0.bin`` against reading the same tokens' logits from a Parquet file, per byte of
payload (the bytes on disk each path reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LAYERS = 8
RECORD_TOKENS = 4096
"""Tokens per trace record: one micro-batch of one layer, as the tracer writes it."""


def write_pair(root: Path, *, tokens: int, experts: int, top_k: int, seed: int = 7) -> Path:
    """Write ``root/trace`` (trace + sidecar) and ``root/log.parquet`` with the same logits.

    Returns ``root``; does nothing when both are already there.
    """
    trace_dir = root / "trace"
    parquet = root / "log.parquet"
    if (trace_dir / "router_trace_rank0.jsonl").exists() and parquet.exists():
        return root
    trace_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bias = rng.normal(0.0, 0.5, size=experts).astype(np.float32)
    schema = pa.schema(
        [("step", pa.int64()), ("layer", pa.int32()), ("logits", pa.list_(pa.float32(), experts))]
    )
    per_layer = max(tokens // LAYERS, 1)
    offset = 0
    with (
        (trace_dir / "router_trace_rank0.jsonl").open("w") as trace,
        (trace_dir / "logits_rank0.bin").open("wb") as sidecar,
        pq.ParquetWriter(parquet, schema, compression="zstd") as writer,
    ):
        for layer in range(LAYERS):
            for start in range(0, per_layer, RECORD_TOKENS):
                n = min(RECORD_TOKENS, per_layer - start)
                logits = rng.standard_normal((n, experts), dtype=np.float32) * 1.5 + bias
                bits = (logits.view(np.uint32) >> 16).astype("<u2")  # bfloat16, truncated
                decoded = (bits.astype(np.uint32) << 16).view(np.float32)
                top = np.argsort(-decoded, axis=1, kind="stable")[:, :top_k]
                data = bits.tobytes()
                sidecar.write(data)
                record = {
                    "step": 0,
                    "stage": "pre_dispatch",
                    "block": "decoder",
                    "layer": layer,
                    "rank": 0,
                    "num_tokens": n,
                    "topk": top_k,
                    "logit_offset": offset,
                    "logit_bytes": len(data),
                    "logit_shape": [n, experts],
                    "top_indices": top.tolist(),
                }
                trace.write(json.dumps(record) + "\n")
                offset += len(data)
                flat = pa.array(decoded.ravel(), type=pa.float32())
                table = pa.table(
                    {
                        "step": pa.array(np.zeros(n, dtype=np.int64)),
                        "layer": pa.array(np.full(n, layer, dtype=np.int32)),
                        "logits": pa.FixedSizeListArray.from_arrays(flat, experts),
                    },
                    schema=schema,
                )
                writer.write_table(table)
    return root


def payload_bytes(root: Path) -> dict[str, int]:
    """Bytes on disk of each path's input."""
    trace = root / "trace"
    return {
        "megatron trace + sidecar": sum(p.stat().st_size for p in trace.iterdir()),
        "parquet": (root / "log.parquet").stat().st_size,
    }
