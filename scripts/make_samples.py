"""Write the deterministic sample runs in sample_logs/ (run with `make samples`).

Each run: 4 MoE layers, 8 experts, 12 logged steps (every 100 steps), the same probe batch of
512 tokens at every step. Router logits are beta(step) * z_t + b(step): z_t are the tokens'
fixed expert preferences (slowly drifting, so top-1 choices settle as training goes on), beta
sharpens the router over training, and b is a per-expert bias (load imbalance). The shapes
follow the real Mixtral dumps in ../shared/real_logs: token entropy decays from about 0.99
to 0.75 in a healthy layer, and drops to near 0 within a step or two in a collapsing one.

- healthy/  logits, entropy decays but stays well clear of zero, load stays balanced.
- collapse/ logits; layers 2 and 3 collapse at step 500 onto experts 0 and 1 (several experts
            dead, token entropy near 0); layers 0 and 1 stay healthy.
- drift/    probabilities; token entropy of every layer falls steadily, still above the
            rigidity threshold at the last step (the forecast rule names the crossing).
- megatron-tpe/ Megatron-LM style tokens-per-expert counts (JSONL, one line per iteration and
            layer, 4 micro-batches of 1024 routed slots each): balanced load, except layer 3
            whose router drifts onto experts 0 and 1 from iteration 600 (count-only report).
- routelog/samples/collapse/ (packaged in the wheel, for `routelog demo`): a small collapse/.
- shift/    logits with a `dataset` column: 256 `text` and 256 `code` tokens per layer at
            steps 0, 100, 200. In layers 2 and 3 the `code` tokens lean on experts 5 and 6
            (a distribution shift, `compare --by dataset`); layers 0 and 1 route both alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

LAYERS = 4
EXPERTS = 8
TOKENS = 512
STEPS = [100 * i for i in range(12)]
SEED = 20261123


def _logits(rng: np.random.Generator, z: np.ndarray, beta: float, bias: np.ndarray) -> np.ndarray:
    noise = rng.normal(scale=0.05, size=z.shape)
    return (beta * (z + noise) + bias).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def healthy_beta(step: int, layer: int) -> float:
    return 0.3 + 0.9 * (1 - np.exp(-step / 400)) * (1 + 0.1 * layer)


def collapse_params(step: int, layer: int) -> tuple[float, np.ndarray]:
    bias = np.zeros(EXPERTS)
    if layer < 2 or step < 500:
        return healthy_beta(step, layer), bias
    bias[0], bias[1] = 20.0 + layer, 19.0
    return 3.0, bias


def drift_beta(step: int, layer: int) -> float:
    return 0.5 + 0.42 * step / 100 * (1 + 0.05 * layer)


def write_run(root: Path, name: str, rng: np.random.Generator) -> None:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    z = rng.normal(size=(LAYERS, TOKENS, EXPERTS))
    for step in STEPS:
        z = z + rng.normal(scale=0.3 * np.exp(-step / 600), size=z.shape)
        frames = []
        for layer in range(LAYERS):
            if name == "collapse":
                beta, bias = collapse_params(step, layer)
            elif name == "drift":
                beta, bias = drift_beta(step, layer), np.zeros(EXPERTS)
            else:
                beta, bias = healthy_beta(step, layer), np.zeros(EXPERTS)
            logits = _logits(rng, z[layer], beta, bias)
            payload = {"probs": _softmax(logits)} if name == "drift" else {"logits": logits}
            frames.append(
                pl.DataFrame(
                    {
                        "step": np.full(TOKENS, step, dtype=np.int64),
                        "layer": np.full(TOKENS, layer, dtype=np.int32),
                        "token": np.arange(TOKENS, dtype=np.int64),
                        **payload,
                    }
                )
            )
        pl.concat(frames).write_parquet(out / f"step_{step:06d}.parquet", compression="zstd")


def write_megatron_tpe(root: Path) -> None:
    """Counts per micro-batch, as Megatron-LM's --save-tokens-per-expert-interval dumps them."""
    rng = np.random.default_rng(SEED + 1)  # its own stream: the other samples stay unchanged
    out = root / "megatron-tpe"
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in STEPS:
        for layer in range(LAYERS):
            weights = np.ones(EXPERTS)
            if layer == 3 and step >= 600:
                weights[:2] += 2.0 * (step - 500) / 100
            share = weights / weights.sum()
            tpe = rng.multinomial(1024, share, size=4)
            lines.append(json.dumps({"iter": step, "layer": layer, "tpe": tpe.tolist()}))
    (out / "tokens_per_expert.jsonl").write_text("\n".join(lines) + "\n")


