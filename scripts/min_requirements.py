"""Print the lowest declared version of every runtime dependency as ``pkg==floor`` lines.

``make test-min`` installs routelog with these lines as pip constraints, so the versions the
suite proves are exactly the floors ``pyproject.toml`` declares: the two cannot drift.
A dependency without a ``>=`` floor is an error (nothing to prove); an upper bound is kept
as a comment, and an environment marker (``; python_version < '3.11'``) is carried over.

    python scripts/min_requirements.py [pyproject.toml] > constraints.txt
    python scripts/min_requirements.py --verify   # exit 1 unless installed == floors
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli that pip vendors reads pyproject too
    from pip._vendor import tomli as tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")
FLOOR = re.compile(r">=\s*([0-9][0-9A-Za-z.+-]*)")


def constraints(pyproject: Path) -> list[str]:
    """``name==floor[; marker]`` for each entry of ``[project] dependencies``, in order."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = []
    for requirement in project["dependencies"]:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"{pyproject}: cannot read the dependency {requirement!r}")
        name, _extras, specifier, marker = match.groups()
        floor = FLOOR.search(specifier)
        if floor is None:
            raise SystemExit(
                f"{pyproject}: dependency {requirement!r} declares no >= floor to test"
            )
        lines.append(f"{name}=={floor.group(1)}{' ' + marker if marker else ''}")
    return lines


def verify(lines: list[str]) -> list[str]:
    """The floors this interpreter's environment does not hold exactly, as messages."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = []
    for line in lines:
        pin, _, marker = line.partition(";")
        name, _, floor = pin.strip().partition("==")
        if marker and not _marker_holds(marker):
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            wrong.append(f"{name}: not installed, floor {floor}")
            continue
        if _release(installed) != _release(floor):
            wrong.append(f"{name}: {installed} installed, floor {floor}")
    return wrong


def _release(text: str) -> tuple[int, ...] | str:
    """``1.26.0`` and ``1.26`` are the same release (PEP 440 pads with zeros)."""
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", text):
        return text
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _marker_holds(marker: str) -> bool:
    """``python_version < '3.11'`` and the like (the only markers routelog declares)."""
    match = re.fullmatch(r"\s*python_version\s*(<|<=|>|>=|==)\s*['\"]([0-9.]+)['\"]\s*", marker)
    if match is None:
        raise SystemExit(f"cannot evaluate the marker {marker!r}")
    here = sys.version_info[:2]
    there = tuple(int(p) for p in match.group(2).split("."))
    return {
        "<": here < there,
        "<=": here <= there,
        ">": here > there,
        ">=": here >= there,
        "==": here == there,
    }[match.group(1)]


def main(argv: list[str]) -> None:
    check = "--verify" in argv
    args = [a for a in argv[1:] if a != "--verify"]
    path = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "pyproject.toml"
    lines = constraints(path)
    if not check:
        sys.stdout.write("".join(line + "\n" for line in lines))
        return
    wrong = verify(lines)
    for message in wrong:
        print(f"min_requirements: {message}", file=sys.stderr)
    if wrong:
        raise SystemExit(1)
    print(f"min_requirements: every runtime dependency is at its floor ({len(lines)} checked)")


if __name__ == "__main__":
    main(sys.argv)
