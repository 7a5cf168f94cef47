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
    for name in ("exit_policy.py", "tasks.py", "records.py"):
        allowed = {"__future__", "numpy", "csv", "hashlib", "os", "dataclasses", "pathlib", "typing", "zlib",
                   "collections", "math", "logging", "raee"}
        assert _imports(ROOT / "raee" / name) <= allowed, name
