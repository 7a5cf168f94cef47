"""`raee eval`: the paper's Table 1 / Table 8 comparison plus the calibrated policies, on one backbone.

Per task the training split is divided, with a seed, into a held-out tuning slice and the database examples
(`--limit-train` caps both together). The database examples run through the backbone once (Alg. 3.1); their
layer distributions give the per-layer calibration (training split only) and two exit databases: the build
every policy reads (`raee` raw, `raee-cal` and `fused` through the stored calibration) and the only-correct
variant ("RAEE w/o"). The tuning slice picks the fused policy's knobs under the depth budget;
the test split is never used to choose anything. The test split is run once with every layer recorded: every
method's prediction is read from the recorded layers (the exactness contract), and each retrieval policy also
runs through the real inference engine (one Milvus search per batch, truncated forwards) to check that the
engine answers the same. Forward passes are cached on disk (orchestration/forward_cache.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from collectors.build import exit_records, subset_indices
from inference_workers.engine import BatchEngine
from milvus.exit_db import BuildVariant, ExitDB, collection_name, setup_meta
from orchestration.forward_cache import cached_layer_pass
from orchestration.methods import ENGINE_METHODS, METHODS
from raee.backbones import Backbone
from raee.calibration import Calibration, fit_calibration
from raee.exit_policy import (
    CalibratedExitPolicy,
    ExitPolicy,
    FusedPolicy,
    Policy,
    answer_probs,
    calibrated_view,
    closest,
    confidence_exit,
    knn_vote,
    oracle_exit,
)
from raee.keys import KeyEncoder
from raee.records import ExitRecords, Neighbours
from raee.tasks import Dataset, Task, layer_stats, load_split, score

log = logging.getLogger(__name__)

__all__ = ["METHODS", "EvalConfig", "TaskResult", "evaluate_task"]


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of one evaluation run; defaults are the paper's (k=12, tau=0.9) and docs/exit-policies.md's."""

    k: int = 12
    tau: float = 0.9
    confidence_threshold: float = 0.9
    db_uri: str = "./raee.db"
    limit_train: int | None = None  # training examples taken in all (tuning slice + database)
    limit_test: int | None = None
    latency_examples: int = 32
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_repeats: int = 3
    k_sweep: tuple[int, ...] = ()
    fraction_sweep: tuple[float, ...] = ()
    seed: int = 0
    rebuild: bool = False
    tune_examples: int = 500  # held-out training examples that choose the fused policy's knobs (at most a third
    # of limit_train when that is set)
    depth_budget: float = 0.6  # the tuned fused policy may exit at most this share of the layers on average
    fused_betas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    fused_slacks: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
    curve_slacks: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)
    engine_check_examples: int | None = None  # test examples each retrieval policy runs through the engine
    cache_dir: str | None = None  # forward-pass cache (None: no cache)


@dataclass
class TaskResult:
    """Scores and mean exit layers per method for one task, plus tuning, latency, sweeps and diagnostics."""

    task: str
    metric: str
    n_train: int
    n_test: int
    n_layers: int
    n_tune: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    mean_exit: dict[str, float] = field(default_factory=dict)
    engine_mismatches: dict[str, int] = field(default_factory=dict)  # engine vs recorded answers (should be 0)
    engine_checked: int = 0  # test examples each retrieval policy ran through the engine
    share_train_no_correct_layer: float = 0.0
    fused_params: dict[str, float] = field(default_factory=dict)  # chosen on the tuning slice
    tune_grid: list[dict[str, float]] = field(default_factory=list)  # (beta, slack, score, mean_exit) on it
    depth_curve: list[dict[str, float]] = field(default_factory=list)  # test: fused with the chosen beta per slack
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # batch size -> figure -> value
    k_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    fraction_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    build_seconds: float = 0.0
    exit_histogram: list[int] = field(default_factory=list)  # RAEE (paper)
    fused_exit_histogram: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)  # (L+1,) metric of each layer's argmax on test
    layer_scores_calibrated: list[float] = field(default_factory=list)  # the same after calibration
    constant_share: list[float] = field(default_factory=list)  # (L+1,) share given the layer's commonest class
    constant_share_calibrated: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Pass:
    """One split's recorded forward pass: every layer's label distribution and state, keys, labels."""

    layer_probs: np.ndarray  # (N, L+1, C) raw
    states: np.ndarray  # (N, L+1, H) answer-position residual stream
    keys: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    data: Dataset

    @property
    def texts(self) -> tuple[str, ...]:
        return self.data.texts


