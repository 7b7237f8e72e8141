from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from routelog import api, cache, kernels
from routelog.cache import Cache, Entry
from tests.conftest import WriteRun, dirichlet


@pytest.fixture
def log_file(write_parquet_run: WriteRun) -> Path:
    rng = np.random.default_rng(0)
    run = write_parquet_run({100: {0: dirichlet(rng, 40, 8), 1: dirichlet(rng, 30, 8)}})
    return run / "step_000100.parquet"


def _fill(store: Cache, path: Path, options: api.Options) -> api.FileResult:
    result = api.read_file(path, options)
    store.store(path, options, Entry(result.info, result.stats, result.selections))
    return result


def _assert_same(entry: Entry | None, result: api.FileResult) -> None:
    assert entry is not None
    assert entry.info == result.info
    assert_frame_equal(entry.stats, result.stats)
    assert result.selections is not None
    assert entry.selections is not None
    assert_frame_equal(entry.selections, result.selections)


def test_default_directory_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROUTELOG_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_directory() == tmp_path / "explicit"
    monkeypatch.delenv("ROUTELOG_CACHE_DIR")
    assert cache.default_directory() == tmp_path / "xdg" / "routelog"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_directory() == tmp_path / "home" / ".cache" / "routelog"


def test_round_trip(log_file: Path, tmp_path: Path) -> None:
    store = Cache.at(tmp_path / "c")
    options = api.make_options(top_k=2)
    assert store.load(log_file, options) is None
    result = _fill(store, log_file, options)
    _assert_same(store.load(log_file, options), result)
    assert store.usage().entries == 1
    names = sorted(p.name.split(".", 1)[1] for p in store.directory.iterdir())
    assert names == ["json", "sel.parquet", "stats.parquet"]


