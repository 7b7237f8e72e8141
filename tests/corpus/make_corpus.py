"""Write the hostile-input regression corpus (deterministic): python tests/corpus/make_corpus.py

Each reader directory (``pt``, ``jsonl``, ``parquet``, ``config``, ``cli``) gets small files and
an ``expected.toml`` naming, per file, the exit code (0 or 2), for exit 2 a substring of the
one-line error, and optional extra arguments of ``routelog analyze FILE``. The runner,
``tests/test_corpus.py``, runs each case in a subprocess from the reader directory, under a
2 GiB address-space cap. The ``pt`` cases are built in ``tests/corpus/pt_cases.py``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run as a script: make `tests` importable

from tests.corpus import pt_cases  # noqa: E402

GOOD = {"step": 1, "layer": 0, "probs": [0.25, 0.75]}


def _line(value: dict[str, Any]) -> str:
    return json.dumps(value)


def _jsonl(directory: Path, name: str, lines: list[str], *, gz: bool = False) -> None:
    data = ("\n".join(lines) + "\n").encode()
    path = directory / name
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def _gzip_stream(path: Path, parts: list[tuple[bytes, int]]) -> None:
    """A gzip file holding each (bytes, repeat) part, written without building it in memory."""
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as stream:
        for chunk, repeat in parts:
            for _ in range(repeat):
                stream.write(chunk)


def jsonl(directory: Path) -> dict[str, dict[str, Any]]:
    good = _line(GOOD)
    cases: dict[str, dict[str, Any]] = {}

    def case(name: str, lines: list[str], exit: int, stderr: str = "", **extra: Any) -> None:
        _jsonl(directory, name, lines, gz=name.endswith(".gz"))
        cases[name] = {"exit": exit, **({"stderr": stderr} if stderr else {}), **extra}

    case("bom.jsonl", ["\ufeff" + good, good], 0)
    case(
        "repeated_key.jsonl",
        [good, '{"step": 1, "layer": 0, "layer": "x", "probs": [1, 0]}'],
        2,
        "repeated_key.jsonl:2: not valid JSON (key 'layer' appears twice)",
    )
    for name, line, key in (
        (
            "repeated_key_space.jsonl",
            '{"step": 1, "layer": 0, "layer" : 1, "probs": [1, 0]}',
            "layer",
        ),
        (
            "repeated_key_escaped.jsonl",
            '{"step": 1, "layer": 0, "l\\u0061yer": 1, "probs": [1, 0]}',
            "layer",
        ),
        (
            "repeated_key_nested.jsonl",
            '{"step": 1, "layer": 0, "probs": [1, 0], "m": {"a": 1, "a": 2}}',
            "a",
        ),
    ):
        case(name, [good, line], 2, f"{name}:2: not valid JSON (key {key!r} appears twice)")
    case(
        "step_2_63.jsonl",
        [good, '{"step": 9223372036854775808, "layer": 0, "probs": [1, 0]}'],
        2,
        "step_2_63.jsonl:2: 'step' value outside the int64 range",
    )
    case(
        "token_2_70.jsonl",
        ['{"step": 1, "layer": 0, "probs": [1, 0], "token": 1180591620717411303424}'],
        2,
        "token_2_70.jsonl:1: 'token' value outside the int64 range",
    )
    case(
        "layer_beyond_int32.jsonl",
        [good, '{"step": 1, "layer": 2147483648, "probs": [1, 0]}'],
        2,
        "layer_beyond_int32.jsonl:2: 'layer' value outside the int32 range",
    )
    case(
        "minus_inf_logits.jsonl",
        ['{"step": 1, "layer": 0, "logits": [2.0, -Infinity, 0.5, -Infinity]}'] * 3,
        0,
    )
    case(
        "all_minus_inf.jsonl",
        [
            '{"step": 1, "layer": 0, "logits": [1.0, 0.0]}',
            '{"step": 1, "layer": 0, "logits": [-Infinity, -Infinity]}',
        ],
        2,
        "all_minus_inf.jsonl:2: every logit is -inf",
    )
    case("logit_1e39.jsonl", ['{"step": 1, "layer": 0, "logits": [1e39, 0.0, -1e39]}'], 0)
    case(
        "sigmoid_minus_800.jsonl",
        ['{"step": 1, "layer": 0, "logits": [-800, -801, -803]}'],
        0,
        args=["--score", "sigmoid"],
    )
    case(
        "mask_string.jsonl",
        [good, '{"step": 1, "layer": 0, "probs": [1, 0], "mask": "no"}'],
        2,
        "mask_string.jsonl:2: 'mask' must be a boolean",
    )
    case(
        "num_experts_2_40.jsonl",
        ['{"step": 1, "layer": 0, "topk_ids": [1099511627775], "num_experts": 1099511627776}'],
        2,
        "'num_experts' value outside [1, 65536]",
    )
    case(
        "count_2_64.jsonl",
        ['{"step": 1, "layer": 0, "tpe": [18446744073709551615, 1]}'],
        2,
        "count_2_64.jsonl:1: 'tpe' must be a list of integers",
    )
    case(
        "count_sum_overflow.jsonl",
        ['{"step": 1, "layer": 0, "tpe": [[9007199254740992, 1], [9007199254740992, 1]]}'] * 300,
        2,
        "beyond the 2^62 routelog can sum exactly",
    )
    case("one_expert.jsonl", ['{"step": 1, "layer": 0, "probs": [1.0]}'] * 4, 0)
    case(
        "clash_found_by_bisection.jsonl",
        [good, good, '{"step": 1, "layer": 0, "probs": [0.5, ' + "9" * 45 + "]}", good],
        2,
        "clash_found_by_bisection.jsonl:3: cannot read this line",
    )
    case(
        "nan_probability.jsonl",
        [good, '{"step": 1, "layer": 0, "probs": [NaN, 1]}'],
        2,
        "nan_probability.jsonl:2: not valid JSON (NaN is not a JSON number)",
    )
    case(
        "huge_float.jsonl",
        ['{"step": 1, "layer": 0, "probs": [1e999, 0]}'],
        2,
        "huge_float.jsonl:1: not valid JSON (1e999 overflows a float)",
    )
    case(
        "too_many_experts.jsonl.gz",
        ['{"step": 1, "layer": 0, "probs": [1.0' + ", 0" * 70000 + "]}"],
        2,
        "70001 experts in 'probs', beyond the 65536 routelog handles",
    )
    case(
        "deep_nesting.jsonl",
        ['{"step": 1, "layer": 0, "probs": ' + "[" * 5000 + "]" * 5000 + "}"],
        2,
        "deep_nesting.jsonl:1:",
    )
    # One token per (step, layer) group claiming E = 65536: ~600 KB of ids once made routelog
    # allocate 10,000 x 65,536 int64 counters (5 GiB); refused by the dense-counter bound
    case(
        "topk_dense_claim.jsonl",
        [
            _line({"step": s, "layer": 0, "topk_ids": [65535], "num_experts": 65536})
            for s in range(10_000)
        ],
        2,
        "topk_dense_claim.jsonl: E=65536 experts per (step, layer) group would take",
    )
    count_rows = [
        _line({"step": s, "layer": 0, "expert": 65535, "count": 1}) for s in range(10_000)
    ]
    case(
        "expert_count_dense_claim.jsonl",
        count_rows,
        2,
        "expert_count_dense_claim.jsonl: E=65536 experts per (step, layer) group would take",
    )
    # 96 MiB without a newline, a few hundred KiB compressed: a bad row, read past in bounded memory
    _gzip_stream(
        directory / "no_newline.jsonl.gz", [(good.encode() + b"\n", 1), (b"7" * (1 << 20), 96)]
    )
    cases["no_newline.jsonl.gz"] = {
        "exit": 2,
        "stderr": "no_newline.jsonl.gz:2: line longer than 64 MiB",
    }
    _gzip_stream(
        directory / "no_newline_skipped.jsonl.gz",
        [(good.encode() + b"\n", 1), (b" " * (1 << 20), 96), (b"\n" + good.encode() + b"\n", 1)],
    )
    cases["no_newline_skipped.jsonl.gz"] = {"exit": 0, "args": ["--skip-bad-rows"]}
    return cases


def _parquet(path: Path, table: pa.Table | pl.DataFrame) -> None:
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    pq.write_table(table, path, compression="zstd")


def parquet(directory: Path) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}

    def case(
        name: str, table: pa.Table | pl.DataFrame, exit: int, stderr: str = "", **extra: Any
    ) -> None:
        _parquet(directory / name, table)
        cases[name] = {"exit": exit, **({"stderr": stderr} if stderr else {}), **extra}

    probs = [[0.25, 0.75], [0.5, 0.5]]
    case(
        "uint64_step.parquet",
        pa.table({"step": pa.array([1, 1 << 63], pa.uint64()), "layer": [0, 0], "probs": probs}),
        2,
        "uint64_step.parquet row 1: 'step' value outside the int64 range",
    )
    case(
        "step_99999999999999999999.parquet",
        pl.DataFrame({"layer": [0, 0], "probs": probs}),
        2,
        "does not fit a 64-bit integer",
    )
    case(
        "layer_int64.parquet",
        pa.table({"step": [1, 1], "layer": pa.array([0, 1 << 40], pa.int64()), "probs": probs}),
        2,
        "layer_int64.parquet row 1: 'layer' value outside the int32 range",
    )
    case(
        "wide_p_1000000000.parquet",
        pl.DataFrame({"step": [1], "layer": [0], "p_0": [0.5], "p_1000000000": [0.5]}),
        2,
        "wide column p_1000000000 is beyond the 65536 experts",
    )
    inf = float("inf")
    case(
        "minus_inf_logits.parquet",
        pl.DataFrame(
            {"step": [1, 1], "layer": [0, 0], "logits": [[0.0, -inf, 1.0], [-inf, 2.0, 2.0]]}
        ),
        0,
    )
    case(
        "all_minus_inf.parquet",
        pl.DataFrame({"step": [1, 1], "layer": [0, 0], "logits": [[0.0, 1.0], [-inf, -inf]]}),
        2,
        "all_minus_inf.parquet row 1: every logit is -inf",
    )
    case(
        "plus_inf_logit.parquet",
        pl.DataFrame({"step": [1], "layer": [0], "logits": [[0.0, inf]]}),
        2,
        "plus_inf_logit.parquet row 0: non-finite logit (NaN or +inf)",
    )
    case(
        "logit_1e308.parquet",
        pl.DataFrame({"step": [1, 1, 1], "layer": [0, 0, 0], "logit_0": [0.0, 0.0, 1e308]}),
        2,
        "logit_1e308.parquet row 2: logit beyond ±1e+150 (its z-loss would overflow float64)",
    )
    case(
        "logit_1e39_float64.parquet",
        pl.DataFrame({"step": [1, 1], "layer": [0, 0], "logits": [[1e39, 0.0], [0.0, 1e-39]]}),
        0,
    )
    case(
        "sigmoid_minus_50.parquet",
        pl.DataFrame({"step": [1, 1], "layer": [0, 0], "logits": [[-50.0, -51.0], [-52.0, -50.0]]}),
        0,
        args=["--score", "sigmoid"],
    )
    case(
        "uint64_counts.parquet",
        pa.table(
            {
                "step": [1],
                "layer": [0],
                "tokens_per_expert": pa.array([[1 << 63, 1]], pa.list_(pa.uint64())),
            }
        ),
        2,
        "uint64_counts.parquet row 0: null or negative count (or one above 2^53)",
    )
    case(
        "expert_count_overflow.parquet",
        pl.DataFrame(
            {"step": [1] * 600, "layer": [0] * 600, "expert": [0] * 600, "count": [1 << 53] * 600}
        ),
        2,
        "beyond the 2^62 routelog can sum exactly",
    )
    case(
        "num_experts_2_40.parquet",
        pl.DataFrame({"step": [1], "layer": [0], "topk_ids": [[3]], "num_experts": [1 << 40]}),
        2,
        "num_experts_2_40.parquet row 0: 'num_experts' value outside [1, 65536]",
    )
    case(
        "expert_id_2_40.parquet",
        pl.DataFrame({"step": [1], "layer": [0], "topk_ids": [[1 << 40]], "num_experts": [8]}),
        2,
        "expert_id_2_40.parquet row 0: expert id outside [0, E)",
    )
    case(
        "mask_string.parquet",
        pl.DataFrame({"step": [1], "layer": [0], "probs": [[0.5, 0.5]], "mask": ["no"]}),
        2,
        "column 'mask' must hold booleans",
    )
    case(
        "one_expert.parquet",
        pl.DataFrame({"step": [1, 1], "layer": [0, 0], "probs": [[1.0], [1.0]]}),
        0,
    )
    (directory / "not_parquet.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    cases["not_parquet.parquet"] = {
        "exit": 2,
        "stderr": "not_parquet.parquet: not a valid Parquet file",
    }
    n = 20_000  # one token per group claiming E = 65536: 10 GiB of counters, once allocated
    case(
        "topk_dense_claim.parquet",
        pl.DataFrame(
            {
                "step": range(n),
                "layer": [0] * n,
                "topk_ids": [[65535]] * n,
                "num_experts": [65536] * n,
            }
        ),
        2,
        "topk_dense_claim.parquet: E=65536 experts per (step, layer) group would take",
    )
    good = pl.DataFrame({"step": [1] * 50, "layer": [0] * 50, "probs": [[0.25, 0.75]] * 50})
    good.write_parquet(directory / "whole.tmp")
    content = (directory / "whole.tmp").read_bytes()
    (directory / "whole.tmp").unlink()
    (directory / "truncated.parquet").write_bytes(content[: len(content) // 2])
    cases["truncated.parquet"] = {
        "exit": 2,
        "stderr": "truncated.parquet: not a valid Parquet file",
    }
    return cases


def config(directory: Path) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}

    def case(name: str, text: bytes, exit: int, stderr: str = "") -> None:
        run = directory / name
        run.mkdir()
        (run / "step_1.jsonl").write_text(_line({"layer": 0, "probs": [0.25, 0.75]}) + "\n")
        (run / "routelog.toml").write_bytes(text)
        cases[name] = {
            "exit": exit,
            **({"stderr": stderr} if stderr else {}),
            "args": ["--config", f"{name}/routelog.toml"],
        }

    case(
        "nan_threshold",
        b"[thresholds]\ncollapse_entropy = nan\n",
        2,
        "thresholds.collapse_entropy must be a finite number, got nan",
    )
    case(
        "inf_threshold",
        b"[thresholds]\nskew_max_vio = inf\n",
        2,
        "thresholds.skew_max_vio must be a finite number, got inf",
    )
    case("nan_dead_fraction", b"dead_fraction = nan\n", 2, "dead_fraction must be a finite number")
    case(
        "nan_check_bound",
        b"[check]\nmin_token_entropy_norm = nan\n",
        2,
        "check.min_token_entropy_norm must be a finite number",
    )
    case("latin1", b"# caf\xe9\ntop_k = 2\n", 2, "not UTF-8 text (byte 5 is 0xe9)")
    case("huge_layer_range", b'[check.layers."0-2000000000"]\nmin_token_entropy_norm = 0.01\n', 0)
    case(
        "beyond_int32_layer_range",
        b'[check.layers."0-99999999999"]\nmin_token_entropy_norm = 0.01\n',
        2,
        "cannot read the layer range",
    )
    case(
        "huge_window",
        b"[thresholds]\ninstability_window = 9223372036854775807\n",
        2,
        "thresholds.instability_window must be in [3, 2147483647]",
    )
    case("huge_top_k", b"top_k = 9223372036854775807\n", 2, "top_k must be in [1, 2147483647]")
    return cases


def cli(directory: Path) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}

    def case(name: str, args: list[str], exit: int, stderr: str = "") -> None:
        (directory / name).write_text(_line(GOOD) + "\n" + _line({**GOOD, "layer": 1}) + "\n")
        cases[name] = {"exit": exit, **({"stderr": stderr} if stderr else {}), "args": args}

    case(
        "num_experts_1e12.jsonl",
        ["--num-experts", "1000000000000"],
        2,
        "--num-experts 1000000000000 is beyond",
    )
    case("top_k_2_70.jsonl", ["--top-k", str(1 << 70)], 2, f"--top-k {1 << 70} is beyond")
    case("layers_2e9.jsonl", ["--layers", "1-2000000000"], 0)
    case(
        "layers_beyond_int32.jsonl",
        ["--layers", "0-99999999999"],
        2,
        "is beyond the largest layer number",
    )
    case("layers_digits.jsonl", ["--layers", "9" * 5000], 2, "--layers: cannot read")
    case(
        "steps_2_64.jsonl",
        ["--steps", "18446744073709551616:"],
        2,
        "does not fit a 64-bit step number",
    )
    case("steps_digits.jsonl", ["--steps", "9" * 5000], 2, "--steps: cannot read")
    case(
        "temperature_nan.jsonl",
        ["--temperature", "nan"],
        2,
        "--temperature: must be a finite number of at least",
    )
    case(
        "temperature_inf.jsonl",
        ["--temperature", "inf"],
        2,
        "--temperature: must be a finite number of at least",
    )
    case(
        "output_onto_input.jsonl",
        ["-o", "output_onto_input.jsonl"],
        2,
        "would write into the input",
    )
    case("output_directory.jsonl", ["-o", "."], 2, "--output names a directory")
    case(
        "output_missing_folder.jsonl",
        ["-o", "missing/report.txt"],
        2,
        "--output folder missing does not exist",
    )
    case(
        "output_proc_version.jsonl",
        ["-o", "/proc/version"],
        2,
        "/proc/version: cannot write the report",
    )
    return cases


def _toml(cases: dict[str, dict[str, Any]]) -> str:
    lines = ["# written by tests/corpus/make_corpus.py; the runner is tests/test_corpus.py", ""]
    for name, case in cases.items():
        lines.append(f"[{json.dumps(name)}]")
        lines.append(f"exit = {case['exit']}")
        if "stderr" in case:
            lines.append(f"stderr = {json.dumps(case['stderr'])}")
        if "args" in case:
            lines.append(f"args = {json.dumps(case['args'])}")
        lines.append("")
    return "\n".join(lines)


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_reader(directory: Path, cases: list[pt_cases.Case]) -> None:
    """Write every case's file into ``directory`` and their outcomes into expected.toml."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "# written by tests/corpus/make_corpus.py; the outcome of `routelog analyze FILE`",
        "",
    ]
    for case in cases:
        case.write(directory / case.name)
        lines.append(f"[{_toml_string(case.name)}]")
        lines.append(f"exit = {case.exit}")
        if case.stderr:
            lines.append(f"stderr = {_toml_string(case.stderr)}")
        if case.args:
            lines.append("args = [" + ", ".join(_toml_string(a) for a in case.args) + "]")
        lines.append("")
    (directory / "expected.toml").write_text("\n".join(lines))


def main(root: Path = HERE) -> None:
    shutil.rmtree(root / "pt", ignore_errors=True)
    write_reader(root / "pt", pt_cases.CASES)
    for reader, build in (("jsonl", jsonl), ("parquet", parquet), ("config", config), ("cli", cli)):
        directory = root / reader
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        (directory / "expected.toml").write_text(_toml(build(directory)))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
