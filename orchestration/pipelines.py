"""Entry-point pipelines: what each CLI command does, as plain functions returning plain data."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from raee.models import load_backbone
from raee.tasks import Task, load_split, score_per_layer


@dataclass(frozen=True)
class LayerTable:
    """Per-layer score of a backbone on a task's test split; row l is layer l, the last row the full model."""

    task: str
    model: str
    metric: str
    n_examples: int
    scores: np.ndarray  # (L+1,)
    constant_share: np.ndarray  # (L+1,) share of examples given the layer's most frequent prediction
    seconds: float

    def to_dict(self) -> dict:
        return {"task": self.task, "model": self.model, "metric": self.metric, "n_examples": self.n_examples,
                "scores": [round(float(s), 4) for s in self.scores],
                "constant_share": [round(float(s), 4) for s in self.constant_share], "seconds": round(self.seconds, 1)}


def layer_table(
    task: Task,
    *,
    model: str,
    limit: int | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 32,
    quiet: bool = False,
    backbone=None,
) -> LayerTable:
    """One forward per batch over the test split, scoring every layer's label-word argmax."""
    data = load_split(task, "test", data_dir).head(limit)  # bad data fails before the model loads
    backbone = backbone or load_backbone(model, cache_dir=cache_dir, batch_size=batch_size)
    start = time.perf_counter()
    probs = backbone.layer_probs(data.texts, task, show_progress=not quiet)  # (N, L+1, C)
    preds = probs.argmax(-1)  # (N, L+1)
    counts = (preds[..., None] == np.arange(task.n_classes)).sum(axis=0)  # (L+1, C)
    return LayerTable(task.name, model, task.metric, len(data), score_per_layer(task, preds, data.labels),
                      counts.max(axis=1) / max(len(data), 1), time.perf_counter() - start)
