"""Write the regression corpus: ``python tests/corpus/make_corpus.py`` (deterministic).

``tests/corpus/<reader>/`` holds hostile or odd input files, and ``expected.toml`` the outcome
of ``routelog analyze FILE --no-cache ARGS`` for each: ``exit`` (0 or 2), for exit 2 a
substring of the one-line ``stderr``, and optional ``args``. ``tests/test_corpus.py`` runs them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))  # run as a script: make `tests` importable

from tests.corpus import pt_cases  # noqa: E402


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


def main() -> None:
    write_reader(ROOT / "pt", pt_cases.CASES)


if __name__ == "__main__":
    main()
