"""Recorder overhead: training-step time of a small MoE model on the CPU, with and without
``routelog.Recorder`` (``every=10`` and ``every=1``, ``max_tokens=4096``), side by side.

Each round trains ``steps`` optimizer steps (forward, backward, AdamW) three ways,
interleaved: without a recorder, with one at every=10, with one at every=1 (in the reverse
order every other round). ``steps`` is a multiple of 10, so a round at every=10 records the
same share of its steps as a long run (steps 0 and 10 of 20). A recorded round includes
creating the recorder and closing it (every file of the round written), so set-up, the
background writer and the last file are in the figure; creating and closing are also timed
on their own (paid once per run, not per step). The ratios are of median round times.
"""

from __future__ import annotations

import runpy
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = Path(__file__).resolve().parent.parent / "tests" / "record" / "models.py"
"""The recorder tests' small Mixtral, loaded by path (one home for the model set-up)."""


def _mixtral() -> Any:
    """4 layers, hidden size 64, E=8, k=2."""
    mixtral = runpy.run_path(str(MODELS))["mixtral"]
    return mixtral(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        max_position_embeddings=512,
    )


def bench_k_l(repeat: int, steps: int = 20, batch: int = 8, seq: int = 512) -> dict[str, Any]:
    """k: every=10 vs none; l: every=1 vs none (batch x seq = 4096 tokens per step)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        reason = f"needs routelog[transformers] ({exc})"
        return {"k": {"skipped": reason}, "l": {"skipped": reason}}
    from routelog.record import Recorder

    model = _mixtral()
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
    once: dict[str, list[float]] = {"create": [], "close": []}

    def train(every: int | None, name: str, n_steps: int = steps) -> float:
        start = time.perf_counter()
        recorder = None
        if every is not None:
            recorder = make(model, root / name, every=every, max_tokens=4096)
            once["create"].append(time.perf_counter() - start)
        for step in range(n_steps):
            if recorder is not None:
                recorder.step(step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if recorder is not None:
            closing = time.perf_counter()
            recorder.close()
            once["close"].append(time.perf_counter() - closing)
        return time.perf_counter() - start

    train(1, "warm-up", 3)  # allocator, first files, pyarrow's first write
    once = {"create": [], "close": []}
    ways: list[tuple[str, int | None]] = [("none", None), ("every=10", 10), ("every=1", 1)]
    times: dict[str, list[float]] = {name: [] for name, _ in ways}
    for round_no in range(repeat):
        # the order flips every round, so no way always runs first (or last) in a round
        for name, every in ways if round_no % 2 == 0 else ways[::-1]:
            times[name].append(train(every, f"{name}_round{round_no}"))
    median = {name: statistics.median(values) for name, values in times.items()}
    seconds = {f"{name} per step": value / steps for name, value in median.items()}
    seconds.update({f"recorder {name}": statistics.median(v) for name, v in once.items()})
    return {
        "k": {"ratio": median["every=10"] / median["none"], "seconds": seconds},
        "l": {"ratio": median["every=1"] / median["none"], "seconds": seconds},
    }
