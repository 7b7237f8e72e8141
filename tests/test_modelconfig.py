"""A model's config.json: E, k and MoE layers per family; the upward search and its stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routelog.errors import InputError
from routelog.modelconfig import find_model_config, read_model_config


def _write(directory: Path, document: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("document", "experts", "k"),
    [
        ({"num_local_experts": 8, "num_experts_per_tok": 2}, 8, 2),  # Mixtral
        ({"num_experts": 64, "num_experts_per_tok": 8}, 64, 8),  # OLMoE, Qwen-MoE
        ({"n_routed_experts": 256, "num_experts_per_tok": 8}, 256, 8),  # DeepSeek-V3
        ({"moe_num_experts": 64, "moe_k": 6}, 64, 6),  # Ernie 4.5
        ({"text_config": {"num_local_experts": 16, "num_experts_per_tok": 1}}, 16, 1),  # Llama 4
        ({"hidden_size": 64}, None, None),
    ],
)
def test_experts_and_k_by_family(
    tmp_path: Path, document: dict[str, object], experts: int | None, k: int | None
) -> None:
    config = read_model_config(_write(tmp_path, document))
    assert (config.num_experts, config.top_k) == (experts, k)


@pytest.mark.parametrize(
    ("document", "moe"),
    [
        ({"num_hidden_layers": 4}, None),
        (
            {"num_hidden_layers": 6, "mlp_only_layers": [0, 3], "decoder_sparse_step": 1},
            {1, 2, 4, 5},
        ),
        ({"num_hidden_layers": 6, "decoder_sparse_step": 2}, {1, 3, 5}),
        ({"num_hidden_layers": 6, "first_k_dense_replace": 3}, {3, 4, 5}),
        ({"num_hidden_layers": 8, "first_k_dense_replace": 1, "moe_layer_freq": 2}, {2, 4, 6}),
        (
            {"num_hidden_layers": 6, "moe_layer_start_index": 1, "moe_layer_interval": 1},
            {1, 2, 3, 4, 5},
        ),
        (
            {
                "num_hidden_layers": 8,
                "moe_layer_start_index": 2,
                "moe_layer_end_index": 6,
                "moe_layer_interval": 2,
            },
            {3, 5},
        ),
        ({"text_config": {"num_hidden_layers": 4, "moe_layers": [1, 3]}}, {1, 3}),
    ],
)
def test_moe_layers_by_family(
    tmp_path: Path, document: dict[str, object], moe: set[int] | None
) -> None:
    config = read_model_config(_write(tmp_path, document))
    assert config.moe_layers == (None if moe is None else frozenset(moe))
    if moe is not None:
        assert all(config.is_moe_layer(i) == (i in moe) for i in range(8))


def test_found_in_a_parent_but_not_beyond_the_repository_root(tmp_path: Path) -> None:
    _write(tmp_path, {"num_local_experts": 99})
    project = tmp_path / "project"
    run = project / "runs" / "exp1"
    run.mkdir(parents=True)
    assert find_model_config(run).num_experts == 99  # type: ignore[union-attr]
    (project / ".git").mkdir()
    assert find_model_config(run) is None
    _write(project / "runs", {"num_local_experts": 8})
    found = find_model_config(run / "step_000001.parquet")
    assert found is not None
    assert (found.num_experts, found.path) == (8, project / "runs" / "config.json")


def test_searched_at_most_three_parents_up(tmp_path: Path) -> None:
    """A config.json far above the run (a stray /tmp/config.json) describes nothing."""
    _write(tmp_path, {"num_local_experts": 99})
    near = tmp_path / "a" / "b" / "c"
    near.mkdir(parents=True)
    assert find_model_config(near).num_experts == 99  # type: ignore[union-attr]
    far = near / "d"
    far.mkdir()
    assert find_model_config(far) is None
    assert find_model_config(far / "step_000001.parquet") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"num_local_experts": -3}', "num_local_experts must be a positive integer"),
        ('{"num_experts_per_tok": true}', "num_experts_per_tok must be a positive integer"),
        ('{"n_routed_experts": 65537}', "65537 experts, beyond the 65536 experts routelog"),
        ('{"num_hidden_layers": 4, "mlp_only_layers": "0"}', "mlp_only_layers must be a list"),
        (b"\xff\xfe".decode("latin-1"), "not valid JSON"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=message) as caught:
        read_model_config(path)
    assert str(path) in str(caught.value)
