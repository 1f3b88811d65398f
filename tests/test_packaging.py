"""Packaging metadata: one version, a LICENSE that matches the declared license, the extras."""

import ast
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_version() -> str:
    tree = ast.parse((ROOT / "python" / "longtune" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("python/longtune/__init__.py defines no __version__")


def test_version_has_one_source():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project.get("dynamic", [])
    dyn = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]
    assert dyn == {"attr": "longtune.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", _package_version())
    setup_py = (ROOT / "setup.py").read_text()
    assert "version=" not in setup_py.replace(" ", ""), "setup.py must not declare a second version"


def test_license_file_matches_declared_license():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {k: {re.split(r"[<>=\[ ]", d)[0] for d in v} for k, v in extras.items()}
    assert {"transformers", "peft", "safetensors"} <= names["hf"]
    assert {"matplotlib", "tqdm"} <= names["bench"]
    assert {"pytest", "hypothesis", "scipy"} <= names["test"]
    assert {"ruff", "clang-format"} <= names["lint"]
    runtime = {re.split(r"[<>=\[ ]", d)[0] for d in _pyproject()["project"]["dependencies"]}
    assert not runtime & {"transformers", "peft", "safetensors", "accelerate"}, (
        "the HF stack is an extra"
    )
