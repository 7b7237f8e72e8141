"""routelog/_native.c: the compiled per-token kernels, against numpy and scipy.

The installed module runs the copy compiled for this CPU's instruction-set level; the copies
for the other levels (SSE2, AVX2, AVX-512 on x86-64) are built here, each alone, and held to
the same references, so that a machine of another level runs tested code too.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp as scipy_logsumexp
from scipy.special import softmax as scipy_softmax
from scipy.stats import entropy as scipy_entropy

from routelog import _native
from tests.conftest import REPO

SOURCE = REPO / "routelog" / "_native.c"

# the CPU flags each x86-64 level needs (the psABI's micro-architecture levels)
LEVELS = {
    "x86-64": set(),
    "x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _build(level: str, directory: Path) -> ModuleType:
    """The kernels compiled for one level alone, loaded under the module's own name."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.fail(f"no C compiler ({compiler}): the package itself could not have been built")
    target = directory / f"_native{sysconfig.get_config_var('EXT_SUFFIX')}"
    command = [compiler, "-O3", "-fopenmp-simd", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
    command += ["-shared", "-fPIC"]
    command += [f"-march={level}"]
    command += ["-DROUTELOG_NO_DISPATCH", f"-I{sysconfig.get_paths()['include']}"]
    subprocess.run([*command, str(SOURCE), "-o", str(target)], check=True)
    loader = importlib.machinery.ExtensionFileLoader("routelog._native", str(target))
    spec = importlib.util.spec_from_file_location("routelog._native", target, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@functools.cache
def _level_module(level: str, directory: str) -> ModuleType:
    return _build(level, Path(directory))


@pytest.fixture(scope="module", params=["installed", *LEVELS])
def native(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    if request.param == "installed":
        return _native
    if platform.machine() != "x86_64" or platform.system() != "Linux":
        pytest.skip("the levels are x86-64's; elsewhere the installed build is the only one")
    missing = LEVELS[request.param] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run {request.param} code (no {', '.join(sorted(missing))})")
    return _level_module(request.param, str(tmp_path_factory.mktemp(request.param)))


def _stats(
    module: ModuleType, probs: np.ndarray, k: int, gid: np.ndarray | None = None, n_groups: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    n, e = probs.shape
    entropies, top1 = np.zeros(n), np.empty(n, np.float32)
    ids = np.empty((n, k), np.int32)
    sums = None if gid is None else np.zeros((n_groups, e))
    module.token_stats(probs, e, k, True, entropies, top1, ids, gid, sums, None, None)
    return entropies, top1, ids, sums


def _sequential_sums(probs: np.ndarray, gid: np.ndarray, n_groups: int) -> np.ndarray:
    """Each group's column sums in float64, rows added one after another in order."""
    out = np.zeros((n_groups, probs.shape[1]))
    for row, group in zip(probs.astype(np.float64), gid, strict=True):
        out[group] += row
    return out


def _probs(rng: np.random.Generator, n: int, e: int) -> np.ndarray:
    probs = rng.dirichlet(np.full(e, 0.3), size=n).astype(np.float32)
    probs[rng.random((n, e)) < 0.2] = 0.0  # exact zeros: 0 ln 0 = 0
    probs[1::5] = np.round(probs[1::5], 1)  # ties
    probs[0, 0] = np.finfo(np.float32).tiny / 8  # a subnormal
    empty = probs.sum(axis=1) == 0
    probs[empty, rng.integers(0, e, int(empty.sum()))] = 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    probs[2] = 0.0
    probs[2, e // 2] = 1.0  # one-hot: entropy exactly 0
    return np.ascontiguousarray(probs, dtype=np.float32)


@pytest.mark.parametrize(("e", "k"), [(1, 1), (3, 2), (8, 2), (8, 8), (17, 3), (64, 2), (256, 8)])
def test_token_stats_match_scipy_and_a_stable_sort(native: ModuleType, e: int, k: int) -> None:
    rng = np.random.default_rng(e * 31 + k)
    probs = _probs(rng, 700, e)
    gid = np.sort(rng.integers(0, 4, len(probs))).astype(np.int64)
    gid[::3] = rng.integers(0, 4, len(gid[::3]))  # groups that come back
    entropies, top1, ids, sums = _stats(native, probs, k, gid, 4)
    expected = scipy_entropy(probs.astype(np.float64), axis=1) if e > 1 else np.zeros(len(probs))
    np.testing.assert_allclose(entropies, expected, rtol=1e-6, atol=1e-7)
    assert entropies[2] == 0.0
    np.testing.assert_array_equal(top1, probs.max(axis=1))
    np.testing.assert_array_equal(ids, np.argsort(-probs, axis=1, kind="stable")[:, :k])
    np.testing.assert_array_equal(sums, _sequential_sums(probs, gid, 4))


def test_levels_agree_with_the_installed_build_bit_for_bit(native: ModuleType) -> None:
    """Every level (AVX-512, AVX2, SSE2) gives the installed build's bits: entropies, top-k,
    sums, row sums, probabilities and logsumexps, at widths below, at and above the 16 lanes
    sums are taken in. Dask workers on different CPUs must send the same statistics."""
    rng = np.random.default_rng(3)
    for e in (1, 3, 8, 16, 17, 64, 255):
        probs = _probs(rng, 2000, e) if e > 1 else np.ones((2000, 1), np.float32)
        gid = np.repeat(np.arange(4), 500).astype(np.int64)
        ours, reference = _stats(native, probs, 1, gid, 4), _stats(_native, probs, 1, gid, 4)
        for mine, theirs in zip(ours, reference, strict=True):
            np.testing.assert_array_equal(mine, theirs)
        sums = [np.empty(len(probs), np.float32) for _ in range(2)]
        lowest = [m.row_sums(probs, e, out) for m, out in zip((native, _native), sums, strict=True)]
        assert lowest[0] == lowest[1]
        np.testing.assert_array_equal(sums[0], sums[1])
        for dtype in (np.float32, np.float64):
            logits = (rng.standard_normal((500, e)) * 4).astype(dtype)
            logits[::7, 0] = -np.inf
            outputs = []
            for module in (native, _native):
                out = (np.zeros((500, e), np.float32), np.zeros(500), np.zeros(500, np.uint8))
                module.softmax(logits, e, 0.7, 1e150, *out)
                outputs.append(out)
            for mine, theirs in zip(*outputs, strict=True):
                np.testing.assert_array_equal(mine, theirs)


# values drawn by index: zeros, the smallest subnormal, a tiny normal, ties, unnormalised rows
VALUES = np.array([0.0, 1e-45, 1e-30, 0.125, 0.25, 0.5, 1.0, 3.0], dtype=np.float32)


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.integers(0, len(VALUES) - 1),
    ),
    st.integers(1, 40),
)
def test_top_k_and_entropy_of_any_non_negative_rows(indices: np.ndarray, k: int) -> None:
    """Ties, zeros, subnormals and unnormalised rows: the top-k is the stable sort's, the
    maximum is numpy's, and the entropy sum is -sum p ln p term by term."""
    values = VALUES[indices]
    k = min(k, values.shape[1])
    entropies, top1, ids, _ = _stats(_native, values, k)
    np.testing.assert_array_equal(ids, np.argsort(-values, axis=1, kind="stable")[:, :k])
    np.testing.assert_array_equal(top1, values.max(axis=1))
    wide = values.astype(np.float64)
    terms = wide * np.log(np.maximum(wide, np.finfo(np.float32).tiny))
    np.testing.assert_allclose(entropies, -terms.sum(axis=1), rtol=2e-6, atol=1e-6)


def test_row_sums_and_minimum(native: ModuleType) -> None:
    values = _probs(np.random.default_rng(4), 300, 33)
    values[5, 3] = -0.25
    values[6, 0] = np.nan
    values[7, 1] = np.inf
    sums = np.empty(len(values), np.float32)
    lowest = native.row_sums(values, 33, sums)
    assert lowest == -0.25  # NaN is not a minimum, but its row's sum is NaN
    assert np.isnan(sums[6])
    assert sums[7] == np.inf
    fine = np.isfinite(values).all(axis=1)
    np.testing.assert_allclose(sums[fine], values[fine].sum(axis=1), rtol=1e-5)
    assert native.row_sums(np.zeros((0, 4), np.float32), 4, np.empty(0, np.float32)) == np.inf


def _arguments(n: int = 4, e: int = 3, k: int = 2) -> list[object]:
    return [
        np.full((n, e), 1 / e, np.float32),
        e,
        k,
        True,
        np.zeros(n),
        np.empty(n, np.float32),
        np.empty((n, k), np.int32),
        None,
        None,
        None,
        None,
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({1: 0}, "number of experts"),
        ({1: 5}, "whole number of float32 rows"),
        ({2: 0}, "k must be"),
        ({2: 4}, "k must be"),
        ({4: np.zeros(3)}, "entropies holds"),
        ({5: np.empty(5, np.float32)}, "top1 holds"),
        ({6: np.empty((4, 1), np.int32)}, "ids holds"),
        ({7: np.zeros(4, np.int64)}, "go together"),
        ({7: np.zeros(3, np.int64), 8: np.zeros((1, 3))}, "groups holds"),
        ({7: np.array([0, 1, 2, 1]), 8: np.zeros((2, 3))}, "group 2 of row 2 is outside 0..1"),
        ({7: np.array([0, -1, 0, 0]), 8: np.zeros((1, 3))}, "outside"),
        ({7: np.zeros(4, np.int64), 8: np.zeros(7)}, "sums holds"),
        ({9: np.zeros((4, 1), np.int32)}, "selected and differs go together"),
        ({9: np.zeros(7, np.int32), 10: np.zeros(4, np.uint8)}, "selected holds"),
        ({9: np.zeros((4, 1), np.int32), 10: np.zeros(3, np.uint8)}, "differs holds"),
        (
            {9: np.array([[0], [1], [3], [2]], np.int32), 10: np.zeros(4, np.uint8)},
            "expert 3 is outside 0..2",
        ),
        ({9: np.array([[0], [-1], [0], [2]], np.int32), 10: np.zeros(4, np.uint8)}, "expert -1"),
    ],
)
def test_wrong_buffers_are_refused_before_any_access(
    change: dict[int, object], message: str
) -> None:
    """The kernels trust no length: a buffer of the wrong size is a ValueError, not a read or
    write outside it."""
    arguments = _arguments()
    for position, value in change.items():
        arguments[position] = value
    with pytest.raises(ValueError, match=message):
        _native.token_stats(*arguments)


def test_buffers_must_be_contiguous_and_outputs_writable() -> None:
    arguments = _arguments()
    arguments[0] = np.full((4, 6), 0.5, np.float32)[:, ::2]
    with pytest.raises(ValueError, match="not C-contiguous"):
        _native.token_stats(*arguments)
    arguments = _arguments()
    readonly = np.zeros(4)
    readonly.flags.writeable = False
    arguments[4] = readonly
    with pytest.raises(TypeError, match="read-write"):
        _native.token_stats(*arguments)
    with pytest.raises(ValueError, match="whole number"):
        _native.row_sums(np.zeros(5, np.float32), 2, np.empty(2, np.float32))


def test_an_unbuilt_tree_says_how_to_build_it() -> None:
    """A checkout used without installing it has no compiled module: one clear error."""
    code = (
        "import sys; sys.modules['routelog._native'] = None\n"
        "try:\n    import routelog.native\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert "compiled kernels (routelog/_native.c) are not built" in done.stdout
    assert "pip install -e ." in done.stdout


@pytest.mark.skipif(
    platform.machine() != "x86_64" or platform.libc_ver()[0] != "glibc",
    reason="the per-level copies are built for x86-64 with glibc",
)
def test_the_installed_build_carries_a_copy_per_level() -> None:
    """gcc builds the AVX-512, AVX2 and SSE2 copies and picks one at load time; a change to
    the build that lost them would still pass every other test, only slower."""
    compiler = sysconfig.get_config_var("CC") or ""
    if "gcc" not in compiler:
        pytest.skip(f"built by {compiler or 'an unknown compiler'}: one copy, its default target")
    binary = Path(_native.__file__).read_bytes()
    for level in ("arch_x86_64_v4", "arch_x86_64_v3", "default"):
        assert f"token_stats_rows.{level}".encode() in binary


def _softmax(
    module: ModuleType, logits: np.ndarray, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, e = logits.shape
    probs, lse, problems = np.empty((n, e), np.float32), np.empty(n), np.empty(n, np.uint8)
    module.softmax(logits, e, temperature, 1e150, probs, lse, problems)
    return probs, lse, problems


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("e", "spread"), [(1, 1.0), (8, 1.0), (64, 5.0), (256, 30.0)])
def test_softmax_matches_scipy(
    native: ModuleType, e: int, spread: float, temperature: float, dtype: type
) -> None:
    """Probabilities within 1e-7 absolute and 5e-6 relative of scipy's float64 softmax (the
    exponentials are float32), logsumexp within 2e-7; masked experts get exactly 0. float32
    logits are read as they are."""
    rng = np.random.default_rng(e)
    logits = rng.standard_normal((600, e)) * spread + rng.normal(0, 50, (600, 1))
    if e > 1:
        logits[::5, 0] = -np.inf  # a masked expert
        if dtype == np.float64:
            logits[1::5, -1] = -np.finfo(np.float64).max  # JSON's -Infinity
    logits = logits.astype(dtype)
    probs, lse, problems = _softmax(native, logits, temperature)
    wide = logits.astype(np.float64)
    masked = np.where(wide <= -np.finfo(np.float64).max, -np.inf, wide) / temperature
    expected = scipy_softmax(masked, axis=1)
    assert not problems.any()
    np.testing.assert_allclose(probs, expected, rtol=5e-6, atol=1e-7)
    np.testing.assert_allclose(lse, scipy_logsumexp(masked, axis=1), rtol=1e-12, atol=2e-7)
    assert (probs[np.isneginf(masked)] == 0.0).all()
    np.testing.assert_allclose(probs.sum(axis=1, dtype=np.float64), 1.0, atol=1e-6)


def test_logsumexp_log_is_within_two_ulp_of_the_c_librarys(native: ModuleType) -> None:
    """The logsumexp's last log is routelog's own (the C library's may differ between CPUs):
    with logits of 0 every exponential is exactly 1, so the row's logsumexp is the log of its
    number of unmasked experts, for every count from 1 to 1024 (ln 1 exactly 0)."""
    counts = np.arange(1, 1025)
    logits = np.where(np.arange(1024) < counts[:, None], 0.0, -np.inf)
    _, lse, problems = _softmax(native, np.ascontiguousarray(logits))
    assert not problems.any()
    expected = np.log(counts)
    assert lse[0] == 0.0
    assert (np.abs(lse - expected) <= 2 * np.spacing(expected)).all()


def test_softmax_names_each_bad_row(native: ModuleType) -> None:
    top = np.finfo(np.float64).max
    rows = [
        ([0.5, 1.0, -np.inf], 0),  # fine
        ([np.nan, 1.0, 2.0], 1),
        ([np.inf, 1.0, 2.0], 1),
        ([np.nan, 2e150, 0.0], 1),  # NaN wins over a logit too large
        ([-np.inf, -np.inf, -np.inf], 2),
        ([-top, -np.inf, -top], 2),  # JSON's -Infinity everywhere
        ([2e150, 0.0, 0.0], 3),
        ([-2e150, 0.0, 0.0], 3),
    ]
    logits = np.array([row for row, _ in rows])
    expected = [code for _, code in rows]
    probs, lse, problems = _softmax(native, logits)
    assert problems.tolist() == expected
    assert (probs[1:] == 0).all()
    assert (lse[1:] == 0).all()
    np.testing.assert_allclose(probs[0], scipy_softmax([0.5, 1.0, -np.inf]), rtol=1e-6)


def test_softmax_refuses_what_it_cannot_use() -> None:
    logits = np.zeros((3, 4))
    outputs = np.empty((3, 4), np.float32), np.empty(3), np.empty(3, np.uint8)
    with pytest.raises(ValueError, match="positive"):
        _native.softmax(logits, 4, 0.0, 1e150, *outputs)
    with pytest.raises(ValueError, match="whole number of rows"):
        _native.softmax(logits, 5, 1.0, 1e150, *outputs)
    with pytest.raises(ValueError, match="float32 or float64"):
        _native.softmax(logits.astype(np.int64), 4, 1.0, 1e150, *outputs)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _native.softmax(np.zeros((3, 8))[:, ::2], 4, 1.0, 1e150, *outputs)
    with pytest.raises(ValueError, match="lse holds"):
        _native.softmax(logits, 4, 1.0, 1e150, outputs[0], np.empty(2), outputs[2])
    with pytest.raises(ValueError, match="probs holds"):
        _native.softmax(logits, 4, 1.0, 1e150, np.empty(11, np.float32), *outputs[1:])


def test_selection_differs_from_the_top_as_numpy_says(native: ModuleType) -> None:
    """A selection differs when an expert left out has more probability than the lowest one
    selected, ties not counted; a selection of every expert never differs."""
    rng = np.random.default_rng(8)
    probs = _probs(rng, 800, 16)
    selected = np.argsort(-probs, axis=1, kind="stable")[:, :3].astype(np.int32)
    swap = rng.random(800) < 0.3
    selected[swap, 2] = np.argsort(-probs[swap], axis=1, kind="stable")[:, 5]  # 6th, not 3rd
    n, e = probs.shape
    differs = np.zeros(n, np.uint8)
    outputs = np.zeros(n), np.empty(n, np.float32), np.empty((n, 1), np.int32)
    native.token_stats(probs, e, 1, False, *outputs, None, None, selected, differs)
    lowest = np.take_along_axis(probs, selected, axis=1).min(axis=1)
    others = probs.astype(np.float64)
    np.put_along_axis(others, selected.astype(np.int64), -np.inf, axis=1)
    np.testing.assert_array_equal(differs.view(bool), others.max(axis=1) > lowest)
    assert differs[swap].any()
    every = np.tile(np.arange(e, dtype=np.int32), (n, 1))
    native.token_stats(probs, e, 1, False, *outputs, None, None, every, differs)
    assert not differs.any()
