"""watch: files still being written wait, each step and finding is reported once, the CLI."""

from __future__ import annotations

import gzip
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from polars.testing import assert_frame_equal

from routelog import api
from routelog.api import RunSpec
from routelog.config import Config
from routelog.executor import Threads
from routelog.watch import Completeness, Watcher
from tests.conftest import SAMPLES
from tests.objectstore import Store

COLLAPSE = SAMPLES / "collapse"
STEPS = [int(p.stem.split("_")[1]) for p in sorted(COLLAPSE.glob("*.parquet"))]


def _write_slowly(source: Path, target: Path, pause: float) -> None:
    """Write a file the way a trainer does: the first half, a pause, then the rest."""
    data = source.read_bytes()
    with target.open("wb") as stream:
        stream.write(data[: len(data) // 2])
        stream.flush()
        time.sleep(pause)
        stream.write(data[len(data) // 2 :])


def _writer(target: Path, pause: float = 0.05) -> threading.Thread:
    def write() -> None:
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(COLLAPSE.glob("*.parquet")):
            _write_slowly(source, target / source.name, pause)
            time.sleep(pause)

    return threading.Thread(target=write, daemon=True)


def test_parquet_is_complete_only_with_its_footer(tmp_path: Path) -> None:
    data = (COLLAPSE / "step_000000.parquet").read_bytes()
    target = tmp_path / "step_000000.parquet"
    complete = Completeness()
    for cut in (0, 4, 11, len(data) // 2, len(data) - 1):
        target.write_bytes(data[:cut])
        assert not complete(target), cut
    target.write_bytes(data)
    assert complete(target)


def test_the_final_report_names_the_files_it_did_not_read(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(COLLAPSE / "step_000000.parquet", run)
    partial = run / "step_000100.parquet"
    partial.write_bytes((COLLAPSE / "step_000100.parquet").read_bytes()[:3000])
    watcher = Watcher([RunSpec("run", run)], api.make_options(top_k=2), Config(), None, Threads(1))
    watcher.poll()
    final = watcher.final()
    assert final is not None
    assert final.notes[-1] == (
        f"1 log file not read: still being written at the last look ({partial})"
    )
    assert watcher.last is not None
    assert watcher.last.notes == []  # the rounds' analyses are left as they were
    shutil.copy(COLLAPSE / "step_000100.parquet", partial)
    watcher.poll()
    assert watcher.final() is watcher.last


def test_pt_is_complete_only_with_the_zip_directory(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    whole = tmp_path / "whole.pt"
    torch.save({"step": 1, "router_logits": (torch.zeros(4, 8),)}, whole)
    data = whole.read_bytes()
    target = tmp_path / "step_000001.pt"
    complete = Completeness()
    for cut in (0, 100, len(data) // 2, len(data) - 22):
        target.write_bytes(data[:cut])
        assert not complete(target), cut
    target.write_bytes(data)
    assert complete(target)


def test_jsonl_waits_for_its_last_line(tmp_path: Path) -> None:
    data = (SAMPLES / "megatron-tpe" / "tokens_per_expert.jsonl").read_bytes()
    first_line = data.index(b"\n") + 1
    target = tmp_path / "tpe.jsonl"
    complete = Completeness()
    target.write_bytes(data[: first_line + 5])
    assert not complete(target)
    target.write_bytes(data[:first_line])
    assert complete(target)


def test_other_files_are_complete_once_unchanged_for_a_round(tmp_path: Path) -> None:
    target = tmp_path / "tpe.jsonl.gz"
    target.write_bytes(gzip.compress(b'{"step": 1}\n'))
    complete = Completeness()
    assert not complete(target)
    assert complete(target)
    with target.open("ab") as stream:
        stream.write(gzip.compress(b'{"step": 2}\n'))
    assert not complete(target)
    assert complete(target)


def test_each_step_and_finding_is_reported_once_while_a_writer_appends(tmp_path: Path) -> None:
    run = tmp_path / "run"
    watcher = Watcher([RunSpec("run", run)], api.make_options(top_k=2), Config(), None, Threads(1))
    first = watcher.poll()
    assert (first.analysis, first.waiting) == (None, ["run"])
    writer = _writer(run)
    writer.start()
    rounds = []
    while writer.is_alive():
        rounds.append(watcher.poll())  # never an error, whatever is half-written
        time.sleep(0.01)
    rounds.append(watcher.poll())
    seen = [step for r in rounds for step in r.new_steps.get("run", [])]
    assert seen == STEPS
    assert any(r.pending for r in rounds)  # half-written files were met, and waited for
    reported = [f for r in rounds for f in r.new_findings]
    keys = [(f.layer, f.code, f.first_step) for f in reported]
    assert len(keys) == len(set(keys))
    final = api.analyze([run], top_k=2, jobs=1)
    assert rounds[-1].analysis is not None
    assert_frame_equal(rounds[-1].analysis.metrics, final.metrics)
    assert {(f.layer, f.code, f.first_step) for f in final.findings} <= set(keys)


def _routelog(
    *args: str, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "routelog", *args],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env or {})},
        **kwargs,  # type: ignore[call-overload]
    )


def _lines_until(process: subprocess.Popen[bytes], needle: str, timeout: float) -> list[str]:
    """Lines of the process's stdout up to and including the first containing ``needle``."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            lines = data.decode().splitlines(keepends=True)
            if any(needle in line for line in lines):
                return lines
    raise AssertionError(f"no {needle!r} within {timeout} s in: {data.decode()}")


def _follow(target: str, writer: threading.Thread, final: Path, *options: str) -> None:
    """`routelog watch TARGET` while ``writer`` writes the collapse run there: each step is
    reported once, the collapse is found, and the final report is `analyze`'s."""
    watch = _routelog(
        "watch", target, "-k", "2", "--interval", "0.2", "--format", "json", "-o", str(final),
        *options, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    writer.start()
    lines = _lines_until(watch, f"step {STEPS[-1]}  ", timeout=60)
    writer.join()
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    lines += out.decode().splitlines(keepends=True)
    for step in STEPS:
        assert sum(f"  run  step {step}  " in line for line in lines) == 1, (step, lines)
    assert any("FAIL collapse" in line and "layer 2" in line for line in lines)
    analyzed = subprocess.run(
        [sys.executable, "-m", "routelog", "analyze", target, "-k", "2", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(final.read_text()) == json.loads(analyzed.stdout)


def test_cli_follows_a_run_and_ends_with_the_analyze_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _follow(str(run), _writer(run), tmp_path / "final.json", "--no-cache")


@pytest.mark.parametrize(("level", "code"), [("fail", "collapse"), ("warn", None)])
def test_fail_on_exits_1_at_the_first_such_finding(
    tmp_path: Path, level: str, code: str | None
) -> None:
    run = tmp_path / "run"
    shutil.copytree(COLLAPSE, run)
    watch = _routelog(
        "watch", str(run), "-k", "2", "--interval", "0.2", "--fail-on", level,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = (text.decode() for text in watch.communicate(timeout=60))
    assert watch.returncode == 1, err
    assert err.count("\n") == 1
    assert f"stopping (--fail-on {level})" in err
    if code is not None:
        assert f"FAIL {code}" in err
    assert "findings:" in out  # the final report


def test_fail_on_needs_a_known_k(tmp_path: Path) -> None:
    """--fail-on is a gate, as check is: a run whose k would be assumed is an error."""
    watch = _routelog(
        "watch", str(COLLAPSE), "--interval", "0.2", "--fail-on", "fail",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = (text.decode() for text in watch.communicate(timeout=60))
    assert watch.returncode == 2, err
    assert "findings" not in out  # stopped before any report
    assert err == (
        f"routelog: error: {COLLAPSE}: the logs do not state k (experts per token), and the "
        "verdict depends on it (dead experts and load shares count top-k choices): pass "
        "--top-k K, or set top_k in routelog.toml\n"
    )


def test_fail_on_does_not_stop_a_healthy_run(tmp_path: Path) -> None:
    watch = _routelog(
        "watch", str(SAMPLES / "healthy"), "-k", "2", "--interval", "0.2", "--fail-on", "warn",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _lines_until(watch, "step 1100  ", timeout=60)
    watch.send_signal(signal.SIGINT)
    out, err = (text.decode() for text in watch.communicate(timeout=30))
    assert watch.returncode == 0, err
    assert "WARN" not in out
    assert "FAIL" not in out
    assert "steps 0–1100" in out  # the final report


def test_terminal_report_is_redrawn_in_place(tmp_path: Path) -> None:
    _redrawn(str(COLLAPSE))


def _redrawn(target: str) -> None:
    """On a terminal, `watch TARGET` redraws the report in place, then prints the final one."""
    main, child = pty.openpty()
    watch = _routelog(
        "watch", target, "-k", "2", "--interval", "0.2", "--width", "120",
        stdin=subprocess.DEVNULL, stdout=child, stderr=child, env={"TERM": "xterm"},
    )  # fmt: skip
    os.close(child)
    screen = b""
    deadline = time.monotonic() + 60
    while b"newest step" not in screen and time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.2)
        if ready:
            screen += os.read(main, 65536)
    assert b"routelog watch" in screen
    assert b"newest step" in screen
    assert b"\x1b[" in screen  # drawn with cursor control, not appended
    watch.send_signal(signal.SIGINT)
    while watch.poll() is None or select.select([main], [], [], 0.2)[0]:
        try:
            screen += os.read(main, 65536)
        except OSError:
            break
    os.close(main)
    assert watch.wait(timeout=30) == 0
    assert b"findings:" in screen.split(b"newest step")[-1]  # the final report follows


def test_a_file_of_unknown_type_is_an_error(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    watch = _routelog(
        "watch", str(notes), "--interval", "0.2", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    err = watch.communicate(timeout=60)[1].decode()
    assert watch.returncode == 2
    assert err.count("\n") == 1
    assert f"{notes}: unknown file type" in err


# --- runs in a bucket (moto's S3 server on 127.0.0.1, see tests/objectstore.py) ---


def _uploader(s3: Any, bucket: str, prefix: str, pause: float = 0.05) -> threading.Thread:
    """Upload the collapse run's step files one at a time, as a trainer syncing to S3 does."""

    def upload() -> None:
        for source in sorted(COLLAPSE.glob("*.parquet")):
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{source.name}", Body=source.read_bytes())
            time.sleep(pause)

    return threading.Thread(target=upload, daemon=True)


def _new_bucket(s3: Any, name: str) -> str:
    pytest.importorskip("pyarrow.fs")
    if name not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=name)
    return name


def test_a_bucket_prefix_is_followed_while_objects_are_uploaded(
    store: Store, tmp_path: Path
) -> None:
    """S3 and GCS: each step is reported once; the last round is `analyze` of the prefix; a
    re-uploaded object is read again (never served stale from the cache)."""
    from routelog.cache import Cache

    bucket = _new_bucket(store.client, "watched")
    url = f"{store.scheme}://watched/run"
    cache = Cache(tmp_path / "cache")
    options = api.make_options(top_k=2)
    watcher = Watcher([RunSpec.parse(f"run={url}")], options, Config(), cache, Threads(1))
    first = watcher.poll()
    assert (first.analysis, first.waiting) == (None, ["run"])  # no object yet: waiting
    uploader = _uploader(store.client, bucket, "run")
    uploader.start()
    rounds = []
    while uploader.is_alive():
        rounds.append(watcher.poll())
        time.sleep(0.01)
    rounds.append(watcher.poll())
    seen = [step for r in rounds for step in r.new_steps.get("run", [])]
    assert seen == STEPS
    keys = [(f.layer, f.code, f.first_step) for r in rounds for f in r.new_findings]
    assert len(keys) == len(set(keys))
    final = api.analyze([f"run={url}"], top_k=2, jobs=1)
    assert rounds[-1].analysis is not None
    assert_frame_equal(rounds[-1].analysis.metrics, final.metrics)
    assert {(f.layer, f.code, f.first_step) for f in final.findings} <= set(keys)
    # the same key uploaded again with other content: the next round reads it again
    other = SAMPLES / "healthy" / "step_000000.parquet"
    store.client.put_object(Bucket=bucket, Key="run/step_000000.parquet", Body=other.read_bytes())
    again = watcher.poll()
    fresh = api.analyze([f"run={url}"], top_k=2, jobs=1)
    assert again.analysis is not None
    assert_frame_equal(again.analysis.metrics, fresh.metrics)
    assert not again.analysis.metrics.equals(final.metrics)
    assert again.new_steps == {}  # step 0 was reported already


def test_an_object_replaced_while_it_is_read_waits_for_the_next_round(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Parquet object is read by several ranged GETs: replaced between two of them, the
    round leaves it pending (nothing of the mixed read is used) and the next reads it whole."""
    from routelog.ingest import parquet

    bucket = _new_bucket(s3, "replaced")
    for source in sorted(COLLAPSE.glob("*.parquet"))[:2]:
        s3.put_object(Bucket=bucket, Key=f"run/{source.name}", Body=source.read_bytes())
    healthy = (SAMPLES / "healthy" / "step_000100.parquet").read_bytes()
    scan = parquet.scan
    replaced: list[str] = []

    def replace_midway(path: Path, *args: Any, **kwargs: Any) -> Any:
        for number, batch in enumerate(scan(path, *args, **kwargs)):
            if number == 0 and "step_000100" in str(path) and not replaced:
                s3.put_object(Bucket=bucket, Key="run/step_000100.parquet", Body=healthy)
                replaced.append(str(path))
            yield batch

    monkeypatch.setattr(parquet, "scan", replace_midway)
    url = "s3://replaced/run"
    watcher = Watcher([RunSpec.parse(f"run={url}")], api.make_options(top_k=2), Config())
    first = watcher.poll()
    assert replaced
    assert [str(p) for p in first.pending] == [f"{url}/step_000100.parquet"]
    assert first.analysis is None  # nothing of the mixed read was used
    second = watcher.poll()
    assert second.pending == []
    assert second.new_steps == {"run": [0, 100]}
    assert second.analysis is not None
    fresh = api.analyze([f"run={url}"], top_k=2, jobs=1)
    assert_frame_equal(second.analysis.metrics, fresh.metrics)


def test_cli_follows_a_bucket_and_ends_with_the_analyze_report(s3: Any, tmp_path: Path) -> None:
    bucket = _new_bucket(s3, "followed")
    _follow("s3://followed/run", _uploader(s3, bucket, "run"), tmp_path / "final.json")


def test_terminal_report_of_a_bucket_is_redrawn_in_place(s3: Any) -> None:
    bucket = _new_bucket(s3, "drawn")
    for source in sorted(COLLAPSE.glob("*.parquet")):
        s3.put_object(Bucket=bucket, Key=f"run/{source.name}", Body=source.read_bytes())
    _redrawn("s3://drawn/run")


def test_fail_on_stops_a_bucket_watch(s3: Any) -> None:
    bucket = _new_bucket(s3, "failing")
    for source in sorted(COLLAPSE.glob("*.parquet")):
        s3.put_object(Bucket=bucket, Key=f"run/{source.name}", Body=source.read_bytes())
    watch = _routelog(
        "watch", "s3://failing/run", "-k", "2", "--interval", "0.2", "--fail-on", "fail",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = (text.decode() for text in watch.communicate(timeout=60))
    assert watch.returncode == 1, err
    assert "stopping (--fail-on fail)" in err
    assert "FAIL collapse" in err
    assert "findings:" in out


def test_a_missing_bucket_is_an_error_not_a_wait(s3: Any) -> None:
    _new_bucket(s3, "exists")
    watch = _routelog(
        "watch", "s3://no-such-bucket/run", "--interval", "0.2",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    err = watch.communicate(timeout=60)[1].decode()
    assert watch.returncode == 2, err
    assert err.strip() == (
        "routelog: error: s3://no-such-bucket/run: cannot read (no such bucket 'no-such-bucket')"
    )
