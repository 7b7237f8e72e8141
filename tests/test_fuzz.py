"""Property-based fuzzing of every reader but .pt (JSONL lines, Parquet schemas and values,
configuration files, command-line option values).

For every generated input, ``routelog analyze`` either exits 0 with every metric in its
range, or exits 2 with exactly one line on stderr; never a traceback or exit 70. Runs are
in-process (CliRunner) for speed; memory bounds are the corpus's job (tests/test_corpus.py,
under an address-space cap). A few dozen examples per reader by default; ``make fuzz``
(``ROUTELOG_FUZZ=long``) runs thousands.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from routelog.cli import app
from tests.conftest import FUZZ_LONG
from tests.ranges import assert_metrics_in_range

runner = CliRunner()


def _fuzz(short: int) -> settings:
    """``short`` examples in `make test`; the `fuzz` profile's thousands with ROUTELOG_FUZZ."""
    return settings(
        max_examples=settings.get_profile("fuzz").max_examples if FUZZ_LONG else short,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=not FUZZ_LONG,
    )


def assert_clean(args: list[str], *, usage_errors: bool = False) -> None:
    """Exit 0 with metrics in range, or exit 2 with one line; ``usage_errors`` also admits
    the command's usage error (``routelog analyze: error: ...``) for values click rejects
    before routelog runs."""
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 0:
        assert_metrics_in_range(json.loads(result.stdout))
        return
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    if usage_errors:  # click's, one line too: "routelog analyze: error: --width: must be ..."
        assert re.match(r"routelog( [a-z]+)*: error: ", lines[0]), lines[0]
        return
    assert lines[0].startswith("routelog: error: "), lines[0]


# --- values: mostly plausible, sometimes hostile ------------------------------------------

HUGE_INTS = st.sampled_from([-1, 2**31, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**70])
SMALL_INTS = st.integers(0, 3)
INTS = st.one_of(SMALL_INTS, SMALL_INTS, HUGE_INTS)
FLOATS = st.one_of(
    st.floats(0, 1),
    st.floats(-60, 60),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e39, 1e308, 5e-324, -0.0]),
)
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), st.none(), st.text(max_size=4))


def _vector(e: int) -> st.SearchStrategy[list[Any]]:
    probability = st.lists(st.floats(0, 1), min_size=e, max_size=e).map(
        lambda xs: [x / s for x in xs] if (s := sum(xs)) > 0 else [1.0 / e] * e
    )
    return st.one_of(
        probability,
        probability,
        st.lists(FLOATS, min_size=e, max_size=e),
        st.lists(SCALARS, min_size=0, max_size=e + 1),
        st.lists(st.lists(st.floats(-5, 5), min_size=e, max_size=e), min_size=1, max_size=3),
    )


@st.composite
def jsonl_text(draw: st.DrawFn) -> bytes:
    e = draw(st.integers(1, 4))
    payload = draw(st.sampled_from(["probs", "logits", "tpe", "topk_ids", "p_"]))
    lines: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        pairs: list[tuple[str, Any]] = [("step", draw(INTS)), ("layer", draw(INTS))]
        if payload == "p_":
            pairs += [(f"p_{i}", draw(FLOATS)) for i in range(e)]
        elif payload == "tpe":
            pairs.append(("tpe", draw(st.lists(INTS, min_size=e, max_size=e))))
        elif payload == "topk_ids":
            pairs += [("topk_ids", draw(st.lists(INTS, min_size=1, max_size=2)))]
            pairs += [("num_experts", draw(st.one_of(st.just(e), INTS)))]
        else:
            pairs.append((payload, draw(_vector(e))))
        extras = st.sampled_from(["token", "mask", "dataset", "layer", "step", "probs"])
        for key in draw(st.lists(extras, max_size=2)):
            pairs.append((key, draw(SCALARS)))
        body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs)
        line = ("{" + body + "}").encode()
        mutation = draw(st.sampled_from(["none"] * 6 + ["cut", "bom", "blank", "garbage"]))
        if mutation == "cut":
            line = line[: draw(st.integers(0, len(line)))]
        elif mutation == "bom":
            line = b"\xef\xbb\xbf" + line
        elif mutation == "blank":
            line = b"   "
        elif mutation == "garbage":
            line = draw(st.binary(max_size=20))
        lines.append(line)
    return b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))


