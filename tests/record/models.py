"""The small Mixtral (built from a config, no download) that the recorder's tests and its
benchmark train: ``bench/recorder.py`` loads this file by path, so the package itself never
depends on test code."""

from __future__ import annotations

from typing import Any

TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
}
"""Two MoE layers, E=4, k=2: a few milliseconds per step."""


def mixtral(**config: Any) -> Any:
    """A ``MixtralForCausalLM`` with :data:`TINY`'s config updated by ``config``, weights
    drawn from torch's seed 0 (the same model every call)."""
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**TINY, **config}))
