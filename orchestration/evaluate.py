"""`raee eval`: the paper's Table 1 / Table 8 comparison, measured on one backbone and the same test sets.

Per task: the training split is run through the backbone once (Alg. 3.1) and written to two exit databases
(all examples; only those the full model gets right = "RAEE w/o"). The test split is run once with every
layer recorded, which yields the full-model, fixed-truncation, confidence-exit and oracle predictions;
RAEE itself runs through the real inference engine (one Milvus search per batch, truncated forwards), and
its predictions are cross-checked against the recorded layers (the exactness contract).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from collectors.build import build_exit_records, exit_db_meta, subset_indices, variant_collection
from inference_workers.engine import BatchEngine
from milvus.exit_db import ExitDB
from raee.backbones import Backbone
from raee.exit_policy import ExitPolicy, confidence_exit, knn_vote, oracle_exit
from raee.keys import KeyEncoder
from raee.records import ExitRecords, Neighbours, record_ids
from raee.tasks import Task, load_split, score, score_per_layer

log = logging.getLogger(__name__)

METHODS = ["full", "raee", "raee_wo", "fixed_trunc", "confidence", "knn", "oracle"]
METHOD_TITLES = {
    "full": "Full model (last layer)", "raee": "RAEE", "raee_wo": "RAEE w/o (only-correct db)",
    "fixed_trunc": "Fixed truncation at RAEE's mean exit", "confidence": "Confidence exit (zero-shot)",
    "knn": "kNN label vote (no backbone)", "oracle": "Oracle (earliest correct layer)",
}


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of one evaluation run; defaults are the paper's (k=12, tau=0.9)."""

    k: int = 12
    tau: float = 0.9
    confidence_threshold: float = 0.9
    db_uri: str = "./raee.db"
    limit_train: int | None = None
    limit_test: int | None = None
    latency_examples: int = 32
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_repeats: int = 3
    k_sweep: tuple[int, ...] = ()
    fraction_sweep: tuple[float, ...] = ()
    seed: int = 0
    rebuild: bool = False


@dataclass
class TaskResult:
    """Scores and mean exit layers per method for one task, plus latency and sweeps."""

    task: str
    metric: str
    n_train: int
    n_test: int
    n_layers: int
    scores: dict[str, float] = field(default_factory=dict)
    mean_exit: dict[str, float] = field(default_factory=dict)
    raee_engine_mismatches: int = 0  # engine predictions that differ from the recorded layer (should be 0)
    share_train_no_correct_layer: float = 0.0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # batch size -> method -> ms/example
    k_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    fraction_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    build_seconds: float = 0.0
    exit_histogram: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)  # (L+1,) metric of each layer's argmax on test

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _TestPass:
    layer_probs: np.ndarray  # (N, L+1, C)
    keys: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    texts: tuple[str, ...]


def evaluate_task(task: Task, backbone: Backbone, encoder: KeyEncoder, config: EvalConfig, *,
                  data_dir: str | None = None, quiet: bool = False, figure_dir: str | None = None) -> TaskResult:
    """All methods of the comparison on one task (see module docstring)."""
    train = load_split(task, "train", data_dir).sample(config.limit_train, config.seed)
    test = load_split(task, "test", data_dir).sample(config.limit_test, config.seed)
    policy = ExitPolicy(tau=config.tau, k=config.k)
    meta = exit_db_meta(backbone, encoder, task)
    result = TaskResult(task.name, task.metric, len(train), len(test), backbone.n_layers)
    full_name = variant_collection(meta) + (f"_n{len(train)}" if config.limit_train else "")
    with ExitDB(config.db_uri, collection=full_name, meta=meta) as full_db, \
         ExitDB(config.db_uri, collection=full_name + "_only_correct", meta=meta) as correct_db:
        start = time.perf_counter()
        records = _build_both(backbone, encoder, task, train, full_db, correct_db, rebuild=config.rebuild,
                              quiet=quiet)
        result.build_seconds = round(time.perf_counter() - start, 1)
        result.share_train_no_correct_layer = float(np.mean((records.exit_probs == 0).all(axis=1)))

        t = _test_pass(backbone, encoder, task, test, quiet)
        result.layer_scores = score_per_layer(task, t.layer_probs.argmax(-1), t.labels).tolist()
        engine = BatchEngine(backbone, encoder, {task.name: full_db}, policy)
        responses = []
        for start_idx in range(0, len(t.texts), 64):
            responses += engine.classify(list(t.texts[start_idx : start_idx + 64]), task)
        raee_exits = np.array([r.exit_layer for r in responses], dtype=np.int64)
        raee_preds = np.array([r.label for r in responses], dtype=np.int64)
        recorded = t.layer_probs[np.arange(len(raee_exits)), raee_exits].argmax(-1)
        result.raee_engine_mismatches = int((recorded != raee_preds).sum())

        found = full_db.search(t.keys, k=max((config.k, *config.k_sweep)))
        wo_exits = policy.exit_layers(correct_db.search(t.keys, k=config.k))
        n_layers = backbone.n_layers
        fixed = round(float(raee_exits.mean())) if len(raee_exits) else n_layers
        exits = {
            "full": np.full(len(t.texts), n_layers), "raee": raee_exits, "raee_wo": wo_exits,
            "fixed_trunc": np.full(len(t.texts), fixed),
            "confidence": confidence_exit(t.layer_probs, config.confidence_threshold),
            "oracle": oracle_exit(t.layer_probs, t.labels),
        }
        for method, layers in exits.items():
            preds = raee_preds if method == "raee" else _preds_at(t.layer_probs, layers)
            result.scores[method] = score(task, preds, t.labels)
            result.mean_exit[method] = float(np.mean(layers)) if len(layers) else float("nan")
        top_k = _top(found, config.k)
        knn = knn_vote(top_k.distances, top_k.labels, task.n_classes).argmax(-1)
        result.scores["knn"] = score(task, knn, t.labels)
        result.mean_exit["knn"] = 0.0
        result.exit_histogram = np.bincount(raee_exits, minlength=n_layers + 1).tolist()
        result.k_sweep = {str(k): _policy_point(ExitPolicy(tau=config.tau, k=k), _top(found, k), t, task)
                          for k in config.k_sweep}
        result.fraction_sweep = _fraction_sweep(records, meta, t, task, policy, config)
        result.latency_ms = _latency(engine, backbone, task, t.texts, config)
        if figure_dir:
            from orchestration.report import plot_task_figures

            plot_task_figures(figure_dir, task, t.layer_probs, t.labels, found, result.exit_histogram, config.k)
    return result