def tune_size(limit_train: int | None, tune_examples: int) -> int:
    """Tuning-slice size: tune_examples, but at most a third of limit_train, which caps everything taken."""
    return tune_examples if limit_train is None else min(tune_examples, limit_train // 3)


def split_train(train: Dataset, limit: int | None, n_tune: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(database examples, tuning slice): disjoint seeded subsets of the training split, both in file order.

    The tuning slice takes the first n_tune of a seeded permutation, the database the next `limit - n_tune`
    (all the rest when limit is None): hyper-parameters are chosen on training examples the database does not
    hold, and no more than `limit` training examples are taken in all."""
    if n_tune < 0 or n_tune >= len(train):
        raise ValueError(f"tune_examples must lie in [0, {len(train)}) for {len(train)} training examples, "
                         f"got {n_tune}")
    if limit is not None and limit <= n_tune:
        raise ValueError(f"limit_train {limit} leaves no database examples after a {n_tune}-example tuning slice")
    perm = np.random.default_rng(seed).permutation(len(train))
    rest = perm[n_tune:]
    return train.take(np.sort(rest if limit is None else rest[: limit - n_tune])), train.take(np.sort(perm[:n_tune]))


def evaluate_task(task: Task, backbone: Backbone, encoder: KeyEncoder, config: EvalConfig, *,
                  data_dir: str | None = None, quiet: bool = False, figure_dir: str | None = None) -> TaskResult:
    """All methods of the comparison on one task (see module docstring)."""
    train, tune = split_train(load_split(task, "train", data_dir), config.limit_train,
                              tune_size(config.limit_train, config.tune_examples), config.seed)
    test = load_split(task, "test", data_dir).sample(config.limit_test, config.seed)
    n_layers = backbone.n_layers
    result = TaskResult(task.name, task.metric, len(train), len(test), n_layers, n_tune=len(tune))

    start = time.perf_counter()
    tr = _record(backbone, encoder, train, config, quiet)
    calibration = fit_calibration(tr.layer_probs)  # the training split's database examples, nothing else
    meta = setup_meta(backbone, encoder, task)
    suffix = f"_n{len(train)}_tune{len(tune)}_seed{config.seed}"
    wo = BuildVariant(only_correct=True)
    with ExitDB(config.db_uri, collection=collection_name(meta) + suffix, meta=meta,
                calibration=calibration) as raw_db, \
         ExitDB(config.db_uri, collection=collection_name(meta, wo) + suffix, meta=meta, variant=wo) as wo_db:
        if raw_db.calibration is None or not np.allclose(raw_db.calibration.bias, calibration.bias):
            raise ValueError(f"{raw_db.collection} holds another calibration; rerun with rebuild=True")
        records = _write(task, train, tr, raw_db, wo_db, rebuild=config.rebuild)
        result.build_seconds = round(time.perf_counter() - start, 1)
        result.share_train_no_correct_layer = float(np.mean((records.exit_probs == 0).all(axis=1)))

        t = _record(backbone, encoder, test, config, quiet)
        cal_probs = calibration.apply(t.layer_probs)  # (N, L+1, C)
        scores, shares = layer_stats(task, t.layer_probs, t.labels)
        result.layer_scores, result.constant_share = scores.tolist(), shares.tolist()
        scores, shares = layer_stats(task, cal_probs, t.labels)
        result.layer_scores_calibrated, result.constant_share_calibrated = scores.tolist(), shares.tolist()

        # Knobs of the fused policy: chosen on the tuning slice, under the depth budget.
        u = _record(backbone, encoder, tune, config, quiet)
        fused, result.tune_grid = tune_fused(calibrated_view(raw_db.search(u.keys, k=config.k), calibration), u,
                                             calibration, task, config, n_layers)
        result.fused_params = {"k": fused.k, "beta": fused.beta, "slack": fused.slack, "alpha": fused.alpha}

        policies: dict[str, Policy] = {"raee": ExitPolicy(tau=config.tau, k=config.k),
                                       "raee_cal": CalibratedExitPolicy(tau=config.tau, k=config.k), "fused": fused}
        found = raw_db.search(t.keys, k=max((config.k, *config.k_sweep)))
        found_cal = calibrated_view(closest(found, config.k), calibration)
        exits = {"full": np.full(len(test), n_layers), "raee_wo": ExitPolicy(tau=config.tau, k=config.k)
                 .exit_layers(wo_db.search(t.keys, k=config.k)),
                 "confidence": confidence_exit(t.layer_probs, config.confidence_threshold),
                 "oracle": oracle_exit(t.layer_probs, t.labels)}
        preds = {method: _preds_at(t.layer_probs, layers) for method, layers in exits.items()}
        for method, policy in policies.items():
            nb = found_cal if policy.calibrated else found
            exits[method] = policy.exit_layers(nb)
            preds[method] = answers(policy, t.layer_probs, exits[method], nb,
                                    calibration if policy.calibrated else None)
        exits["full_cal"] = exits["full"]
        preds["full_cal"] = cal_probs[:, -1].argmax(-1)  # the full model with the last layer's calibration
        exits["fixed_trunc"] = np.full(len(test), round(float(exits["raee"].mean())) if len(test) else n_layers)
        preds["fixed_trunc"] = _preds_at(t.layer_probs, exits["fixed_trunc"])
        for method in exits:
            result.scores[method] = score(task, preds[method], t.labels)
            result.mean_exit[method] = float(np.mean(exits[method])) if len(test) else float("nan")
        knn = closest(found, config.k)
        result.scores["knn"] = score(task, knn_vote(knn.distances, knn.labels, task.n_classes).argmax(-1), t.labels)
        result.mean_exit["knn"] = 0.0

        engines = {m: BatchEngine.single(backbone, encoder, task, raw_db, policies[m], name=ENGINE_METHODS[m])
                   for m in ENGINE_METHODS}
        n_check = len(test) if config.engine_check_examples is None else min(config.engine_check_examples, len(test))
        result.engine_checked = n_check
        for method, engine in engines.items():
            result.engine_mismatches[method] = _engine_mismatches(engine, task, t.data.head(n_check),
                                                                  exits[method][:n_check], preds[method][:n_check])
        result.exit_histogram = np.bincount(exits["raee"], minlength=n_layers + 1).tolist()
        result.fused_exit_histogram = np.bincount(exits["fused"], minlength=n_layers + 1).tolist()
        result.depth_curve = [
            {"slack": slack, **_policy_point(FusedPolicy(config.k, fused.beta, slack, fused.alpha), found_cal, t,
                                             task, calibration)}
            for slack in config.curve_slacks]
        result.k_sweep = {str(k): _policy_point(ExitPolicy(tau=config.tau, k=k), closest(found, k), t, task)
                          for k in config.k_sweep}
        result.fraction_sweep = _fraction_sweep(records, meta, t, task, policies["raee"], config)
        result.latency_ms = _latency(engines, backbone, task, t.data, config)
        if figure_dir:
            from orchestration.report import plot_depth_accuracy, plot_task_figures

            plot_task_figures(figure_dir, task, t.layer_probs, t.labels, found, result.exit_histogram, config.k)
            plot_depth_accuracy(figure_dir, result.to_dict())
    return result


def answers(policy: Policy, layer_probs: np.ndarray, exits: np.ndarray, neighbours: Neighbours,
            calibration: Calibration | None) -> np.ndarray:
    """What the engine answers, read from the recorded layers instead of truncated forwards -> (N,) labels."""
    exit_probs = layer_probs[np.arange(len(exits)), exits]  # (N, C)
    return answer_probs(policy, exit_probs, exits, neighbours, calibration).argmax(-1)


def tune_fused(found: Neighbours, tune: _Pass, calibration: Calibration, task: Task, config: EvalConfig,
               n_layers: int) -> tuple[FusedPolicy, list[dict[str, float]]]:
    """The (beta, slack) of the grid that scores best on the tuning slice with a mean exit within the budget.

    Ties go to the shallower setting. If no setting fits the budget, the shallowest one is taken."""
    grid = [{"beta": beta, "slack": slack,
             **_policy_point(FusedPolicy(k=config.k, beta=beta, slack=slack), found, tune, task, calibration)}
            for beta in config.fused_betas for slack in config.fused_slacks]
    fits = [g for g in grid if g["mean_exit"] <= config.depth_budget * n_layers]
    best = (max(fits, key=lambda g: (round(g["score"], 9), -g["mean_exit"])) if fits
            else min(grid, key=lambda g: g["mean_exit"]))
    return FusedPolicy(k=config.k, beta=best["beta"], slack=best["slack"]), grid


def _record(backbone: Backbone, encoder: KeyEncoder, data: Dataset, config: EvalConfig, quiet: bool) -> _Pass:
    recorded = cached_layer_pass(backbone, data, config.cache_dir, quiet=quiet)
    keys = encoder.encode(data.inputs, data.task, show_progress=not quiet) if len(data) else \
        np.zeros((0, encoder.dim), np.float32)
    return _Pass(recorded.probs, recorded.states, keys, data.labels, data)


def _write(task: Task, train: Dataset, tr: _Pass, raw_db: ExitDB, wo_db: ExitDB, *, rebuild: bool) -> ExitRecords:
    """Both databases from ONE recorded pass; rows are rewritten only when a database is incomplete."""
    raw, _ = exit_records(task, "train", train, tr.layer_probs, tr.keys)
    wo = _select(raw, raw.exit_probs[:, -1] > 0)  # the full model (last layer) is right
    for db, records in ((raw_db, raw), (wo_db, wo)):
        if rebuild or db.count() != len(records):
            db.upsert(records)
            db.flush()
        else:
            log.info("%s: reusing the complete exit database %s", task.name, db.collection)
    return raw


def _select(records: ExitRecords, keep: np.ndarray) -> ExitRecords:
    return ExitRecords(records.ids[keep], records.vectors[keep], records.exit_probs[keep], records.labels[keep],
                       tuple(t for t, k in zip(records.texts, keep, strict=True) if k),
                       None if records.layer_probs is None else records.layer_probs[keep])


def _engine_mismatches(engine: BatchEngine, task: Task, data: Dataset, exits: np.ndarray,
                       preds: np.ndarray) -> int:
    """Test examples where the engine's exit layer or answer differs from the recorded-layer reading."""
    responses = []
    for start in range(0, len(data), 64):
        part = data.take(np.arange(start, min(start + 64, len(data))))
        responses += engine.classify(list(part.texts), task, pairs=part.pairs)
    got_exits = np.array([r.exit_layer for r in responses], dtype=np.int64)
    got = np.array([r.label for r in responses], dtype=np.int64)
    return int(((got_exits != exits) | (got != preds)).sum())


def _preds_at(layer_probs: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """preds[n] = argmax_c layer_probs[n, layers[n], c]: by the exactness contract, what a truncated run gives."""
    return layer_probs[np.arange(len(layers)), np.asarray(layers, dtype=np.int64)].argmax(-1)


def _policy_point(policy: Policy, found: Neighbours, t: _Pass, task: Task,
                  calibration: Calibration | None = None) -> dict[str, float]:
    layers = policy.exit_layers(found)
    preds = answers(policy, t.layer_probs, layers, found, calibration)
    return {"score": score(task, preds, t.labels), "mean_exit": float(np.mean(layers)) if len(layers) else 0.0}


def _fraction_sweep(records: ExitRecords, meta, t: _Pass, task: Task, policy: Policy,
                    config: EvalConfig) -> dict[str, dict[str, float]]:
    """Table 4: RAEE with a seeded subset of the training records as its database (same records, no rerun)."""
    out = {}
    for fraction in config.fraction_sweep:
        keep = subset_indices(len(records), fraction, config.seed)
        variant = BuildVariant(fraction=fraction, seed=config.seed)
        name = collection_name(meta, variant) + f"_n{len(records)}"
        with ExitDB(config.db_uri, collection=name, meta=meta, variant=variant) as db:
            db.upsert(_select(records, np.isin(np.arange(len(records)), keep)))
            db.flush()
            out[f"{fraction:g}"] = _policy_point(policy, db.search(t.keys, k=policy.k), t, task)
    return out


def _latency(engines: dict[str, BatchEngine], backbone: Backbone, task: Task, data: Dataset,
             config: EvalConfig) -> dict[str, dict[str, float]]:
    """End-to-end ms per example of each engine (encoder + retrieval + policy + truncated forward) and the
    full model, on the same texts in the same process, alternating repeats; medians over repeats."""
    sample = data.head(config.latency_examples)
    out: dict[str, dict[str, float]] = {}
    for batch_size in config.latency_batch_sizes:
        batches = [sample.take(np.arange(i, min(i + batch_size, len(sample))))
                   for i in range(0, len(sample), batch_size)]
        times: dict[str, list[float]] = {"full": [], **{m: [] for m in engines}}
        for _ in range(config.latency_repeats):
            start = time.perf_counter()
            for batch in batches:
                backbone.predict(batch.texts, task, backbone.n_layers, pairs=batch.pairs)
            times["full"].append(time.perf_counter() - start)
            for method, engine in engines.items():
                start = time.perf_counter()
                for batch in batches:
                    engine.classify(list(batch.texts), task, pairs=batch.pairs)
                times[method].append(time.perf_counter() - start)
        ms = {m: 1000 * float(np.median(v)) / max(len(sample), 1) for m, v in times.items()}
        row = {f"{m}_ms": round(v, 2) for m, v in ms.items()}
        row.update({f"{m}_speedup": round(ms["full"] / ms[m], 3) for m in engines if ms[m] > 0})
        out[str(batch_size)] = row
    return out
