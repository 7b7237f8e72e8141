"""The bundled sample logs are what scripts/make_samples.py writes, and stay small."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from tests.conftest import REPO, SAMPLES

PACKAGED = REPO / "routelog" / "samples"


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
    packaged = tmp_path / "package"
    module.main(tmp_path / "logs", packaged)
    for shipped, made_root in ((SAMPLES, tmp_path / "logs"), (PACKAGED, packaged)):
        bundled = sorted(p.relative_to(shipped) for p in shipped.rglob("*.parquet"))
        made = sorted(p.relative_to(made_root) for p in made_root.rglob("*.parquet"))
        assert bundled == made
        for name in bundled:
            assert_frame_equal(pl.read_parquet(shipped / name), pl.read_parquet(made_root / name))


def test_packaged_sample_is_tiny_and_collapses() -> None:
    """What `routelog demo` shows from any installation: a few tens of KB, layers 2 and 3 fail."""
    total = sum(p.stat().st_size for p in PACKAGED.rglob("*") if p.is_file())
    assert total <= 64 * 1024
    import routelog

    findings = routelog.analyze(PACKAGED / "collapse", top_k=2).findings
    assert {(f.code, f.layer) for f in findings if f.severity == "fail"} == {
        ("collapse", 2),
        ("collapse", 3),
    }
