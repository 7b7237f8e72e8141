"""What a wheel carries and declares: licence, typing marker, the sample, proven floors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _min_requirements() -> Any:
    spec = importlib.util.spec_from_file_location(
        "min_requirements", REPO / "scripts" / "min_requirements.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_licence_is_declared_and_shipped() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639


def test_typing_marker_and_sample_are_package_data() -> None:
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["routelog"]
    assert (REPO / "routelog" / "py.typed").is_file()
    shipped = [
        p
        for pattern in data["routelog.samples"]
        for p in (REPO / "routelog" / "samples").glob(pattern)
    ]
    assert shipped, "the packaged sample matches no file"


def test_floors_become_exact_constraints(tmp_path: Path) -> None:
    module = _min_requirements()
    lines = module.constraints(REPO / "pyproject.toml")
    names = [line.split("==")[0] for line in lines]
    assert names == [
        "typer",
        "polars",
        "pyarrow",
        "rich",
        "plotext",
        "numpy",
        "safetensors",
        "tomli",
    ]
    assert "tomli==2.0 ; python_version < '3.11'" in lines
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\ndependencies = ["polars>=1.33,<3", "rich"]\n')
    with pytest.raises(SystemExit, match="no >= floor"):
        module.constraints(fake)


def test_verify_names_what_is_not_at_its_floor() -> None:
    module = _min_requirements()
    wrong = module.verify(["pytest==0.0.1", "no-such-package-routelog==1.0"])
    assert wrong[0].startswith("pytest: ")
    assert wrong[0].endswith("installed, floor 0.0.1")
    assert wrong[1] == "no-such-package-routelog: not installed, floor 1.0"
    assert module.verify(["tomli==0.0.1 ; python_version < '3.0'"]) == []
