"""JSONL: per-token, batched and Megatron count lines; gz; blocks; bad lines named file:LINE."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import routelog
from routelog.cli import app
from routelog.errors import InputError
from routelog.ingest import FileInfo, jsonl, scan
from routelog.ingest.jsonl import line_problem, repeated_key_lines
from routelog.options import Options
from tests.conftest import WriteRun, dirichlet

runner = CliRunner()
E, K, T = 5, 2, 30
COUNT_METRICS = ["assign_entropy", "max_load_share", "max_vio", "load_cv", "dead_experts"]


@pytest.fixture
def data() -> dict[int, dict[int, np.ndarray]]:
    rng = np.random.default_rng(11)
    return {
        step: {layer: dirichlet(rng, T, E, alpha=0.4).astype(np.float32) for layer in range(2)}
        for step in (0, 100, 200)
    }


def write_lines(path: Path, lines: list[dict[str, object]] | list[str]) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def per_token(
    data: dict[int, dict[int, np.ndarray]], key: str = "probs"
) -> list[dict[str, object]]:
    return [
        {"step": s, "layer": layer, "token": t, key: row.tolist()}
        for s, layers in data.items()
        for layer, m in layers.items()
        for t, row in enumerate(np.log(m) if key == "logits" else m)
    ]


def metrics(path: Path, **options: object) -> pl.DataFrame:
    return routelog.analyze([f"run={path}"], **options).metrics.sort("step", "layer")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["run.jsonl", "run.ndjson", "run.jsonl.gz", "run.ndjson.gz"])
def test_per_token_lines_match_parquet(
    data: dict[int, dict[int, np.ndarray]], write_parquet_run: WriteRun, tmp_path: Path, name: str
) -> None:
    reference = metrics(write_parquet_run(data), top_k=K)
    path = write_lines(tmp_path / name, per_token(data))
    assert_frame_equal(metrics(path, top_k=K), reference)


def test_batched_logit_lines_match_parquet(
    data: dict[int, dict[int, np.ndarray]], write_parquet_run: WriteRun, tmp_path: Path
) -> None:
    logits = {s: {layer: np.log(m) for layer, m in layers.items()} for s, layers in data.items()}
    reference = metrics(write_parquet_run(logits, payload="logits"), top_k=K)
    lines = [
        {"step": s, "layer": layer, "logits": m[:half].tolist()}
        for s, layers in logits.items()
        for layer, full in layers.items()
        for m, half in ((full, T // 3), (full[T // 3 :], T))
    ]
    # without token lists, tokens are positions within a line: two lines per layer collide,
    # which only matters for token-level metrics (null then); the statistics are the same
    batched = metrics(write_lines(tmp_path / "b.jsonl", lines), top_k=K)
    assert batched["saturation"].null_count() == batched.height
    token_level = ["flip_rate", "saturation"]
    assert_frame_equal(batched.drop(token_level), reference.drop(token_level))


def test_batched_lines_explode_to_per_token_rows(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "b.jsonl",
        [{"step": 3, "layer": 1, "probs": [[1, 0], [0.5, 0.5], [0, 1]], "mask": [1, 0, 1]}],
    )
    info = FileInfo(str(path), "jsonl")
    (batch,) = scan(path, Options(), info)
    assert batch.frame["token"].to_list() == [0, 2]
    assert batch.frame["probs"].to_list() == [[1.0, 0.0], [0.0, 1.0]]
    assert (info.layout, info.rows, info.masked_rows) == ("batched lines", 3, 1)


def counts(data: dict[int, dict[int, np.ndarray]]) -> dict[tuple[int, int], np.ndarray]:
    return {
        (s, layer): np.bincount(np.argsort(-m, axis=1, kind="stable")[:, :K].ravel(), minlength=E)
        for s, layers in data.items()
        for layer, m in layers.items()
    }


def test_megatron_tpe_lines_give_the_count_metrics(
    data: dict[int, dict[int, np.ndarray]], write_parquet_run: WriteRun, tmp_path: Path
) -> None:
    reference = metrics(write_parquet_run(data), top_k=K)
    rng = np.random.default_rng(0)
    lines = []
    for (step, layer), total in counts(data).items():
        first = rng.integers(0, total + 1)  # two micro-batches that add up to the total
        lines.append(
            {"iter": step, "layer": layer, "tpe": [first.tolist(), (total - first).tolist()]}
        )
    got = metrics(write_lines(tmp_path / "tpe.jsonl", lines))
    assert_frame_equal(
        got.select("step", "layer", *COUNT_METRICS),
        reference.select("step", "layer", *COUNT_METRICS),
    )
    assert got["token_entropy"].null_count() == got.height
    flat = [
        {"iter": s, "layer": layer, "tokens_per_expert": c.tolist()}
        for (s, layer), c in counts(data).items()
    ]
    got = metrics(write_lines(tmp_path / "flat.jsonl", flat))
    assert_frame_equal(
        got.select("step", "layer", *COUNT_METRICS),
        reference.select("step", "layer", *COUNT_METRICS),
    )


def test_count_only_report_says_why(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "tpe.jsonl", [{"iter": 5, "layer": 0, "tpe": [[3, 1, 0, 0]]}])
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 0, result.output
    assert "counts only" in result.output
    assert "need router probabilities and are not computed" in " ".join(result.output.split())


def test_blocks_across_boundaries_give_the_same_frames(
    data: dict[int, dict[int, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_lines(tmp_path / "run.jsonl.gz", per_token(data, "logits"))
    whole = metrics(path, top_k=K)
    monkeypatch.setattr(
        jsonl, "BLOCK_BYTES", 97
    )  # shorter than one line: blocks grow to whole lines
    assert_frame_equal(metrics(path, top_k=K), whole)
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 4000)
    assert_frame_equal(metrics(path, top_k=K), whole)


@pytest.mark.parametrize("block", [50, 1 << 20])
def test_bad_line_number_counts_blank_lines_and_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", block)
    good = '{"step": 1, "layer": 0, "probs": [0.5, 0.5]}'
    bad = '{"step": 1, "layer": 0, "probs": [0.5, 0.7]}'  # parses, but does not sum to 1
    path = write_lines(tmp_path / "f.jsonl", [good, "", good, "   ", good, bad, good])
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}:6: probabilities do not sum to 1" in result.output


BAD_LINES = [
    ('{"step": 1, "layer": 0, "probs": [0.5, 0.5', "not valid JSON"),
    ('{"step": 1, "layer": "x", "probs": [0.5, 0.5]}', "'layer' must be an integer"),
    ('{"step": 1, "layer": 0, "probs": "0.5"}', "'probs' must be a list of numbers"),
    ('{"step": 1, "layer": 0, "probs": [0.5, NaN]}', "not valid JSON (NaN is not a JSON number)"),
    ('{"step": 1, "layer": 0, "probs": [[0.5, 0.5]]}', "'probs' is batched, unlike earlier lines"),
    ("[1, 2]", "not a JSON object"),
    ('{"step": 1, "layer": 0.5, "probs": [0.5, 0.5]}', "'layer' must be an integer"),
    (
        '{"step": 1, "layer": 0, "layer": "x", "probs": [0.5, 0.5]}',
        "not valid JSON (key 'layer' appears twice)",
    ),
    (
        '{"step": 1, "layer": 0, "probs": [0.5, 0.5], "layer": 1}',
        "not valid JSON (key 'layer' appears twice)",
    ),
    ('{"step": 9223372036854775808, "layer": 0, "probs": [0.5, 0.5]}', "'step' value outside"),
    ('{"step": 1, "layer": 4294967296, "probs": [0.5, 0.5]}', "'layer' value outside"),
    ('{"step": 1, "layer": 0, "probs": [0.5, 0.5], "token": 1180591620717411303424}', "'token'"),
    ('{"step": 1, "layer": 0, "probs": [0.5, 0.5], "mask": "no"}', "'mask' must be a boolean"),
    ('{"step": 1, "layer": 0, "probs": [0.5, -Infinity]}', "NaN or infinite probability"),
    ('{"step": 1, "layer": 0, "probs": [0.5, 1e999]}', "not valid JSON (1e999 overflows a float)"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_broken_line_in_the_middle(tmp_path: Path, line: str, message: str) -> None:
    good = '{"step": 1, "layer": 0, "probs": [0.5, 0.5]}'
    path = write_lines(tmp_path / "f.jsonl", [good, good, line, good])
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert f"routelog: error: {path}:3: {message}" in result.output
    result = runner.invoke(app, ["analyze", str(path), "--skip-bad-rows", "-f", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["runs"][0]["skipped_rows"] == 1
    assert document["metrics"][0]["n_tokens"] == 3


def test_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl.gz"
    text = '{"step": 1, "layer": 0, "probs": [0.5, 0.5]}\n{"step": 1, "layer": 0, "pro'
    path.write_bytes(gzip.compress(text.encode()))
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}:2: not valid JSON" in result.output


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"step": 1, "layer": 0, "probs": [1.0]}\n' * 50)[:40])
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}: not a valid gzip file, or truncated" in result.output


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("step_1.jsonl", "", "file is empty"),
        ("step_1.jsonl", "\n\n  \n", "no JSON lines"),
        (
            "f.jsonl",
            '{"layer": 0, "probs": [1.0]}\n',
            "no 'step' column, and no step in the file name",
        ),
        ("step_1.json", '{"layer": 0, "probs": [1.0]}\n', "unknown file type"),
        (
            "step_1.jsonl",
            '{"layer": 0, "probs": [1.0, 0.0]}\n{"layer": 0, "probs": [0.2, 0.3, 0.5]}\n',
            "step_1.jsonl:2: layer 0 has 3 experts in 'probs', but 2 at ",
        ),
        ("step_1.jsonl", '{"layer": 0, "topk_ids": [0, 1]}\n', "pass --num-experts E"),
        (
            "step_1.jsonl",
            '{"layer": 0, "topk_ids": [0], "num_experts": 2}\n'
            '{"layer": 0, "topk_ids": [0, 1], "num_experts": 2}\n',
            "step_1.jsonl:2: layer 0 selects 2 experts per token in 'topk_ids' at step 1, "
            "but 1 at ",
        ),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert f"routelog: error: {path}" in result.output
    assert message in result.output


@pytest.mark.parametrize(("ids", "line"), [([[0, 1], [2, 8]], 2), ([[-1, 1], [2, 3]], 1)])
def test_ids_outside_range_name_the_line(tmp_path: Path, ids: list[list[int]], line: int) -> None:
    lines = [{"step": 1, "layer": 0, "topk_ids": i, "num_experts": 8} for i in ids]
    path = write_lines(tmp_path / "ids.jsonl", lines)
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}:{line}: expert id outside [0, E)" in result.output


def test_sigmoid_score(tmp_path: Path) -> None:
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    path = write_lines(tmp_path / "step_1.jsonl", [{"layer": 0, "logits": logits.tolist()}])
    got = metrics(path, score="sigmoid")
    scores = 1 / (1 + np.exp(-logits))
    probs = scores / scores.sum(axis=1, keepdims=True)
    expected = -(probs * np.log(probs)).sum(axis=1).mean()
    assert got["token_entropy"][0] == pytest.approx(expected, rel=1e-5)
    result = runner.invoke(app, ["analyze", str(path), "--score", "sigmoid", "-f", "json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["analyze", str(path), "--score", "tanh"])
    assert result.exit_code == 2, result.output
    # the choice is click's: its message names the option and the choices
    assert "'tanh' is not one of" in result.output
    assert "sigmoid" in result.output


def reference_frame(lines: list[dict[str, object]]) -> pl.DataFrame:
    """What the lines mean, built line by line with json.loads, independently of Polars."""
    rows = []
    for text in lines:
        line = json.loads(json.dumps(text))
        payload = line["probs"]
        tokens = payload if isinstance(payload[0], list) else [payload]
        for position, probs in enumerate(tokens):
            token = line.get("token", position)
            rows.append(
                {"step": line["step"], "layer": line["layer"], "token": token, "probs": probs}
            )
    frame = pl.DataFrame(
        rows,
        schema={
            "step": pl.Int64,
            "layer": pl.Int32,
            "token": pl.Int64,
            "probs": pl.List(pl.Float64),
        },
    )
    return frame.with_columns(pl.col("probs").cast(pl.List(pl.Float32)))


probability_row = st.integers(1, 6).flatmap(
    lambda e: st.lists(st.integers(1, 1000), min_size=e, max_size=e).map(
        lambda w: [float(np.float32(x / sum(w))) for x in w]
    )
)


@st.composite
def jsonl_files(draw: st.DrawFn) -> list[dict[str, object]]:
    e = draw(st.integers(1, 5))
    row = st.lists(st.integers(1, 99), min_size=e, max_size=e).map(
        lambda w: [float(np.float32(x / sum(w))) for x in w]
    )
    batched = draw(st.booleans())
    lines = []
    for index in range(draw(st.integers(1, 12))):
        line: dict[str, object] = {
            "step": draw(st.integers(0, 3)),
            "layer": draw(st.integers(0, 2)),
        }
        if batched:
            line["probs"] = draw(st.lists(row, min_size=1, max_size=4))
        else:
            line["probs"] = draw(row)
            line["token"] = index
        lines.append(line)
    return lines


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=jsonl_files(), block=st.integers(16, 400))
def test_parser_matches_json_loads(
    lines: list[dict[str, object]], block: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", block)
    path = write_lines(tmp_path / "p.jsonl", lines)
    info = FileInfo(str(path), "jsonl")
    frames = [
        b.frame.select("step", "layer", "token", pl.col("probs").arr.to_list())
        for b in scan(path, Options(), info)
    ]
    got = pl.concat(frames).sort("step", "layer", "token", maintain_order=True)
    expected = reference_frame(lines).sort("step", "layer", "token", maintain_order=True)
    assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-6)
    assert info.rows == expected.height


def test_megatron_sample_is_count_only() -> None:
    from tests.conftest import SAMPLES

    result = runner.invoke(app, ["analyze", str(SAMPLES / "megatron-tpe"), "-f", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["runs"][0]["payloads"] == ["counts"]
    latest = [m for m in document["metrics"] if m["step"] == 1100]
    assert [m["token_entropy"] for m in latest] == [None] * 4
    assert max(latest, key=lambda m: m["max_load_share"])["layer"] == 3


def test_byte_order_mark_is_stripped(tmp_path: Path) -> None:
    good = b'{"step": 1, "layer": 0, "probs": [0.25, 0.75]}\n'
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(good * 3)
    marked = tmp_path / "marked.jsonl.gz"
    marked.write_bytes(gzip.compress(jsonl.BOM + good * 3))
    assert_frame_equal(metrics(plain), metrics(marked))


def test_over_long_line_is_a_bad_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 300)
    good = '{"step": 1, "layer": 0, "probs": [0.5, 0.5]}'
    long = '{"step": 1, "layer": 0, "probs": [' + "0.0, " * 1000 + "1.0]}"
    for lines, bad in (([good, long, good, good], 2), ([good, good, " " * 5000], 3)):
        path = write_lines(tmp_path / "f.jsonl", lines)
        result = runner.invoke(app, ["analyze", str(path), "--no-cache"])
        assert result.exit_code == 2, result.output
        assert f"{path}:{bad}: line longer than" in result.output
        result = runner.invoke(app, ["analyze", str(path), "--skip-bad-rows", "-f", "json"])
        assert result.exit_code == 0, result.output
        document = json.loads(result.output)
        assert document["runs"][0]["skipped_rows"] == 1
        assert document["metrics"][0]["n_tokens"] == 3 if bad == 2 else 2


def test_minus_infinity_logits_are_masked_experts(tmp_path: Path) -> None:
    logits = np.array([[1.0, -np.inf, 0.5, -np.inf], [0.0, 2.0, -np.inf, 1.0]])
    lines = [{"step": 1, "layer": 0, "logits": row.tolist()} for row in logits]
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")  # writes -Infinity
    got = metrics(path)
    finite = np.where(np.isinf(logits), 0.0, np.exp(logits))
    probs = finite / finite.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = -np.nansum(probs * np.log(probs), axis=1).mean()
    assert got["token_entropy"][0] == pytest.approx(expected, rel=1e-6)
    lse = np.log(finite.sum(axis=1))
    assert got["z_loss"][0] == pytest.approx((lse**2).mean(), rel=1e-6)
    path.write_text(
        path.read_text()
        + '{"step": 1, "layer": 0, "logits": ['
        + ", ".join(["-Infinity"] * 4)
        + "]}\n"
    )
    result = runner.invoke(app, ["analyze", str(path), "--no-cache"])
    assert result.exit_code == 2, result.output
    assert f"{path}:3: every logit is -inf" in result.output


def test_errors_name_one_line_never_a_range(tmp_path: Path) -> None:
    # valid JSON that Python's parser reads and Polars' does not: the line is found by bisection
    good = '{"step": 1, "layer": 0, "probs": [0.5, 0.5]}'
    lines = [good, good, '{"step": 1, "layer": 0, "probs": [0.5, ' + "9" * 45 + "]}", good]
    path = write_lines(tmp_path / "f.jsonl", lines)
    result = runner.invoke(app, ["analyze", str(path), "--no-cache"])
    assert result.exit_code == 2, result.output
    assert f"{path}:3: " in result.output
    assert f"{path}:1-" not in result.output


REPEATED_KEYS = [
    ('{"step": 1, "layer": 0, "layer" : 1, "probs": [0.5, 0.5]}', "key 'layer' appears twice"),
    ('{"step": 1, "layer": 0,\t"layer"\t:1, "probs": [0.5, 0.5]}', "key 'layer' appears twice"),
    ('{"step": 1, "layer": 0, "l\\u0061yer": 1, "probs": [0.5, 0.5]}', "key 'layer' appears twice"),
    (
        '{"step": 1, "layer": 0, "probs": [0.5, 0.5], "m": {"a": 1, "a": 2}}',
        "key 'a' appears twice",
    ),
    ('{"step": 1, "layer": 0, "probs": [0.5, 0.5], "x": 1, "x": 2}', "key 'x' appears twice"),
]
"""Repeated keys the old byte match (``"key":``, known columns, top level only) let through."""

NOT_REPEATED = [
    '{"step": 1, "layer": 0, "probs": [0.5, 0.5], "m": {"layer": 7}}',  # another object
    '{"step": 1, "layer": 0, "probs": [0.5, 0.5], "dataset": "layer"}',  # a value, not a key
    '{"step": 1, "layer": 0, "probs": [0.5, 0.5], "dataset": "a\\"layer\\": 1"}',
    '{"step": 1, "lay": 0, "layer": 0, "probs": [0.5, 0.5]}',
    '{"step": 1, "layer": 0, "probs": [1, 0], "abcdefgh_1_abcdefgh": 1, "abcdefgh_2_abcdefgh": 2}',
]


@pytest.mark.parametrize(("line", "message"), REPEATED_KEYS)
def test_repeated_key_is_refused_however_written(tmp_path: Path, line: str, message: str) -> None:
    good = '{"step": 1, "layer": 0, "probs": [0.5, 0.5]}'
    path = write_lines(tmp_path / "f.jsonl", [good, good, line, good])
    assert line_problem(line.encode(), {}) == f"not valid JSON ({message})"  # the validator
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 2, result.output
    assert f"f.jsonl:3: not valid JSON ({message})" in " ".join(result.output.split())
    result = runner.invoke(app, ["analyze", str(path), "--skip-bad-rows", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert '"skipped_rows": 1' in result.output


@pytest.mark.parametrize("line", NOT_REPEATED)
def test_keys_alike_but_not_repeated_are_read(tmp_path: Path, line: str) -> None:
    good = '{"step": 1, "layer": 0, "probs": [0.5, 0.5]}'
    path = write_lines(tmp_path / "f.jsonl", [good, line, good])
    result = runner.invoke(app, ["analyze", str(path)])
    assert result.exit_code == 0, result.output


def _has_repeat(line: bytes) -> bool:
    """The rule, independently: some object of the line holds a key twice."""
    found = []

    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        found.append(len(set(keys)) < len(keys))
        return dict(pairs)

    json.loads(line, object_pairs_hook=hook)
    return any(found)


_KEY = st.sampled_from(["step", "layer", "probs", "x", "é", ""])
_SPACE = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def _json_line(draw: st.DrawFn, depth: int = 0) -> str:
    """An object of a few keys, some repeated, written with odd spacing and escapes, with
    string values that look like keys and nested objects."""
    items = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(_KEY)
        ascii_only = draw(st.booleans())
        written = json.dumps(key, ensure_ascii=ascii_only)
        if key and draw(st.integers(0, 3)) == 0:  # escape the key's first character
            written = f'"\\u{ord(key[0]):04x}' + json.dumps(key[1:], ensure_ascii=ascii_only)[1:]
        value = draw(
            st.one_of(
                st.integers(0, 9).map(str),
                _KEY.map(lambda k: json.dumps(k + '":')),
                *([_json_line(depth + 1)] if depth < 2 else []),
            )
        )
        items.append(f"{written}{draw(_SPACE)}:{draw(_SPACE)}{value}")
    return "{" + draw(_SPACE) + ",".join(items) + "}"


@given(lines=st.lists(_json_line(), min_size=1, max_size=6))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_repeated_key_lines_agree_with_json(lines: list[str]) -> None:
    block = "\n".join(lines).encode()
    expected = [i for i, line in enumerate(lines) if _has_repeat(line.encode())]
    assert repeated_key_lines(block, ["step", "layer"]) == expected
    for i, line in enumerate(lines):  # the line validator says the same, line by line
        problem = line_problem(line.encode(), {}) or ""
        assert ("appears twice" in problem) == (i in expected)


@pytest.mark.parametrize(
    ("lines", "payload"),
    [
        (
            ['{"iter": 0, "layer": 0, "tpe": []}', '{"iter": 0, "layer": 1, "tpe": [[1, 2, 3]]}'],
            "tpe",
        ),
        (
            [
                '{"step": 0, "layer": 0, "probs": []}',
                '{"step": 0, "layer": 1, "probs": [[0.5, 0.5]]}',
            ],
            "probs",
        ),
    ],
)
def test_an_empty_batched_line_is_a_bad_row(tmp_path: Path, lines: list[str], payload: str) -> None:
    # exploded, a batched line of nothing would vanish, and its layer with it
    path = tmp_path / "step_0.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=f"step_0.jsonl:1: empty '{payload}' row"):
        routelog.analyze([path])
    run = routelog.analyze([path], skip_bad_rows=True).runs[0]
    assert run.summary()["skipped_rows"] == 1


@pytest.mark.parametrize("name", ["step_0.jsonl", "step_0.jsonl.gz"])
def test_a_truncated_last_line_alone_is_skipped(tmp_path: Path, name: str) -> None:
    # the last line, cut short without its newline, is a block of its own at the end
    lines = [
        json.dumps({"step": 0, "layer": 0, "token": i, "probs": [0.25] * 4}) for i in range(10)
    ]
    text = ("\n".join(lines[:9]) + "\n" + lines[9][:20]).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    with pytest.raises(InputError, match=f"{name}:10: not valid JSON"):
        routelog.analyze([path], top_k=1)
    summary = routelog.analyze([path], top_k=1, skip_bad_rows=True).runs[0].summary()
    assert (summary["rows"], summary["skipped_rows"]) == (9, 1)


@pytest.mark.parametrize("value", [5, ["a"], {"x": 1}, True])
def test_a_dataset_that_is_not_a_string_among_strings(tmp_path: Path, value: object) -> None:
    # Polars reads a 5 among strings as "5": a dataset nobody named
    rows = [
        {"step": 0, "layer": 0, "token": i, "logits": [1, 2, 3], "dataset": "ab"[i % 2]}
        for i in range(20)
    ]
    rows[12]["dataset"] = value
    rows[3]["dataset"] = None  # null is no dataset, not a bad row
    path = tmp_path / "ds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"ds.jsonl:13: 'dataset' must be a string"):
        routelog.analyze([path], top_k=1)
    run = routelog.analyze([path], top_k=1, skip_bad_rows=True).runs[0]
    assert run.summary()["skipped_rows"] == 1
    assert set(run.stats["dataset"].drop_nulls().unique().to_list()) == {"a", "b"}