def test_key_follows_file_options_and_kernel(
    log_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Cache.at(tmp_path / "c")
    options = api.make_options(top_k=2)
    _fill(store, log_file, options)
    # dead_fraction is applied after merging: the same statistics serve it.
    assert store.load(log_file, api.make_options(top_k=2, dead_fraction=0.3)) is not None
    assert store.load(log_file, api.make_options(top_k=1)) is None
    assert store.load(log_file, api.make_options(top_k=2, layers="0")) is None
    assert store.load(log_file, api.make_options(top_k=2, steps="0:50")) is None
    assert store.load(log_file, api.make_options(top_k=2, skip_bad_rows=True)) is None
    monkeypatch.setattr(kernels, "KERNEL_VERSION", kernels.KERNEL_VERSION + 1)
    assert store.load(log_file, options) is None
    monkeypatch.undo()
    stat = log_file.stat()
    os.utime(log_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert store.load(log_file, options) is None


def test_changed_file_replaces_its_entry(log_file: Path, tmp_path: Path) -> None:
    store = Cache.at(tmp_path / "c")
    options = api.make_options(top_k=2)
    _fill(store, log_file, options)
    rng = np.random.default_rng(1)
    frame = pl.DataFrame(
        {
            "layer": np.zeros(5, dtype=np.int32),
            "step": np.full(5, 100),
            "probs": dirichlet(rng, 5, 8),
        }
    )
    frame.write_parquet(log_file)
    assert store.load(log_file, options) is None
    result = _fill(store, log_file, options)
    entry = store.load(log_file, options)
    assert entry is not None
    assert_frame_equal(entry.stats, result.stats)
    assert entry.selections is None
    assert store.usage().entries == 1
    assert len(list(store.directory.glob("*.parquet"))) == 1  # the old entry's data is gone


def _entry_files(store: Cache) -> dict[str, Path]:
    return {p.name.split(".", 1)[1]: p for p in store.directory.iterdir()}


@pytest.mark.parametrize(
    "damage",
    [
        "json-garbage",
        "json-truncated",
        "json-foreign-key",
        "json-bad-info",
        "json-bad-data-name",
        "stats-truncated",
        "stats-wrong-schema",
        "selections-missing",
        "selections-wrong-schema",
        "selections-wrong-dtype",
    ],
)
def test_damaged_entry_is_ignored_and_rewritten(
    log_file: Path, tmp_path: Path, damage: str
) -> None:
    store = Cache.at(tmp_path / "c")
    options = api.make_options(top_k=2)
    result = _fill(store, log_file, options)
    files = _entry_files(store)
    document = json.loads(files["json"].read_text())
    if damage == "json-garbage":
        files["json"].write_text("{not json")
    elif damage == "json-truncated":
        files["json"].write_text(files["json"].read_text()[:40])
    elif damage == "json-foreign-key":
        document["key"]["path"] = "/somewhere/else.parquet"
        files["json"].write_text(json.dumps(document))
    elif damage == "json-bad-info":
        document["info"]["rows"] = "many"
        files["json"].write_text(json.dumps(document))
    elif damage == "json-bad-data-name":
        document["data"] = "../../etc/passwd"
        files["json"].write_text(json.dumps(document))
    elif damage == "stats-truncated":
        data = files["stats.parquet"].read_bytes()
        files["stats.parquet"].write_bytes(data[: len(data) // 2])
    elif damage == "stats-wrong-schema":
        result.stats.drop("counts").write_parquet(files["stats.parquet"])
    elif damage == "selections-missing":
        files["sel.parquet"].unlink()
    elif damage == "selections-wrong-schema":
        result.stats.write_parquet(files["sel.parquet"])
    else:
        stored = pl.read_parquet(files["sel.parquet"])
        stored.with_columns(pl.col("topk_0").cast(pl.Float64)).write_parquet(files["sel.parquet"])
    assert store.load(log_file, options) is None
    _fill(store, log_file, options)
    _assert_same(store.load(log_file, options), result)


def test_unwritable_cache_is_skipped(log_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = Cache.at(blocker / "cache")
    options = api.make_options(top_k=2)
    _fill(store, log_file, options)  # does not raise
    assert store.load(log_file, options) is None


def test_clear_removes_only_entries(log_file: Path, tmp_path: Path) -> None:
    store = Cache.at(tmp_path / "c")
    _fill(store, log_file, api.make_options(top_k=2))
    _fill(store, log_file, api.make_options(top_k=1))
    mine = store.directory / "notes.txt"
    mine.write_text("keep me")
    usage = store.usage()
    assert usage.entries == 2
    assert usage.bytes == sum(
        p.stat().st_size for p in store.directory.iterdir() if p.name != "notes.txt"
    )
    assert store.clear() == 2
    assert [p.name for p in store.directory.iterdir()] == ["notes.txt"]
    assert store.usage().entries == 0
    assert Cache.at(tmp_path / "never-made").clear() == 0


def test_holds_follows_the_key(log_file: Path, tmp_path: Path) -> None:
    store = Cache.at(tmp_path / "c")
    options = api.make_options(top_k=2)
    assert not store.holds(log_file, options)
    _fill(store, log_file, options)
    assert store.holds(log_file, options)
    assert not store.holds(log_file, api.make_options(top_k=1))
    assert not store.holds(log_file.with_name("missing.parquet"), options)


def test_clear_leaves_foreign_files_named_like_entries(log_file: Path, tmp_path: Path) -> None:
    store = Cache.at(tmp_path / "c")
    _fill(store, log_file, api.make_options(top_k=2))
    fake = "a" * 64
    foreign = [
        store.directory / f"{fake}.json",
        store.directory / f"{fake}-{'b' * 32}.stats.parquet",
        store.directory / f"{fake}-{'b' * 32}.sel.parquet",
    ]
    foreign[0].write_text('{"format": 3, "key": {}}')  # JSON without the marker
    pl.DataFrame({"x": [1]}).write_parquet(foreign[1])  # Parquet without the marker
    foreign[2].write_bytes(b"my thesis")
    assert store.usage().entries == 1
    assert store.clear() == 1
    assert all(f.exists() for f in foreign)
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(f.name for f in foreign)


def test_clear_never_follows_symlinks(log_file: Path, tmp_path: Path) -> None:
    outside = Cache.at(tmp_path / "outside")
    _fill(outside, log_file, api.make_options(top_k=2))
    kept = sorted(outside.directory.iterdir())
    linked = tmp_path / "linked"
    linked.mkdir()
    for target in kept:  # links named like entries, pointing at real entries elsewhere
        (linked / target.name).symlink_to(target)
    assert Cache.at(linked).clear() == 0
    assert all(p.is_symlink() for p in linked.iterdir())
    assert sorted(outside.directory.iterdir()) == kept
    # a symlinked cache directory: only proven entries go, nothing else in the target
    (tmp_path / "notes.json").write_text("{}")
    alias = tmp_path / "alias"
    alias.symlink_to(outside.directory, target_is_directory=True)
    (outside.directory / f"{'c' * 64}.json").write_text('{"format": 3}')
    assert Cache.at(alias).clear() == 1
    assert [p.name for p in outside.directory.iterdir()] == [f"{'c' * 64}.json"]


def test_rewrite_with_same_size_and_mtime_is_not_stale(log_file: Path, tmp_path: Path) -> None:
    store = Cache.at(tmp_path / "c")
    options = api.make_options(top_k=2)
    _fill(store, log_file, options)
    before = log_file.stat()
    content = bytearray(log_file.read_bytes())
    # same size, same mtime, different bytes in the footer
    content[-20] ^= 0xFF
    log_file.write_bytes(bytes(content))
    os.utime(log_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert log_file.stat().st_size == before.st_size
    assert log_file.stat().st_mtime_ns == before.st_mtime_ns
    assert store.load(log_file, options) is None


def test_swapped_or_edited_frames_are_misses(
    write_parquet_run: WriteRun, log_file: Path, tmp_path: Path
) -> None:
    store = Cache.at(tmp_path / "c")
    options = api.make_options(top_k=2)
    rng = np.random.default_rng(1)
    other = write_parquet_run({200: {0: dirichlet(rng, 10, 8)}}, name="other")
    other_file = other / "step_000200.parquet"
    _fill(store, log_file, options)
    _fill(store, other_file, options)
    mine = sorted(store.directory.glob("*.stats.parquet"))
    assert len(mine) == 2
    first, second = (p.read_bytes() for p in mine)
    mine[0].write_bytes(second)  # entry 0 now holds entry 1's statistics (a valid schema)
    mine[1].write_bytes(first)
    assert store.load(log_file, options) is None
    assert store.load(other_file, options) is None