def _build_both(backbone: Backbone, encoder: KeyEncoder, task: Task, train, full_db: ExitDB, correct_db: ExitDB,
                *, rebuild: bool, quiet: bool) -> ExitRecords:
    """Write the full and the only-correct databases from ONE backbone pass; reuse them when complete."""
    if not rebuild and full_db.count() == len(train):
        log.info("%s: reusing the complete exit database %s", task.name, full_db.collection)
        return full_db.get(record_ids(task.name, "train", train.example_idx))
    parts = []
    for batch in build_exit_records(backbone, encoder, task, train, example_idx=train.example_idx, batch_size=64,
                                    show_progress=not quiet):
        full_db.upsert(batch)
        keep = batch.exit_probs[:, -1] > 0  # the full model (last layer) is right
        correct_db.upsert(_select(batch, keep))
        parts.append(batch)
    full_db.flush()
    correct_db.flush()
    return _concat(parts, encoder.dim, backbone.n_layers)


def _select(records: ExitRecords, keep: np.ndarray) -> ExitRecords:
    return ExitRecords(records.ids[keep], records.vectors[keep], records.exit_probs[keep], records.labels[keep],
                       tuple(t for t, k in zip(records.texts, keep, strict=True) if k))


def _concat(parts: list[ExitRecords], dim: int, n_layers: int) -> ExitRecords:
    if not parts:
        return ExitRecords(np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                           np.zeros((0, n_layers + 1), np.float32), np.zeros(0, np.int64), ())
    return ExitRecords(np.concatenate([p.ids for p in parts]), np.concatenate([p.vectors for p in parts]),
                       np.concatenate([p.exit_probs for p in parts]), np.concatenate([p.labels for p in parts]),
                       tuple(t for p in parts for t in p.texts))


def _test_pass(backbone: Backbone, encoder: KeyEncoder, task: Task, test, quiet: bool) -> _TestPass:
    probs = backbone.layer_probs(test.texts, task, show_progress=not quiet)
    keys = encoder.encode(list(test.texts), task, show_progress=not quiet)
    return _TestPass(probs, keys, test.labels, test.texts)


def _preds_at(layer_probs: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """preds[n] = argmax_c layer_probs[n, layers[n], c]: by the exactness contract, what a truncated run gives."""
    return layer_probs[np.arange(len(layers)), np.asarray(layers, dtype=np.int64)].argmax(-1)


def _top(found: Neighbours, k: int) -> Neighbours:
    """The k closest of a sorted search result (search returns closest first)."""
    return Neighbours(found.ids[:, :k], found.distances[:, :k], found.exit_probs[:, :k], found.labels[:, :k])


def _policy_point(policy: ExitPolicy, found: Neighbours, t: _TestPass, task: Task) -> dict[str, float]:
    layers = policy.exit_layers(found)
    return {"score": score(task, _preds_at(t.layer_probs, layers), t.labels), "mean_exit": float(np.mean(layers))}


def _fraction_sweep(records: ExitRecords, meta, t: _TestPass, task: Task, policy: ExitPolicy,
                    config: EvalConfig) -> dict[str, dict[str, float]]:
    """Table 4: RAEE with a seeded subset of the training records as its database (same records, no rerun)."""
    out = {}
    for fraction in config.fraction_sweep:
        keep = subset_indices(len(records), fraction, config.seed)
        name = variant_collection(meta, fraction=fraction, seed=config.seed) + f"_n{len(records)}"
        with ExitDB(config.db_uri, collection=name, meta=meta) as db:
            db.upsert(_select(records, np.isin(np.arange(len(records)), keep)))
            db.flush()
            out[f"{fraction:g}"] = _policy_point(policy, db.search(t.keys, k=policy.k), t, task)
    return out


def _latency(engine: BatchEngine, backbone: Backbone, task: Task, texts: tuple[str, ...],
             config: EvalConfig) -> dict[str, dict[str, float]]:
    """End-to-end ms per example (RAEE: encoder + retrieval + policy + truncated forward) vs the full model.

    Both run on the same texts in the same process, alternating repeats; medians over repeats."""
    sample = list(texts[: config.latency_examples])
    out: dict[str, dict[str, float]] = {}
    for batch_size in config.latency_batch_sizes:
        batches = [sample[i : i + batch_size] for i in range(0, len(sample), batch_size)]
        full_t, raee_t = [], []
        for _ in range(config.latency_repeats):
            start = time.perf_counter()
            for batch in batches:
                backbone.predict(batch, task, backbone.n_layers)
            full_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            for batch in batches:
                engine.classify(batch, task)
            raee_t.append(time.perf_counter() - start)
        full_ms = 1000 * float(np.median(full_t)) / len(sample)
        raee_ms = 1000 * float(np.median(raee_t)) / len(sample)
        out[str(batch_size)] = {"full_ms": round(full_ms, 2), "raee_ms": round(raee_ms, 2),
                                "speedup": round(full_ms / raee_ms, 3)}
    return out
