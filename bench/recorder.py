"""Recorder overhead: training-step time of a small MoE model on the CPU, with and without
``routelog.Recorder`` (``every=10`` and ``every=1``, ``max_tokens=4096``), side by side.

Each round trains ``steps`` optimizer steps (forward, backward, AdamW) three ways,
interleaved: without a recorder, with one at every=10, with one at every=1. A recorded
round includes creating the recorder and closing it (every file written), so the cost of
the background writer is in the figure. The ratios are of median round times.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _model(torch: Any, transformers: Any) -> Any:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    return transformers.MixtralForCausalLM(config)


def bench_k_l(repeat: int, steps: int = 10, batch: int = 8, seq: int = 512) -> dict[str, Any]:
    """g: every=10 vs none; h: every=1 vs none (batch x seq = 4096 tokens per step)."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        reason = f"needs routelog[transformers] ({exc})"
        return {"k": {"skipped": reason}, "l": {"skipped": reason}}
    from routelog.record import Recorder

    model = _model(torch, transformers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1))
    root = Path(tempfile.mkdtemp(prefix="routelog-bench-record-"))
    try:
        return _measure(model, optimizer, ids, root, repeat, steps, Recorder)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure(
    model: Any, optimizer: Any, ids: Any, root: Path, repeat: int, steps: int, make: Any
) -> dict[str, Any]:
    def train(every: int | None, round_no: int) -> float:
        start = time.perf_counter()
        recorder = None
        if every is not None:
            out = root / f"every{every}_round{round_no}"
            recorder = make(model, out, every=every, max_tokens=4096)
        for step in range(steps):
            if recorder is not None:
                recorder.step(step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if recorder is not None:
            recorder.close()
        return time.perf_counter() - start

    train(1, -1)  # warm-up (allocator, first files)
    times: dict[str, list[float]] = {"none": [], "every=10": [], "every=1": []}
    for round_no in range(repeat):
        times["none"].append(train(None, round_no))
        times["every=10"].append(train(10, round_no))
        times["every=1"].append(train(1, round_no))
    median = {name: statistics.median(values) for name, values in times.items()}
    per_step = {f"{name} per step": value / steps for name, value in median.items()}
    return {
        "k": {"ratio": median["every=10"] / median["none"], "seconds": per_step},
        "l": {"ratio": median["every=1"] / median["none"], "seconds": per_step},
    }
