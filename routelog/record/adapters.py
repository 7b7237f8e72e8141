"""Which modules of a model are routers, and how to read what they return: a table.

In transformers 5 every MoE block owns a router module whose forward returns
``(router_logits [T, E], weights [T, k], indices [T, k])``: the raw logits and the experts the
model actually selected (Llama 4: ``(scores [T, E], logits [T, E])``). A forward hook on that
module sees exactly what the model used. :data:`ADAPTERS` maps a router class name to an
:class:`Adapter`; a model with other routers (older transformers, custom code) names them with
``routers={"layers.*.moe.gate": "logits"}`` (a glob over module names) and one of
:data:`NAMED` or an ``Adapter`` of its own.

Tensors are torch tensors; this module never imports torch itself (the recorder does).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from routelog.errors import RecordError

Holds = Literal["logits", "probs"]
Score = Literal["softmax", "sigmoid"]
Reading = tuple[Any, Any]
"""What an adapter reads from one router call: ([T, E] values, [T, k] selected ids or None)."""


@dataclass(frozen=True)
class Adapter:
    """How to read one kind of router's output.

    ``read(module, output)`` returns ``(values, ids)``: ``values`` the [T, E] router output
    (``holds`` says whether logits or probabilities), ``ids`` the [T, k] experts the model
    selected, or None when the output does not say (the recorder then takes the top-k of the
    values, with k from the model config or ``top_k=``). ``score`` is how logits become
    probabilities: softmax, or sigmoid (normalised to sum 1 for the metrics).
    """

    read: Callable[[Any, Any], Reading]
    holds: Holds = "logits"
    score: Score = "softmax"


def logits_weights_ids(module: Any, output: Any) -> Reading:
    """transformers 5 top-k routers: ``(router_logits, weights, indices)``."""
    if not isinstance(output, tuple) or len(output) != 3:
        raise RecordError(
            f"{type(module).__name__} returned {_kind(output)}, expected "
            "(router_logits, weights, indices)"
        )
    return output[0], output[2]


def llama4_scores_logits(module: Any, output: Any) -> Reading:
    """Llama 4: ``(scores, router_logits)``; the router selects ``topk(router_logits, top_k)``.

    The same ``torch.topk`` call on the same tensor gives the same experts (ties included).
    """
    if not isinstance(output, tuple) or len(output) != 2:
        raise RecordError(
            f"{type(module).__name__} returned {_kind(output)}, expected (scores, router_logits)"
        )
    logits = output[1]
    return logits, logits.topk(int(module.top_k), dim=-1).indices


def first_tensor(module: Any, output: Any) -> Reading:
    """A module returning a [T, E] (or [B, S, E]) tensor, or a tuple whose first item is one."""
    value = output[0] if isinstance(output, tuple | list) else output
    return value, None


TOPK_ROUTER = Adapter(logits_weights_ids, "logits", "softmax")
SIGMOID_TOPK_ROUTER = Adapter(logits_weights_ids, "logits", "sigmoid")

ADAPTERS: dict[str, Adapter] = {
    "MixtralTopKRouter": TOPK_ROUTER,
    "Qwen2MoeTopKRouter": TOPK_ROUTER,
    "Qwen3MoeTopKRouter": TOPK_ROUTER,
    "OlmoeTopKRouter": TOPK_ROUTER,
    "GptOssTopKRouter": TOPK_ROUTER,
    "GraniteMoeTopKRouter": TOPK_ROUTER,
    "PhimoeTopKRouter": TOPK_ROUTER,
    "MiniMaxTopKRouter": TOPK_ROUTER,
    "HunYuanMoEV1Gate": TOPK_ROUTER,
    "Ernie4_5_MoeTopKRouter": TOPK_ROUTER,
    "DeepseekV3TopkRouter": SIGMOID_TOPK_ROUTER,
    "Glm4MoeTopkRouter": SIGMOID_TOPK_ROUTER,
    "Llama4Router": Adapter(llama4_scores_logits, "logits", "sigmoid"),
}
"""transformers 5 router classes, read from their source (``modeling_<family>.py``):

