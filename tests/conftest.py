"""Shared fixtures: deterministic CLI output and small generated runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_logs"
REAL_LOGS_ROOT = Path(
    os.environ.get("ROUTELOG_REAL_LOGS") or REPO.parent / "shared" / "real_logs"
).expanduser()
"""The real router dumps (../shared/real_logs next to the checkout, or $ROUTELOG_REAL_LOGS)."""
REAL_LOGS = REAL_LOGS_ROOT / "mixtral-e8-top2"
REQUIRE_REAL_LOGS = os.environ.get("ROUTELOG_REQUIRE_REAL_LOGS", "") not in ("", "0")
"""Set by CI when the dumps exist: a test that needs them fails instead of skipping."""


@pytest.fixture(autouse=True)
def _real_logs_present(request: pytest.FixtureRequest) -> None:
    """Tests marked ``real_logs`` skip without the dumps, or fail when CI requires them."""
    if request.node.get_closest_marker("real_logs") is None or REAL_LOGS.is_dir():
        return
    message = f"real router dumps not found at {REAL_LOGS} (set ROUTELOG_REAL_LOGS)"
    if REQUIRE_REAL_LOGS:
        pytest.fail(f"{message}; ROUTELOG_REQUIRE_REAL_LOGS is set", pytrace=False)
    pytest.skip(message)


_skipped_real: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember tests skipped for want of the real dumps, however their skip was written."""
    if report.skipped and "real" in str(report.longrepr).lower():
        _skipped_real.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_REAL_LOGS and _skipped_real:
        names = ", ".join(_skipped_real[:5]) + (" ..." if len(_skipped_real) > 5 else "")
        print(
            f"\nROUTELOG_REQUIRE_REAL_LOGS is set but {len(_skipped_real)} real-log tests "
            f"skipped: {names}",
            file=sys.stderr,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# `make fuzz` (ROUTELOG_FUZZ=long): the fuzzing tests run thousands of examples, not a few dozen
settings.register_profile("fuzz", max_examples=5000, deadline=None)
if os.environ.get("ROUTELOG_FUZZ") == "long":
    settings.load_profile("fuzz")


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed width, no colour: CLI output is the same on every machine."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.delenv("ROUTELOG_DEBUG", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(autouse=True)
def isolated_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Every test gets its own empty cache directory: the suite never writes to ~/.cache."""
    directory = tmp_path_factory.mktemp("routelog-cache")
    monkeypatch.setenv("ROUTELOG_CACHE_DIR", str(directory))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return directory


@pytest.fixture(autouse=True)
def _isolated_project(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test runs in its own project (a directory with ``.git``), so no configuration file
    above the checkout (a user's ~/routelog.toml, say) can change what the suite sees."""
    (tmp_path / ".git").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)


WriteRun = Callable[..., Path]


@pytest.fixture
def write_parquet_run(tmp_path: Path) -> WriteRun:
    """Write a run of per-token Parquet files: ``{step: {layer: (T, E) array}}``."""

    def write(
        data: dict[int, dict[int, np.ndarray]],
        *,
        name: str = "run",
        payload: str = "probs",
        step_column: bool = True,
        tokens: bool = True,
    ) -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        for step, layers in data.items():
            frames = []
            for layer, matrix in layers.items():
                columns: dict[str, object] = {"layer": np.full(len(matrix), layer, dtype=np.int32)}
                if step_column:
                    columns["step"] = np.full(len(matrix), step, dtype=np.int64)
                if tokens:
                    columns["token"] = np.arange(len(matrix), dtype=np.int64)
                columns[payload] = matrix.astype(np.float32)
                frames.append(pl.DataFrame(columns))
            pl.concat(frames).write_parquet(root / f"step_{step:06d}.parquet")
        return root

    return write


def dirichlet(rng: np.random.Generator, n: int, e: int, alpha: float = 1.0) -> np.ndarray:
    """Random probability rows (float64)."""
    return rng.dirichlet(np.full(e, alpha), size=n)


# Property-based fuzzing (tests/test_fuzz.py): short by default, long with ROUTELOG_FUZZ=long
# (`make fuzz`). Only the fuzz tests read these profiles; the other hypothesis tests keep theirs.
settings.register_profile("fuzz", max_examples=2000, deadline=None)
FUZZ_LONG = os.environ.get("ROUTELOG_FUZZ") == "long"

# object-storage servers on 127.0.0.1 (moto S3, a GCS emulator), for any test module that asks
from tests.objectstore import gcs, gcs_server, s3, s3_server, store  # noqa: E402, F401
