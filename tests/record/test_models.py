"""The recorder on real transformers models built from tiny configs (no download).

For each family: the recording, analysed by routelog, equals metrics computed here directly
from the router modules' own outputs (captured by a separate hook in the test: entropy via
scipy, counts via numpy, mismatch via Python sets); dense layers are not recorded; the
model's outputs are bit-identical with and without the recorder; hooks are gone after close.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scipy.special import expit, softmax  # noqa: E402
from scipy.stats import entropy  # noqa: E402

import routelog  # noqa: E402
from routelog.record import Recorder  # noqa: E402

COMMON = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "num_hidden_layers": 2,
}

# family: (config class, router class, score, extra config, MoE layers)
FAMILIES: dict[str, tuple[str, str, str, dict[str, Any], list[int]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralTopKRouter",
        "softmax",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        [0, 1],
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeTopKRouter",
        "softmax",
        {
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
            "num_hidden_layers": 3,
            "mlp_only_layers": [0],
        },
        [1, 2],
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeTopKRouter",
        "softmax",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "head_dim": 8,
            "num_hidden_layers": 3,
            "mlp_only_layers": [1],
        },
        [0, 2],
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeTopKRouter",
        "softmax",
        {"num_experts": 8, "num_experts_per_tok": 2},
        [0, 1],
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssTopKRouter",
        "softmax",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        [0, 1],
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4Router",
        "sigmoid",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "intermediate_size_mlp": 32,
            "head_dim": 8,
            "num_hidden_layers": 4,
            "interleave_moe_layer_step": 2,
        },
        [1, 3],
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeTopKRouter",
        "softmax",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        [0, 1],
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeTopKRouter",
        "softmax",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        [0, 1],
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3TopkRouter",
        "sigmoid",
        {
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "moe_intermediate_size": 16,
            "n_shared_experts": 1,
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 8,
            "q_lora_rank": 8,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4,
            "v_head_dim": 8,
            "num_key_value_heads": 2,
        },
        [1, 2],
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeTopkRouter",
        "sigmoid",
        {
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "moe_intermediate_size": 16,
            "n_shared_experts": 1,
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "head_dim": 8,
        },
        [1, 2],
    ),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxTopKRouter",
        "softmax",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "layer_types": ["full_attention", "full_attention"],
        },
        [0, 1],
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1Gate",
        "softmax",
        {"num_experts": 4, "moe_topk": 2, "head_dim": 8},
        [0, 1],
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeTopKRouter",
        "softmax",
        {
            "moe_num_experts": 8,
            "moe_k": 2,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "moe_layer_start_index": 1,
            "moe_num_shared_experts": 0,
        },
        [1, 2],
    ),
}


def _model(family: str) -> Any:
    config_name, _, _, extra, _ = FAMILIES[family]
    try:
        module = importlib.import_module(f"transformers.models.{family}")
        config_class = getattr(module, config_name)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    torch.manual_seed(0)
    config = config_class(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    _perturb_biases(model)
    return model


def _perturb_biases(model: Any) -> None:
    """Non-zero selection biases (DeepSeek-V3/GLM4 correction bias, Ernie's moe_statics), so
    that the selection differs from the top-k of the probabilities."""
    generator = torch.Generator().manual_seed(1)
    for name, buffer in model.named_buffers():
        if "e_score_correction_bias" in name:
            buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.5)


class Captured:
    """An independent record of each router call: its raw output, by layer."""

    def __init__(self, model: Any, router_class: str) -> None:
        self.calls: dict[int, list[Any]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if type(module).__name__ == router_class:
                layer = int(name.split("layers.")[1].split(".")[0])
                self.handles.append(module.register_forward_hook(self._keep(layer)))

    def _keep(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.calls.setdefault(layer, []).append(tuple(t.detach().clone() for t in output))

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _expected(family: str, outputs: list[Any], k: int) -> dict[str, float]:
    """Metrics of one layer from the router's own outputs, computed independently."""
    if family == "llama4":  # (scores [T, E], logits [T, E]): scores are 0 where not selected
        scores = torch.cat([o[0] for o in outputs]).float().numpy()
        logits = torch.cat([o[1] for o in outputs]).double().numpy()
        ids = np.stack([np.flatnonzero(row)[:k] for row in scores > 0])
    else:
        logits = torch.cat([o[0] for o in outputs]).double().numpy()
        ids = torch.cat([o[2] for o in outputs]).numpy()
    if FAMILIES[family][2] == "sigmoid":
        probs = expit(logits)
        probs = probs / probs.sum(axis=1, keepdims=True)
    else:
        probs = softmax(logits, axis=1)
    n_experts = probs.shape[1]
    counts = np.bincount(ids.ravel(), minlength=n_experts)
    share = counts / counts.sum()
    top = np.argsort(-probs, axis=1)[:, : ids.shape[1]]
    mismatch = [set(a) != set(b) for a, b in zip(ids.tolist(), top.tolist(), strict=True)]
    return {
        "n_tokens": len(probs),
        "n_experts": n_experts,
        "top_k": ids.shape[1],
        "token_entropy": float(np.mean(entropy(probs, axis=1))),
        "load_entropy": float(entropy(probs.mean(axis=0))),
        "assign_entropy": float(entropy(share)),
        "max_load_share": float(share.max()),
        "top1_prob": float(probs.max(axis=1).mean()),
        "selection_mismatch": float(np.mean(mismatch)),
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recording_equals_the_router_outputs(family: str, tmp_path: Path) -> None:
    model = _model(family)
    _, router_class, score, extra, moe_layers = FAMILIES[family]
    batch = {
        "input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2)),
        "attention_mask": torch.ones(2, 12, dtype=torch.long),
    }
    batch["attention_mask"][1, 9:] = 0  # three padding tokens
    with torch.no_grad():
        plain = model(**batch).logits
    captured = Captured(model, router_class)
    routers = [m for m in model.modules() if type(m).__name__ == router_class]
    with Recorder(model, tmp_path / "run", every=1) as rec:
        assert rec.layers == moe_layers  # dense layers have no router to record
        assert rec.score == score
        rec.step(0)
        with torch.no_grad():
            recorded = model(**batch).logits
    captured.close()
    assert torch.equal(plain, recorded)  # the recorder changes nothing
    assert all(not m._forward_hooks for m in routers)
    assert not model._forward_pre_hooks

    result = routelog.analyze([tmp_path / "run"])
    summary = result.runs[0].summary()
    assert summary["masked_rows"] == 3 * len(moe_layers)
    metrics = result.metrics.sort("layer")
    assert metrics["layer"].to_list() == moe_layers
    keep = batch["attention_mask"].reshape(-1).bool()
    k = int(extra.get("num_experts_per_tok", extra.get("moe_topk", extra.get("moe_k", 1))))
    for row in metrics.iter_rows(named=True):
        outputs = [tuple(t[keep] for t in call) for call in captured.calls[row["layer"]]]
        for name, value in _expected(family, outputs, k).items():
            assert row[name] == pytest.approx(value, abs=2e-5), (family, row["layer"], name)
    if family in ("deepseek_v3", "glm4_moe"):
        # the correction bias and the group limit select experts outside the top-k
        assert metrics["selection_mismatch"].max() > 0
