from __future__ import annotations

import pytest

from routelog.errors import UsageError
from routelog.options import LayerSet, Options, StepRange, parse_layers, parse_steps


def test_parse_layers() -> None:
    assert parse_layers("0,3-5") == LayerSet(((0, 0), (3, 5)))
    assert parse_layers(" 2 ") == LayerSet(((2, 2),))
    assert parse_layers(None) is None
    assert parse_layers("") is None


@pytest.mark.parametrize("text", ["a", "3-1", "1,,2", "-1"])
def test_parse_layers_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--layers"):
        parse_layers(text)


def test_parse_steps() -> None:
    assert parse_steps("100:500") == StepRange(100, 500)
    assert parse_steps("100:") == StepRange(100, None)
    assert parse_steps(":500") == StepRange(None, 500)
    assert parse_steps("200") == StepRange(200, 200)
    assert 300 in StepRange(100, 500)
    assert 600 not in StepRange(100, 500)


@pytest.mark.parametrize("text", ["x", "500:100", "1:2:3"])
def test_parse_steps_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--steps"):
        parse_steps(text)


def test_options_validate() -> None:
    with pytest.raises(UsageError, match="--top-k"):
        Options(top_k=0)
    with pytest.raises(UsageError, match="--temperature"):
        Options(temperature=0.0)
    assert Options().k_for(None) == 1
    assert Options().k_for(2) == 2
    assert Options(top_k=3).k_for(2) == 3
