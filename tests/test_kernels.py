from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from routelog import kernels


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), e=st.integers(2, 64), zeros=st.integers(0, 3))
def test_js_divergence_matches_scipy(seed: int, e: int, zeros: int) -> None:
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(e)), rng.dirichlet(np.ones(e))
    p[rng.integers(0, e, size=min(zeros, e - 1))] = 0.0  # empty experts: 0 log 0 = 0
    p /= p.sum()
    # scipy returns the distance, the square root of the divergence
    expected = jensenshannon(p, q, base=2) ** 2
    assert float(kernels.js_divergence(p, q)) == pytest.approx(expected, abs=1e-12)


def test_js_divergence_rows_and_bounds() -> None:
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    q = np.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.5, 0.5]])
    result = kernels.js_divergence(p, q)
    expected = [jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, q, strict=True)]
    assert result.tolist() == pytest.approx(expected, abs=1e-12)
    assert result[0] == 1.0
    assert result[1] == 0.0
