"""The bundled sample logs are what scripts/make_samples.py writes, and stay small."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from tests.conftest import REPO, SAMPLES


def test_samples_are_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024


def test_samples_are_reproducible(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_samples", REPO / "scripts" / "make_samples.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    bundled = sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*.parquet"))
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    assert bundled == made
    for name in bundled:
        assert_frame_equal(pl.read_parquet(SAMPLES / name), pl.read_parquet(tmp_path / name))
