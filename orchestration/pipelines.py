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
    data = load_split(task, "test", data_dir).sample(limit)  # bad data fails before the model loads
    backbone = backbone or load_backbone(model, cache_dir=cache_dir, batch_size=batch_size)
    start = time.perf_counter()
    probs = backbone.layer_probs(data.texts, task, show_progress=not quiet)  # (N, L+1, C)
    preds = probs.argmax(-1)  # (N, L+1)
    counts = (preds[..., None] == np.arange(task.n_classes)).sum(axis=0)  # (L+1, C)
    return LayerTable(task.name, model, task.metric, len(data), score_per_layer(task, preds, data.labels),
                      counts.max(axis=1) / max(len(data), 1), time.perf_counter() - start)


def open_models(model: str, *, encoder: str, cache_dir: str | None, batch_size: int = 32):
    """Backbone and key encoder, loaded once per command."""
    from raee.keys import load_encoder

    backbone = load_backbone(model, cache_dir=cache_dir, batch_size=batch_size)
    return backbone, load_encoder(encoder, backbone=backbone)


def build(task: Task, *, model: str, encoder: str, db_uri: str, fraction: float = 1.0, seed: int = 0,
          only_correct: bool = False, data_dir: str | None = None, cache_dir: str | None = None,
          batch_size: int = 32, quiet: bool = False):
    """Algorithm 3.1 for one task's training split, in process, into the exit database at db_uri."""
    from collectors.build import build_database

    load_split(task, "train", data_dir)  # bad data fails before the model loads
    backbone, key_encoder = open_models(model, encoder=encoder, cache_dir=cache_dir, batch_size=batch_size)
    return build_database(backbone, key_encoder, task, db_uri=db_uri, fraction=fraction, seed=seed,
                          only_correct=only_correct, data_dir=data_dir, batch_size=batch_size,
                          show_progress=not quiet)


def explain(texts: list[str], task: Task, *, model: str, encoder: str, db_uri: str, k: int, tau: float,
            cache_dir: str | None = None):
    """RAEE answers with the retrieved neighbours that chose each exit (the paper's Tables 9-10)."""
    from collectors.build import exit_db_meta, variant_collection
    from inference_workers.engine import BatchEngine
    from milvus.exit_db import ExitDB
    from raee.exit_policy import ExitPolicy

    backbone, key_encoder = open_models(model, encoder=encoder, cache_dir=cache_dir)
    meta = exit_db_meta(backbone, key_encoder, task)
    with ExitDB(db_uri, collection=variant_collection(meta), meta=meta) as db:
        if db.count() == 0:
            db.drop()
            raise ExitDatabaseEmptyError(f"no exit database for task {task.name} in {db_uri}")
        engine = BatchEngine(backbone, key_encoder, {task.name: db}, ExitPolicy(tau=tau, k=k))
        return engine.classify(texts, task, explain=True)


class ExitDatabaseEmptyError(RuntimeError):
    """Inference was asked of a task whose exit database has not been built."""


def evaluate(tasks: list[Task], *, model: str, encoder: str, config, out_dir: str, command: str,
             data_dir: str | None = None, cache_dir: str | None = None, quiet: bool = False) -> tuple[list, str]:
    """`raee eval`: every method on every task; writes results.json, results.md and figures into out_dir."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from orchestration.evaluate import evaluate_task
    from orchestration.report import markdown

    for task in tasks:  # bad data fails before the model loads
        load_split(task, "test", data_dir)
    backbone, key_encoder = open_models(model, encoder=encoder, cache_dir=cache_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"model": model, "encoder": key_encoder.name, "command": command, **asdict(config)}
    results = []
    for task in tasks:
        result = evaluate_task(task, backbone, key_encoder, config, data_dir=data_dir, quiet=quiet,
                               figure_dir=str(out / "figures"))
        results.append(result.to_dict())
        (out / "results.json").write_text(json.dumps({"header": header, "tasks": results}, indent=1))
    text = markdown(results, header=header)
    (out / "results.md").write_text(text)
    return results, text
