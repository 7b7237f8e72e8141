"""A model's own ``config.json``: where trainers keep k, E and which layers are MoE.

HuggingFace writes ``config.json`` beside every checkpoint; many training scripts copy it
into their output directory. The keys differ by family, so each fact is looked up under every
name a family uses for it (the first one present wins), in the top level and in a nested
``text_config`` (multimodal models such as Llama 4 keep the language model's config there).

The upward search for a ``config.json`` starts at a run (its directory, or a file's
directory) and stops at a repository root (a directory holding ``.git``) or the home
directory, so that a file far above a project never describes its runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routelog.errors import InputError
from routelog.options import MAX_EXPERTS

CONFIG_NAME = "config.json"

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
"""E: Mixtral, gpt-oss, PhiMoE, MiniMax (``num_local_experts``); Qwen-MoE, OLMoE, GraniteMoE
(``num_experts``); DeepSeek-V2/V3, GLM4-MoE (``n_routed_experts``); Ernie 4.5
(``moe_num_experts``)."""

TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "top_k")
"""k: most families (``num_experts_per_tok``); Ernie 4.5 (``moe_k``); HunYuan (``moe_topk``)."""

LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer")

MAX_CONFIG_BYTES = 16 << 20
"""A config.json larger than this is not a model configuration."""


@dataclass(frozen=True)
class ModelConfig:
    """What a model's ``config.json`` says about its routing (None: it does not say)."""

    path: Path
    num_experts: int | None = None
    top_k: int | None = None
    num_layers: int | None = None
    moe_layers: frozenset[int] | None = None
    """Decoder layers that have an MoE block, when the config says which (else None: all)."""
    url: str | None = None
    """The config's URL when it was read from a bucket (``path`` is then a local copy)."""

    @property
    def where(self) -> str:
        """Where the config is, for messages: its URL, else its path."""
        return self.url or str(self.path)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` routes tokens (True when the config does not say)."""
        return self.moe_layers is None or layer in self.moe_layers


CONFIG_LEVELS_UP = 3
"""How many parents of a run directory are searched for its model's ``config.json``
(``ckpt/config.json`` for logs in ``ckpt/routing/rank0/``)."""


def find_model_config(start: Path) -> ModelConfig | None:
    """The ``config.json`` describing the run at ``start``, read; None when there is none.

    Looks in ``start`` (or, for a file, its directory) and at most ``CONFIG_LEVELS_UP`` of
    its parents, stopping after a directory that holds ``.git``, before leaving the home
    directory, and never at the file system's root: a stray ``/tmp/config.json`` must not
    describe every run below it.
    """
    here = start if start.is_dir() else start.parent
    here = here.resolve()
    home = Path.home().resolve()
    for directory in (here, *here.parents)[: CONFIG_LEVELS_UP + 1]:
        if directory == directory.parent:
            return None
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return read_model_config(candidate)
        if (directory / ".git").exists() or directory == home:
            return None
    return None


def read_model_config(path: Path) -> ModelConfig:
    """Read one ``config.json``; a file that is not a JSON object is an ``InputError``."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: too large for a model configuration")
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: a model configuration must be a JSON object")
    return model_config_from(document, path)


def model_config_from(document: dict[str, Any], path: Path) -> ModelConfig:
    """Interpret a parsed ``config.json`` (``path`` names it in errors)."""
    nested = document.get("text_config")
    sources = [document, nested] if isinstance(nested, dict) else [document]
    experts = _first_int(sources, EXPERT_KEYS, path)
    if experts is not None and experts > MAX_EXPERTS:
        raise InputError(
            f"{path}: {experts} experts, beyond the {MAX_EXPERTS} experts routelog handles"
        )
    num_layers = _first_int(sources, LAYER_KEYS, path)
    return ModelConfig(
        path=path,
        num_experts=experts,
        top_k=_first_int(sources, TOP_K_KEYS, path),
        num_layers=num_layers,
        moe_layers=_moe_layers(sources, num_layers, path),
    )


def _first_int(sources: list[dict[str, Any]], keys: tuple[str, ...], path: Path) -> int | None:
    for source in sources:
        for key in keys:
            if key in source and source[key] is not None:
                return _positive(source[key], key, path)
    return None


def _positive(value: Any, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        raise InputError(f"{path}: {key} must be a positive integer, not {value!r}")
    return value


def _get(sources: list[dict[str, Any]], key: str) -> Any:
    for source in sources:
        if key in source and source[key] is not None:
            return source[key]
    return None


def _int_or(value: Any, default: int, key: str, path: Path) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise InputError(f"{path}: {key} must be a non-negative integer, not {value!r}")
    return value


def _moe_layers(
    sources: list[dict[str, Any]], num_layers: int | None, path: Path
) -> frozenset[int] | None:
    """Which decoder layers are MoE, by each family's rule; None when the config says nothing.

    - Llama 4: ``moe_layers`` lists them.
    - Qwen2/Qwen3-MoE: layer i is MoE unless listed in ``mlp_only_layers``, and only when
      ``(i + 1) % decoder_sparse_step == 0``.
    - DeepSeek-V2/V3, GLM4-MoE: layers from ``first_k_dense_replace`` on, every
      ``moe_layer_freq``-th.
    - Ernie 4.5: layer i in ``moe_layer_start_index`` .. ``moe_layer_end_index`` with
      ``(i + 1) % moe_layer_interval == 0``.
    """
    listed = _get(sources, "moe_layers")
    if listed is not None:
        return frozenset(_int_list(listed, "moe_layers", path))
    if num_layers is None:
        return None
    layers = range(num_layers)
    only_mlp = _get(sources, "mlp_only_layers")
    step = _get(sources, "decoder_sparse_step")
    if only_mlp is not None or step is not None:
        dense = set(_int_list(only_mlp or [], "mlp_only_layers", path))
        every = max(1, _int_or(step, 1, "decoder_sparse_step", path))
        return frozenset(i for i in layers if i not in dense and (i + 1) % every == 0)
    first_dense = _get(sources, "first_k_dense_replace")
    if first_dense is not None:
        first = _int_or(first_dense, 0, "first_k_dense_replace", path)
        freq = max(1, _int_or(_get(sources, "moe_layer_freq"), 1, "moe_layer_freq", path))
        return frozenset(i for i in layers if i >= first and i % freq == 0)
    start = _get(sources, "moe_layer_start_index")
    if start is not None:
        lo = _int_or(start, 0, "moe_layer_start_index", path)
        end = _get(sources, "moe_layer_end_index")
        hi = num_layers - 1
        if end is not None and end != -1:
            hi = _int_or(end, 0, "moe_layer_end_index", path)
        interval = _get(sources, "moe_layer_interval")
        every = max(1, _int_or(interval, 1, "moe_layer_interval", path))
        return frozenset(i for i in layers if lo <= i <= hi and (i + 1) % every == 0)
    return None


def _int_list(value: Any, key: str, path: Path) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in value
    ):
        raise InputError(f"{path}: {key} must be a list of layer numbers, not {value!r}")
    return list(value)