SHIFT_SEED = 20261124
SHIFT_STEPS = [0, 100, 200]
SHIFT_TOKENS = 256


def write_shift_run(root: Path) -> None:
    """Two datasets, the second shifted towards experts 5 and 6 in layers 2 and 3."""
    rng = np.random.default_rng(SHIFT_SEED)
    out = root / "shift"
    out.mkdir(parents=True, exist_ok=True)
    z = {dataset: rng.normal(size=(LAYERS, SHIFT_TOKENS, EXPERTS)) for dataset in ("text", "code")}
    for step in SHIFT_STEPS:
        frames = []
        for layer in range(LAYERS):
            for dataset, prefs in z.items():
                bias = np.zeros(EXPERTS)
                if dataset == "code" and layer >= 2:
                    bias[5], bias[6] = 2.5, 2.0
                logits = _logits(rng, prefs[layer], healthy_beta(step, layer), bias)
                frames.append(
                    pl.DataFrame(
                        {
                            "step": np.full(SHIFT_TOKENS, step, dtype=np.int64),
                            "layer": np.full(SHIFT_TOKENS, layer, dtype=np.int32),
                            "dataset": [dataset] * SHIFT_TOKENS,
                            "token": np.arange(SHIFT_TOKENS, dtype=np.int64),
                            "logits": logits,
                        }
                    )
                )
        pl.concat(frames).write_parquet(out / f"step_{step:06d}.parquet", compression="zstd")


PACKAGED_SEED = 20261125
PACKAGED_TOKENS = 64
PACKAGED_STEPS = [100 * i for i in range(8)]


def write_packaged_sample(root: Path) -> None:
    """The small collapsing run shipped inside the wheel (``routelog demo``), in one file.

    The same model as collapse/ (layers 2 and 3 collapse at step 500) on 64 tokens and 8 steps,
    logits rounded to 0.01: a few tens of KB, so every installation can show a real report.
    """
    rng = np.random.default_rng(PACKAGED_SEED)
    out = root / "collapse"
    out.mkdir(parents=True, exist_ok=True)
    z = rng.normal(size=(LAYERS, PACKAGED_TOKENS, EXPERTS))
    frames = []
    for step in PACKAGED_STEPS:
        z = z + rng.normal(scale=0.3 * np.exp(-step / 600), size=z.shape)
        for layer in range(LAYERS):
            beta, bias = collapse_params(step, layer)
            logits = np.round(_logits(rng, z[layer], beta, bias), 2)
            frames.append(
                pl.DataFrame(
                    {
                        "step": np.full(PACKAGED_TOKENS, step, dtype=np.int64),
                        "layer": np.full(PACKAGED_TOKENS, layer, dtype=np.int32),
                        "token": np.arange(PACKAGED_TOKENS, dtype=np.int64),
                        "logits": logits.astype(np.float32),
                    }
                )
            )
    pl.concat(frames).write_parquet(
        out / "router_logits.parquet", compression="zstd", compression_level=22
    )


def main(root: Path, package_root: Path | None = None) -> None:
    """Write the runs of sample_logs/ under ``root``, and the packaged sample under
    ``package_root`` (default: routelog/samples/ next to this script's repository)."""
    rng = np.random.default_rng(SEED)
    for name in ("healthy", "collapse", "drift"):
        write_run(root, name, rng)
    write_megatron_tpe(root)
    write_shift_run(root)
    repository = Path(__file__).resolve().parents[1]
    write_packaged_sample(package_root or repository / "routelog" / "samples")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "sample_logs"))
