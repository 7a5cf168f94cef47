"""A disk cache of `Backbone.layer_probs` for evaluation runs: the backbone pass is the slow part of `raee eval`.

Keyed by the backbone's name and depth, max_length, template, split, example positions and texts, stored as
plain `.npz` (no pickle) under `<cache_dir>/layer-probs/`. Re-running an evaluation with other policies or
hyper-parameters then costs no forward pass. Inference never uses it. The key does not hash the weights: after
changing a model's files in place under the same name, delete `<cache_dir>/layer-probs/` (or pass
`--no-forward-cache`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from raee.backbones import Backbone
from raee.tasks import Dataset


def _key(backbone: Backbone, dataset: Dataset) -> str:
    task = dataset.task
    parts = [backbone.name, str(backbone.n_layers), str(backbone.max_length), task.name,
             task.template_hash(backbone.style), dataset.split, str(len(dataset))]
    digest = hashlib.sha256("\n".join(parts).encode())
    digest.update(np.ascontiguousarray(dataset.example_idx, dtype=np.int64).tobytes())
    digest.update("\n".join(dataset.texts).encode("utf-8", "surrogatepass"))
    return f"{task.name}-{dataset.split}-{len(dataset)}-{digest.hexdigest()[:16]}"


def cached_layer_probs(backbone: Backbone, dataset: Dataset, cache_dir: str | os.PathLike[str] | None, *,
                       quiet: bool = False) -> np.ndarray:
    """backbone.layer_probs(dataset.texts, dataset.task), read from / written to cache_dir (None: no cache)."""
    if cache_dir is None:
        return backbone.layer_probs(dataset.texts, dataset.task, show_progress=not quiet)
    path = Path(cache_dir) / "layer-probs" / f"{_key(backbone, dataset)}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            return stored["layer_probs"]
    probs = backbone.layer_probs(dataset.texts, dataset.task, show_progress=not quiet)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, layer_probs=probs)
    os.replace(tmp, path)  # a killed run never leaves a half-written entry
    return probs
