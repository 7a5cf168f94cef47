"""Dependencies point one way: orchestration -> collectors/inference_workers -> milvus -> raee."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["raee", "milvus", "collectors", "inference_workers", "orchestration"]
ALLOWED = {
    "raee": {"raee"},
    "milvus": {"raee", "milvus"},
    "collectors": {"raee", "milvus", "collectors"},
    "inference_workers": {"raee", "milvus", "inference_workers"},
    "orchestration": set(PACKAGES),
}
# Heavy dependencies live in few places (STYLE.md).
CONFINED = {"pymilvus": {"milvus"}, "ray": {"collectors", "inference_workers", "orchestration"},
            "fastapi": {"inference_workers"}, "typer": {"orchestration"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = _imports(path)
        wrong = (imported & set(PACKAGES)) - ALLOWED[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)} (not allowed from {package}/)"
        for dep, homes in CONFINED.items():
            assert dep not in imported or package in homes, f"{path.relative_to(ROOT)} imports {dep}"


def test_exit_maths_and_tasks_import_only_numpy_and_the_standard_library():
    stdlib = {"__future__", "csv", "hashlib", "os", "dataclasses", "pathlib", "typing", "zlib", "collections", "math",
              "logging", "re", "tomllib", "functools", "importlib", "json"}
    for name in ("exit_policy.py", "records.py", "calibration.py", "heads.py"):
        assert _imports(ROOT / "raee" / name) <= stdlib | {"numpy", "raee"}, name
    # tasks.py reads data files with pyarrow (a maintained reader, imported where the files are read)
    assert _imports(ROOT / "raee" / "tasks.py") <= stdlib | {"numpy", "raee", "pyarrow"}


def test_the_package_facade_is_the_only_upward_reference():
    """`raee.load` / `raee.build` reach orchestration.api by name on first use; nothing else in raee/ does."""
    for path in sorted((ROOT / "raee").rglob("*.py")):
        text = path.read_text()
        mentions = [p for p in PACKAGES if p != "raee" and f'"{p}.' in text]
        if path.name == "__init__.py":
            assert mentions == ["orchestration"] and 'import_module("orchestration.api")' in text
        else:
            assert not mentions, f"{path.relative_to(ROOT)} names {mentions}"