@given(text=jsonl_text(), skip=st.booleans(), score=st.sampled_from(["softmax", "sigmoid"]))
@example(  # found by `make fuzz`: layers selecting different numbers of experts per token
    text=b'{"step": 0, "layer": 0, "topk_ids": [0], "num_experts": 2}\n'
    b'{"step": 0, "layer": 1, "topk_ids": [0, 1], "num_experts": 2, "token": 0}\n',
    skip=False,
    score="softmax",
)
@_fuzz(80)
def test_fuzz_jsonl(text: bytes, skip: bool, score: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "step_5.jsonl"
        path.write_bytes(text)
        args = ["analyze", str(path), "--no-cache", "-f", "json", "--score", score]
        assert_clean([*args, "--skip-bad-rows"] if skip else args)


# --- Parquet: schemas and values -----------------------------------------------------------

INT_TYPES = [pa.int8(), pa.int32(), pa.int64(), pa.uint32(), pa.uint64()]


def _int_array(draw: st.DrawFn, n: int) -> pa.Array:
    kind = draw(st.sampled_from([*INT_TYPES, pa.float64(), pa.string()]))
    values = draw(st.lists(INTS, min_size=n, max_size=n))
    if pa.types.is_string(kind):
        return pa.array([str(v) for v in values])
    if pa.types.is_floating(kind):
        return pa.array([float(v) for v in values], kind)
    bits = kind.bit_width
    low, high = (
        (0, 2**bits - 1)
        if pa.types.is_unsigned_integer(kind)
        else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    )
    return pa.array([min(max(v, low), high) for v in values], kind)


@st.composite
def parquet_table(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(1, 6))
    e = draw(st.integers(1, 4))
    columns: dict[str, pa.Array] = {"layer": _int_array(draw, n)}
    if draw(st.booleans()):
        columns["step"] = _int_array(draw, n)
    payload = draw(st.sampled_from(["probs", "logits", "tokens_per_expert", "topk_ids", "wide"]))
    if payload in ("probs", "logits"):
        rows = [draw(st.lists(FLOATS, min_size=e, max_size=e)) for _ in range(n)]
        if payload == "probs" and draw(st.booleans()):
            rows = [[1.0 / e] * e for _ in range(n)]
        dtype = draw(st.sampled_from([pa.float32(), pa.float64()]))
        fixed = draw(st.booleans())
        columns[payload] = pa.array(rows, pa.list_(dtype, e) if fixed else pa.list_(dtype))
    elif payload == "tokens_per_expert":
        rows = [draw(st.lists(st.integers(0, 2**64 - 1), min_size=e, max_size=e)) for _ in range(n)]
        columns[payload] = pa.array(rows, pa.list_(pa.uint64()))
    elif payload == "topk_ids":
        columns[payload] = pa.array(
            [
                [min(v, 2**63 - 1) for v in draw(st.lists(INTS, min_size=1, max_size=2))]
                for _ in range(n)
            ],
            pa.list_(pa.int64()),
        )
        experts = [min(draw(st.one_of(st.just(e), INTS)), 2**63 - 1) for _ in range(n)]
        columns["num_experts"] = pa.array(experts, pa.int64())
    else:
        for i in sorted(draw(st.sets(st.integers(0, e), min_size=1))):
            columns[f"logit_{i}"] = pa.array([draw(FLOATS) for _ in range(n)], pa.float64())
    if draw(st.booleans()):
        columns["mask"] = pa.array([draw(st.booleans()) for _ in range(n)])
    if draw(st.booleans()):
        columns["token"] = _int_array(draw, n)
    return pa.table(columns)


@given(table=parquet_table(), skip=st.booleans())
@_fuzz(60)
def test_fuzz_parquet(table: pa.Table, skip: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "step_7.parquet"
        pq.write_table(table, path)
        args = ["analyze", str(path), "--no-cache", "-f", "json", "--top-k", "1"]
        assert_clean([*args, "--skip-bad-rows"] if skip else args)


# --- configuration files -------------------------------------------------------------------

THRESHOLDS = ["collapse_entropy", "rigidity_warn", "sharp_drop_window", "instability_window"]
TOML_VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e308", "-1", "0", "0.5", "2", "true", '"x"', "[]"]),
    HUGE_INTS.map(str),
    st.integers(-5, 20).map(str),
)


@st.composite
def config_text(draw: st.DrawFn) -> bytes:
    lines = []
    if draw(st.booleans()):
        lines.append(f"top_k = {draw(TOML_VALUES)}")
    if draw(st.booleans()):
        lines.append(f"dead_fraction = {draw(TOML_VALUES)}")
    lines.append("[thresholds]")
    for key in draw(st.lists(st.sampled_from(THRESHOLDS), max_size=3, unique=True)):
        lines.append(f"{key} = {draw(TOML_VALUES)}")
    if draw(st.booleans()):
        lo, hi = draw(HUGE_INTS | SMALL_INTS), draw(HUGE_INTS | SMALL_INTS)
        lines.append(f'[check.layers."{lo}-{hi}"]')
        lines.append(f"min_token_entropy_norm = {draw(TOML_VALUES)}")
    text = "\n".join(lines).encode() + b"\n"
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([b"\xe9", b"\xff\xfe", b"\x00"])) + text[at:]
    return text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tiny") / "run"
    run.mkdir()
    lines = [
        {"step": s, "layer": layer, "probs": [0.7, 0.2, 0.1]} for s in (1, 2) for layer in (0, 1)
    ]
    (run / "log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return run


@given(text=config_text())
@_fuzz(60)
def test_fuzz_config(tiny_run: Path, text: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "routelog.toml"
        config.write_bytes(text)
        assert_clean(
            ["analyze", str(tiny_run), "--no-cache", "-f", "json", "--config", str(config)]
        )


# --- command-line option values ------------------------------------------------------------

OPTION_VALUES = st.one_of(
    HUGE_INTS.map(str),
    st.integers(-3, 5).map(str),
    st.sampled_from(
        ["nan", "inf", "-inf", "1e12", "0-2000000000", "1:0", ":", "9" * 30, "3-1", ""]
    ),
    st.text(alphabet="0123456789-:,. ex", max_size=8),
)
OPTIONS = ["--top-k", "--layers", "--steps", "--temperature", "--num-experts", "--width", "--jobs"]


@given(pairs=st.lists(st.tuples(st.sampled_from(OPTIONS), OPTION_VALUES), min_size=1, max_size=3))
@_fuzz(60)
def test_fuzz_cli_options(tiny_run: Path, pairs: list[tuple[str, str]]) -> None:
    args = ["analyze", str(tiny_run), "--no-cache", "-f", "json"]
    for option, value in pairs:
        args += [option, value]
    assert_clean(args, usage_errors=True)
