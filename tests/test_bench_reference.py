"""The benchmark's hand-written competitor (``bench/reference.py``) computes routelog's metrics.

(b) compares ``routelog analyze`` with it, so it must do the same work: this checks its
figures against ``routelog.analyze`` on logs written by the benchmark's own generator.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import routelog

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(6000, 64, 2), (3000, 256, 8)])
def test_reference_script_matches_routelog(
    tmp_path: Path, tokens: int, experts: int, top_k: int
) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import reference
        import synth
    finally:
        sys.path.remove(str(BENCH))
    log = synth.write_log(tmp_path / "step_000000.parquet", tokens=tokens, experts=experts)
    ours = routelog.analyze([log], top_k=top_k).metrics.sort("layer").to_dicts()
    theirs = sorted(reference.metrics(log, top_k), key=lambda row: row["layer"])
    assert len(ours) == len(theirs) == 8
    for mine, other in zip(ours, theirs, strict=True):
        for name, value in other.items():
            assert mine[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