- softmax over the logits, selection = top-k (Mixtral, Qwen2/3-MoE, OLMoE, MiniMax, HunYuan;
  gpt-oss and GraniteMoE take the top-k of the logits, the same experts);
- PhiMoE (sparsemixer: sampled and masked in training) and Ernie 4.5 (top-k of the
  probabilities plus ``moe_statics``' bias) select experts that need not be the top-k;
- DeepSeek-V3 and GLM4-MoE: sigmoid scores, selection from the scores plus
  ``e_score_correction_bias``, limited to the ``topk_group`` best of ``n_group`` groups;
- Llama 4: sigmoid scores of the top-k of the logits."""

NAMED: dict[str, Adapter] = {
    "logits": Adapter(first_tensor, "logits", "softmax"),
    "sigmoid_logits": Adapter(first_tensor, "logits", "sigmoid"),
    "probs": Adapter(first_tensor, "probs", "softmax"),
    "logits_weights_ids": TOPK_ROUTER,
    "sigmoid_logits_weights_ids": SIGMOID_TOPK_ROUTER,
}
"""What ``routers={pattern: name}`` may say a module returns (or pass an ``Adapter``)."""

RouterSpec = str | Adapter

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Router:
    """One router module found in a model."""

    name: str
    layer: int
    module: Any
    adapter: Adapter

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def find_routers(model: Any, routers: Mapping[str, RouterSpec] | None = None) -> list[Router]:
    """Every router of ``model``, in layer order; an error naming what was searched if none.

    Without ``routers``, a module is a router when its class is in :data:`ADAPTERS`. With it,
    a module is a router when its name (``model.layers.3.mlp.gate``) matches a glob, in full
    or after a leading prefix (``layers.*.mlp.gate`` matches the name above).
    """
    specs = {pattern: _adapter(pattern, spec) for pattern, spec in (routers or {}).items()}
    found: list[Router] = []
    for name, module in model.named_modules():
        adapter = _match(name, specs) if specs else ADAPTERS.get(type(module).__name__)
        if adapter is not None:
            found.append(Router(name, _layer_of(name), module, adapter))
    if not found:
        raise RecordError(_nothing_found(model, specs))
    by_layer: dict[int, str] = {}
    for router in found:
        if router.layer in by_layer:
            raise RecordError(
                f"modules {by_layer[router.layer]!r} and {router.name!r} are both routers of "
                f"layer {router.layer}: name one per layer with routers={{...}}"
            )
        by_layer[router.layer] = router.name
    return sorted(found, key=lambda r: r.layer)


def _adapter(pattern: str, spec: RouterSpec) -> Adapter:
    if isinstance(spec, Adapter):
        return spec
    if spec in NAMED:
        return NAMED[spec]
    raise RecordError(
        f"routers[{pattern!r}] = {spec!r}: expected one of {', '.join(NAMED)} or an Adapter"
    )


def _match(name: str, specs: Mapping[str, Adapter]) -> Adapter | None:
    for pattern, adapter in specs.items():
        if fnmatchcase(name, pattern) or fnmatchcase(name, f"*.{pattern}"):
            return adapter
    return None


def _layer_of(name: str) -> int:
    """The decoder layer of a module: N in ``layers.N``, else the last number in its name."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1))
    numbers = _NUMBER.findall(name)
    if not numbers:
        raise RecordError(f"cannot tell the layer of router {name!r} (no number in its name)")
    return int(numbers[-1])


def _nothing_found(model: Any, specs: Mapping[str, Adapter]) -> str:
    model_name = type(model).__name__
    if specs:
        names = [n for n, _ in model.named_modules() if re.search(r"gate|router", n.lower())]
        hint = f" (modules named like a router: {', '.join(names[:4])})" if names else ""
        return f"no module of {model_name} matches routers= {', '.join(specs)}{hint}"
    return (
        f"no router found in {model_name}: searched for modules of class "
        f"{', '.join(sorted(ADAPTERS))}; name yours with "
        "Recorder(model, path, routers={'layers.*.mlp.gate': 'logits'})"
    )


def _kind(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__
