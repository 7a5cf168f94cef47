"""raee: retrieval-augmented early exit.

    import raee
    raee.build("sst2", db="./raee.db", fraction=0.1)
    clf = raee.load("sst2", db="./raee.db")
    clf(["a gem", "a dull mess"])   # [{"label": "positive", "score": 0.91, "exit_layer": 7, ...}, ...]

`raee.load` and `raee.build` are the one facade over the whole system (orchestration.api); they are imported
on first use, so `raee.tasks`, `raee.exit_policy` and the rest of the core never load Milvus or Ray.

Shape letters used in comments across the code base:
    B  batch of texts            T  tokens per text          H  hidden size
    V  vocabulary size           L  number of blocks (layers 0..L, 0 = embedding output)
    C  number of classes (label words)                       K  neighbours retrieved per query
    N  number of queries or records
"""

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

_FACADE = {"load", "build", "Classifier"}


def __getattr__(name: str) -> Any:
    if name in _FACADE:
        return getattr(import_module("orchestration.api"), name)
    raise AttributeError(f"module 'raee' has no attribute {name!r}")
