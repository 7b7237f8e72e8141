from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import routelog
from routelog import api
from routelog.api import RunSpec
from routelog.cache import Cache
from routelog.cli import app
from routelog.config import Config
from routelog.errors import InputError, UsageError
from routelog.ingest import parquet
from tests.conftest import SAMPLES, WriteRun, dirichlet
from tests.test_compare import probs_for, random_ids


def test_run_spec_parsing(tmp_path: Path) -> None:
    assert RunSpec.parse("base=runs/a") == RunSpec("base", Path("runs/a"))
    assert RunSpec.parse(str(tmp_path)).name == tmp_path.name
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert RunSpec.parse(str(odd)) == RunSpec("a=b", odd)  # an existing path wins
    with pytest.raises(UsageError):
        RunSpec.parse("=x")


def test_duplicate_run_names_are_refused(write_parquet_run: WriteRun) -> None:
    root = write_parquet_run({0: {0: np.full((2, 2), 0.5)}})
    with pytest.raises(UsageError, match="two runs are named"):
        routelog.analyze([root, root])


def test_several_runs(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    a = write_parquet_run({0: {0: dirichlet(rng, 5, 4)}}, name="a")
    b = write_parquet_run({0: {0: dirichlet(rng, 5, 4)}}, name="b")
    result = routelog.analyze([a, b])
    assert result.metrics["run"].to_list() == ["a", "b"]
    assert [r.name for r in result.runs] == ["a", "b"]


def test_sample_collapse_is_visible_in_metrics() -> None:
    metrics = routelog.analyze([SAMPLES / "collapse"], top_k=2).metrics
    last = metrics.filter(metrics["step"] == metrics["step"].max()).sort("layer")
    assert last["dead_experts"].to_list()[2:] == [6, 6]
    assert all(h > 0.6 for h in last["token_entropy_norm"].to_list()[:2])
    assert all(h < 0.15 for h in last["token_entropy_norm"].to_list()[2:])


def test_selections_kept_when_tokens_known() -> None:
    run = routelog.analyze([SAMPLES / "healthy"], top_k=2).runs[0]
    assert run.selections is not None
    assert run.selections.height == 12 * 4 * 512
    assert run.selections.schema["topk"].shape == (2,)  # type: ignore[attr-defined]
    assert run.selections.columns == ["step", "layer", "dataset", "token", "topk"]


runner = CliRunner()


def test_flip_rate_and_saturation_known_answer(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(0)
    final = random_ids(rng, 100)
    first = final.copy()
    first[:30] = first[:30, ::-1]  # 30 tokens: same top-2 set, top-1 flips at the last step
    middle = final.copy()
    path = write_parquet_run(
        {0: {0: probs_for(first)}, 10: {0: probs_for(middle)}, 40: {0: probs_for(final)}}
    )
    metrics = api.analyze([path], top_k=2).metrics.sort("step")
    assert metrics["flip_rate"].to_list() == [None, pytest.approx(0.3), 0.0]
    assert metrics["saturation"].to_list() == pytest.approx([1.0, 1.0, 1.0])
    top1 = write_parquet_run({0: {0: probs_for(first)}, 10: {0: probs_for(final)}}, name="top1")
    metrics = api.analyze([top1], top_k=1).metrics.sort("step")
    assert metrics["saturation"].to_list() == pytest.approx([0.7, 1.0])


def test_token_metrics_null_without_tokens(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 20)
    path = write_parquet_run({0: {0: probs_for(ids)}, 1: {0: probs_for(ids)}}, tokens=False)
    result = api.analyze([path], top_k=2)
    assert result.metrics["flip_rate"].null_count() == 2
    assert result.metrics["saturation"].null_count() == 2
    assert result.metrics.columns[-5:] == [
        "flip_rate",
        "saturation",
        "load_share",
        "mass_share",
        "top1_share",
    ]


def test_early_saturation_finding_in_analyze(write_parquet_run: WriteRun) -> None:
    rng = np.random.default_rng(2)
    final = random_ids(rng, 100)
    early = final.copy()
    early[:50] = (final[:50] + 1) % 8  # half the tokens route elsewhere at step 0
    steps = {0: early, 100: final, 200: final, 1000: final}
    path = write_parquet_run({s: {0: probs_for(ids)} for s, ids in steps.items()})
    config = Config(rules=("early_saturation",))
    found = api.analyze([path], top_k=2, config=config).findings
    assert [(f.first_step, f.last_step, f.layer) for f in found] == [(100, 200, 0)]
    late = write_parquet_run(
        {0: {0: probs_for(early)}, 900: {0: probs_for(early)}, 1000: {0: probs_for(final)}},
        name="late",
    )
    assert api.analyze([late], top_k=2, config=config).findings == []


def test_analyze_json_and_csv_carry_token_metrics() -> None:
    result = runner.invoke(app, ["analyze", str(SAMPLES / "drift"), "-k", "2", "-f", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    first = [m for m in document["metrics"] if m["step"] == 0]
    assert all(m["flip_rate"] is None and 0 <= m["saturation"] <= 1 for m in first)
    assert all(m["flip_rate"] is not None for m in document["metrics"] if m["step"] > 0)
    result = runner.invoke(app, ["analyze", str(SAMPLES / "drift"), "-k", "2", "-f", "csv"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split(",")
    assert header[-2:] == ["flip_rate", "saturation"]


def _run(write: WriteRun, steps: int = 4, name: str = "run") -> Path:
    rng = np.random.default_rng(7)
    data = {
        100 * s: {layer: dirichlet(rng, 50 + 10 * layer, 8, 0.5) for layer in range(3)}
        for s in range(steps)
    }
    return write(data, name=name)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files ``api.read_file`` was asked to read, in any order."""
    calls: list[Path] = []
    original = api.read_file
    lock = threading.Lock()

    def counting(path: Path, options: api.Options, **kwargs: int) -> api.FileResult:
        with lock:
            calls.append(path)
        return original(path, options, **kwargs)

    monkeypatch.setattr(api, "read_file", counting)
    return calls


def test_reanalysis_reads_only_the_added_file(
    write_parquet_run: WriteRun, reads: list[Path], tmp_path: Path
) -> None:
    run = _run(write_parquet_run)
    store = Cache.at(tmp_path / "cache")
    first = api.analyze([run], top_k=2, cache=store)
    assert len(reads) == 4
    reads.clear()
    again = api.analyze([run], top_k=2, cache=store)
    assert reads == []
    assert_frame_equal(again.metrics, first.metrics)
    rng = np.random.default_rng(8)
    write_parquet_run({400: {0: dirichlet(rng, 20, 8)}})
    added = api.analyze([run], top_k=2, cache=store)
    assert reads == [run / "step_000400.parquet"]
    assert added.metrics.height == first.metrics.height + 1


def test_cached_and_uncached_results_are_identical(
    write_parquet_run: WriteRun, tmp_path: Path
) -> None:
    run = _run(write_parquet_run)
    store = Cache.at(tmp_path / "cache")
    uncached = api.analyze([run], top_k=2)
    api.analyze([run], top_k=2, cache=store)
    cached = api.analyze([run], top_k=2, cache=store)
    assert store.usage().entries == 4
    assert_frame_equal(cached.metrics, uncached.metrics)
    [a], [b] = cached.runs, uncached.runs
    assert_frame_equal(a.stats, b.stats)
    assert a.selections is not None
    assert b.selections is not None
    assert_frame_equal(a.selections, b.selections)
    assert a.summary() == b.summary()


def test_python_api_writes_no_cache_by_default(write_parquet_run: WriteRun) -> None:
    api.analyze([_run(write_parquet_run)], top_k=2)
    assert Cache.at().usage().entries == 0


@pytest.mark.parametrize("jobs", [1, 2, 5])
def test_parallel_and_serial_agree(write_parquet_run: WriteRun, jobs: int) -> None:
    run = _run(write_parquet_run, steps=6)
    serial = api.analyze([run], top_k=2, jobs=1)
    parallel = api.analyze([run], top_k=2, jobs=jobs)
    assert_frame_equal(parallel.metrics, serial.metrics)
    assert [f.path for f in parallel.runs[0].files] == [f.path for f in serial.runs[0].files]


def test_jobs_must_be_positive(write_parquet_run: WriteRun) -> None:
    with pytest.raises(api.UsageError, match="--jobs"):
        api.analyze([_run(write_parquet_run)], jobs=0)


def test_small_chunks_stream_to_the_same_statistics(
    write_parquet_run: WriteRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _run(write_parquet_run, steps=1) / "step_000000.parquet"
    options = api.make_options(top_k=2)
    whole = api.read_file(path, options, prefetch=0)
    monkeypatch.setattr(parquet, "BATCH_ROWS", 7)
    for prefetch in (0, 1, 3):
        chunked = api.read_file(path, options, prefetch=prefetch)
        assert_frame_equal(chunked.stats, whole.stats, check_exact=False, rel_tol=1e-12)
        assert chunked.selections is not None
        assert whole.selections is not None
        assert_frame_equal(chunked.selections, whole.selections)
        assert chunked.info == whole.info


def test_first_bad_file_in_order_is_reported(write_parquet_run: WriteRun) -> None:
    run = _run(write_parquet_run, steps=5)
    (run / "step_000100.parquet").write_bytes(b"PAR1 broken")
    (run / "step_000300.parquet").write_bytes(b"PAR1 broken too")
    for jobs in (1, 3):
        with pytest.raises(InputError, match=r"step_000100\.parquet: not a valid Parquet"):
            api.analyze([run], jobs=jobs)


def test_prefetch_raises_the_producers_error_and_stops_it() -> None:
    closed = threading.Event()

    def failing() -> Iterator[int]:
        yield 1
        raise InputError("f.parquet row 3: bad")

    with api._prefetched(failing(), 2) as items:
        assert next(items) == 1
        with pytest.raises(InputError, match="row 3"):
            next(items)

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.set()

    with api._prefetched(endless(), 1) as items:
        assert next(items) == 1
    assert closed.is_set()  # leaving early stopped and closed the producer


def test_uncached_files_are_read_before_cached_ones_are_loaded(
    write_parquet_run: WriteRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(write_parquet_run, steps=3)
    store = Cache.at(tmp_path / "cache")
    first = api.analyze([run], top_k=2, cache=store)
    rng = np.random.default_rng(9)
    write_parquet_run({300: {0: dirichlet(rng, 20, 8)}})
    events: list[str] = []
    original_load, original_read = Cache.load, api.read_file

    def load(self: Cache, path: Path, options: api.Options) -> object:
        events.append(f"load {path.name}")
        return original_load(self, path, options)

    def read(path: Path, options: api.Options, **kwargs: int) -> api.FileResult:
        events.append(f"read {path.name}")
        return original_read(path, options, **kwargs)

    monkeypatch.setattr(Cache, "load", load)
    monkeypatch.setattr(api, "read_file", read)
    again = api.analyze([run], top_k=2, cache=store, jobs=1)
    assert events[:2] == ["load step_000300.parquet", "read step_000300.parquet"]
    assert len(events) == 5
    assert [f.path for f in again.runs[0].files] == sorted(str(p) for p in run.glob("*.parquet"))
    assert first.metrics.height + 1 == again.metrics.height
    monkeypatch.undo()
    assert_frame_equal(again.metrics, api.analyze([run], top_k=2).metrics)


def _widths(*pairs: tuple[int, int], step: int = 0, top_k: int | None = None) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "step": [step] * len(pairs),
            "layer": [p[0] for p in pairs],
            "n_experts": [p[1] for p in pairs],
            "top_k": [top_k] * len(pairs),
        },
        schema={"step": pl.Int64, "layer": pl.Int32, "n_experts": pl.Int64, "top_k": pl.Int32},
    )


def test_expert_count_check_names_the_first_file_that_differs() -> None:
    """Files in order: a layer's width is the one it had first; the first file (in order)
    where it differs is named, with the file the width came from."""
    parts = [
        (_widths((0, 2), (1, 4)), "a"),
        (_widths((1, 4)), "b"),
        (_widths((1, 6), (0, 2)), "c"),
        (_widths((0, 3)), "d"),
    ]
    with pytest.raises(InputError, match=r"^c: layer 1 has 6 experts, but 4 in a \(all rows"):
        api._check_experts(parts)
    api._check_experts(parts[:2])
    api._check_experts([])
    with pytest.raises(InputError, match=r"^x: layer 5 has 8 experts, but 7 in x "):
        api._check_experts([(_widths((5, 7), (5, 8)), "x")])


def test_top_k_check_names_the_first_file_whose_step_differs() -> None:
    """A layer may select a different number of experts per token at another step, not at
    the same step in another file (or row): that file is named, with the one k came from."""
    parts = [
        (_widths((0, 8), (1, 8), step=0, top_k=1), "a"),
        (_widths((0, 8), step=1, top_k=2), "b"),  # another step: allowed
        (_widths((1, 8), step=0), "c"),  # k unknown: nothing to contradict
        (_widths((1, 8), step=0, top_k=2), "d"),
    ]
    api._check_experts(parts[:3])
    with pytest.raises(
        InputError, match=r"^d: layer 1 selects 2 experts per token at step 0, but 1 in a \(one"
    ):
        api._check_experts(parts)


def test_a_run_summary_states_k_as_one_value_or_null() -> None:
    assert routelog.analyze(SAMPLES / "collapse", top_k=2).runs[0].summary()["top_k"] == 2
    counts = routelog.analyze(SAMPLES / "megatron-tpe").runs[0].summary()
    assert counts["top_k"] is None  # counts state no k


def test_two_files_of_one_step_with_two_k_are_refused(tmp_path: Path) -> None:
    """Before the check, the layer became two groups at that step, and the layer table
    showed one of them."""
    run = tmp_path / "run"
    run.mkdir()
    for name, ids, token in (("a", [0], 0), ("b", [0, 1], 1)):
        row = {"step": 0, "layer": 0, "token": token, "num_experts": 2, "topk_ids": ids}
        (run / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(
        InputError,
        match=r"b\.jsonl: layer 0 selects 2 experts per token at step 0, but 1 in .*a\.jsonl",
    ):
        api.analyze([run])
