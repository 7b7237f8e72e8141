"""The regression corpus: every hostile or odd input file found, with its expected outcome.

``tests/corpus/<reader>/expected.toml`` names each file of its directory and what
``routelog analyze FILE --no-cache ARGS`` must do: exit 0 with metrics in their ranges, or
exit 2 with exactly one line on stderr containing ``stderr``; never a traceback, exit 70, a
hang (60 s) or more than 2 GiB of address space. ``tests/corpus/make_corpus.py`` writes them.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CORPUS = REPO / "tests" / "corpus"
MEMORY_CAP = 2 << 30
TIMEOUT = 60
WORKERS = 8
"""Cases run side by side: each is a fresh interpreter mostly waiting on imports and I/O."""


def _cases() -> list[Any]:
    cases = []
    for expected in sorted(CORPUS.glob("*/expected.toml")):
        with expected.open("rb") as stream:
            entries = tomllib.load(stream)
        for name, entry in entries.items():
            reader = expected.parent.name
            cases.append(pytest.param(expected.parent / name, entry, id=f"{reader}/{name}"))
    return cases


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_capped(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m routelog ARGS`` in a subprocess limited to 2 GiB of address space."""
    return subprocess.run(
        [sys.executable, "-m", "routelog", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=_cap_memory,
        check=False,
    )


def check_metrics(document: dict[str, Any]) -> None:
    """Every metric of an analysis in its range."""
    assert document["metrics"], "exit 0 but no metrics"
    for row in document["metrics"]:
        e, k = row["n_experts"], row["top_k"]
        assert e >= 1
        assert 1 <= k <= e
        assert row["n_tokens"] >= 1
        log_e = math.log(e)
        for name in ("token_entropy", "load_entropy", "assign_entropy"):
            assert -1e-9 <= row[name] <= log_e + 1e-6, (name, row)
        for name in ("token_entropy_norm", "load_entropy_norm", "assign_entropy_norm"):
            if row[name] is not None:
                assert -1e-9 <= row[name] <= 1 + 1e-6, (name, row)
        assert 1 / e - 1e-9 <= row["max_load_share"] <= 1 + 1e-9, row
        assert 0 <= row["dead_experts"] <= e - 1, row
        assert 1 / e - 1e-6 <= row["top1_prob"] <= 1 + 1e-6, row
        assert math.isclose(sum(row["load_share"]), 1, abs_tol=1e-6), row


def _args(path: Path, expected: dict[str, Any]) -> list[str]:
    args = ["analyze", str(path), "--no-cache", *expected.get("args", [])]
    return [*args, "--format", "json"] if expected["exit"] == 0 else args


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[Path, Future[subprocess.CompletedProcess[str]]]:
    """Every case started at once (at most WORKERS at a time); each test waits for its own."""
    cwd = tmp_path_factory.mktemp("corpus")
    env_cache = tmp_path_factory.mktemp("corpus-cache")
    os.environ.setdefault("ROUTELOG_CACHE_DIR", str(env_cache))
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {
        param.values[0]: pool.submit(run_capped, _args(*param.values), cwd) for param in _cases()
    }
    pool.shutdown(wait=False)
    return futures


@pytest.mark.parametrize(("path", "expected"), _cases())
def test_corpus(
    path: Path,
    expected: dict[str, Any],
    outcomes: dict[Path, Future[subprocess.CompletedProcess[str]]],
) -> None:
    assert expected["exit"] in (0, 2), "a corpus outcome is exit 0 or exit 2"
    done = outcomes[path].result()
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == expected["exit"], done.stderr
    if expected["exit"] == 2:
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert expected["stderr"] in lines[0], lines[0]
        assert str(path) in lines[0], lines[0]
    else:
        check_metrics(json.loads(done.stdout))


def test_every_corpus_file_has_an_outcome() -> None:
    for expected in CORPUS.glob("*/expected.toml"):
        with expected.open("rb") as stream:
            named = set(tomllib.load(stream))
        present = {p.name for p in expected.parent.iterdir() if p.name != "expected.toml"}
        assert present == named, expected.parent
