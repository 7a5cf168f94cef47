"""Entry-point pipelines: what each CLI command does, as plain functions returning plain data."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from raee.models import load_backbone
from raee.tasks import Task, layer_stats, load_split


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
    n_calibration: int = 0  # training examples the calibration was fitted on (0: not calibrated)
    scores_calibrated: np.ndarray | None = None  # (L+1,) after contextual calibration
    constant_share_calibrated: np.ndarray | None = None  # (L+1,)

    def to_dict(self) -> dict:
        def rounded(values: np.ndarray | None) -> list[float] | None:
            return None if values is None else [round(float(v), 4) for v in values]

        return {"task": self.task, "model": self.model, "metric": self.metric, "n_examples": self.n_examples,
                "scores": rounded(self.scores), "constant_share": rounded(self.constant_share),
                "n_calibration": self.n_calibration, "scores_calibrated": rounded(self.scores_calibrated),
                "constant_share_calibrated": rounded(self.constant_share_calibrated), "seconds": round(self.seconds, 1)}


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
    calibration_examples: int = 0,
) -> LayerTable:
    """One forward per batch over the test split, scoring every layer's label-word argmax.

    calibration_examples > 0 also fits a contextual calibration on a seeded sample of that many *training*
    examples and scores the calibrated layers (raee/calibration.py)."""
    from raee.calibration import fit_calibration

    data = load_split(task, "test", data_dir).sample(limit)  # bad data fails before the model loads
    train = load_split(task, "train", data_dir).sample(calibration_examples) if calibration_examples else None
    backbone = backbone or load_backbone(model, cache_dir=cache_dir, batch_size=batch_size)
    start = time.perf_counter()
    probs = backbone.layer_probs(data.texts, task, show_progress=not quiet)  # (N, L+1, C)
    scores, shares = layer_stats(task, probs, data.labels)
    table = LayerTable(task.name, model, task.metric, len(data), scores, shares, 0.0)
    if train is not None:
        calibration = fit_calibration(backbone.layer_probs(train.texts, task, show_progress=not quiet))
        cal_scores, cal_shares = layer_stats(task, calibration.apply(probs), data.labels)
        table = replace(table, n_calibration=len(train), scores_calibrated=cal_scores,
                        constant_share_calibrated=cal_shares)
    return replace(table, seconds=time.perf_counter() - start)


def open_models(model: str, *, encoder: str, cache_dir: str | None, batch_size: int = 32):
    """Backbone and key encoder, loaded once per command."""
    from raee.keys import load_encoder

    backbone = load_backbone(model, cache_dir=cache_dir, batch_size=batch_size)
    return backbone, load_encoder(encoder, backbone=backbone)


def build(task: Task, *, model: str, encoder: str, db_uri: str, fraction: float = 1.0, seed: int = 0,
          only_correct: bool = False, data_dir: str | None = None, cache_dir: str | None = None,
          batch_size: int = 32, quiet: bool = False, policy: str = "raee", token: str | None = None):
    """Algorithm 3.1 for one task's training split, in process, into the exit database at db_uri.

    policy: the exit policy the database is for; a calibrated one (raee-cal, fused) gets a calibrated build."""
    from raee.exit_policy import get_policy

    calibrate = get_policy(policy).calibrated
    from collectors.build import build_database

    load_split(task, "train", data_dir)  # bad data fails before the model loads
    backbone, key_encoder = open_models(model, encoder=encoder, cache_dir=cache_dir, batch_size=batch_size)
    return build_database(backbone, key_encoder, task, db_uri=db_uri, fraction=fraction, seed=seed,
                          only_correct=only_correct, data_dir=data_dir, batch_size=batch_size,
                          calibrate=calibrate, token=token, show_progress=not quiet)


def explain(texts: list[str], task: Task, *, model: str, encoder: str, db_uri: str, k: int, tau: float,
            cache_dir: str | None = None, policy: str = "raee", policy_params: dict[str, float] | None = None,
            fraction: float = 1.0, seed: int = 0, token: str | None = None):
    """RAEE answers with the retrieved neighbours that chose each exit (the paper's Tables 9-10)."""
    from collectors.build import exit_db_meta, variant_collection
    from inference_workers.engine import BatchEngine
    from milvus.exit_db import ExitDB
    from raee.exit_policy import get_policy, policy_kwargs

    exit_policy = get_policy(policy, **policy_kwargs(policy, k=k, tau=tau, **(policy_params or {})))
    backbone, key_encoder = open_models(model, encoder=encoder, cache_dir=cache_dir)
    meta = exit_db_meta(backbone, key_encoder, task, calibrated=exit_policy.calibrated)
    with ExitDB(db_uri, collection=variant_collection(meta, fraction=fraction, seed=seed), meta=meta,
                token=token) as db:
        if db.count() == 0:
            db.drop()
            raise ExitDatabaseEmptyError(f"no exit database for task {task.name} and policy {policy} in {db_uri}; "
                                         f"build it with: raee build --task {task.name} --policy {policy}")
        engine = BatchEngine(backbone, key_encoder, {task.name: db}, exit_policy)
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
