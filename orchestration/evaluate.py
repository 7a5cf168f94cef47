"""`raee eval`: the paper's Table 1 / Table 8 comparison - RAEE's policies over either exit head, the paper's
peers, the baselines - on one backbone.

Per task the training split is divided, with a seed, into a held-out tuning slice and the database examples
(`--limit-train` caps both together). Every split runs through the backbone once, recording each layer's
label distribution and answer-position state (cached on disk, orchestration/forward_cache.py). Then, for
each exit head:

- `lm` (the paper's read-out): the database examples' distributions give the calibration (training split
  only) and two exit databases, the build every policy reads (`raee` raw, `raee-cal` and `fused` through the
  calibration) and the only-correct variant ("RAEE w/o").
- `offramp`: one linear off-ramp per layer fitted on the database examples' states; their records carry
  cross-fitted distributions (off-ramps that never saw them), the tuning slice and test are read through the
  off-ramps fitted on all of them, and the database stores those off-ramps, as `raee build --head offramp`.

The tuning slice picks the fused policy's knobs (and the peers' thresholds) under the depth budget; the test
split is never used to choose anything. Every method's prediction is read from the recorded layers (the
exactness contract), and each retrieval policy also runs through the real engine (one Milvus search per
batch, truncated forwards) to check that the engine answers the same.

Peers (`peers=True`, docs/peers.md): DeeBERT (off-ramps + entropy threshold), AdaInfer (stop classifier on
the LM head's top-1 probability and gap), CALM (softmax response and state saturation, zero-shot and tuned)
and SLEB (int(0.6 L) blocks removed by SLEB's redundancy search on training prompts). Latency is timed for
every method on the same test texts in the same process, alternating repeats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import numpy as np

from collectors.build import exit_records, subset_indices
from inference_workers.engine import BatchEngine, ServedTask
from milvus.exit_db import BuildVariant, ExitDB, collection_name, setup_meta
from orchestration.forward_cache import cached_layer_pass
from orchestration.methods import ENGINE_METHODS, METHODS
from raee import peers
from raee.backbones import Backbone
from raee.calibration import Calibration, fit_calibration
from raee.exit_policy import (
    CalibratedExitPolicy,
    ConfidentPolicy,
    ExitPolicy,
    FusedPolicy,
    Policy,
    answer_probs,
    calibrated_view,
    closest,
    confidence_exit,
    entropy,
    fuse,
    knn_vote,
    oracle_exit,
)
from raee.heads import ExitHead
from raee.keys import KeyEncoder
from raee.records import ExitRecords, Neighbours
from raee.tasks import Dataset, Task, layer_stats, load_split, score

log = logging.getLogger(__name__)

__all__ = ["METHODS", "EvalConfig", "TaskResult", "evaluate_task"]

HEADS = ("lm", "offramp")
_SUFFIX = {"lm": "", "offramp": "_or"}  # method names per head: "fused" (LM head), "fused_or" (off-ramps)

Timer = Callable[[np.ndarray], object]  # runs one method on the test rows given


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
    depth_budget: float = 0.6  # tuned policies and peers may exit at most this share of the layers on average
    fused_betas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    fused_slacks: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
    curve_slacks: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)
    engine_check_examples: int | None = None  # test examples each retrieval policy runs through the engine
    cache_dir: str | None = None  # forward-pass cache (None: no cache)
    heads: tuple[str, ...] = ("lm",)  # exit heads to evaluate RAEE's policies over: "lm", "offramp"
    peers: bool = False  # also the paper's peers (DeeBERT, AdaInfer, CALM, SLEB)
    offramp_folds: int = 5
    offramp_l2: float = 1.0
    sleb_prompts: int = 32  # training prompts SLEB's redundancy search scores block removals on

    def __post_init__(self) -> None:
        unknown = set(self.heads) - set(HEADS)
        if unknown or not self.heads or "lm" not in self.heads:
            raise ValueError(f"heads must include 'lm' and may add 'offramp', got {list(self.heads)} (--heads lm or "
                             "--heads lm,offramp)")


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
    fused_params: dict[str, float] = field(default_factory=dict)  # chosen on the tuning slice (LM head)
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
    offramp: dict = field(default_factory=dict)  # head "offramp": its name, fused knobs, per-layer test scores
    peer_params: dict[str, object] = field(default_factory=dict)  # thresholds, knobs and blocks chosen

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Pass:
    """One split's recorded forward pass: every layer's label distribution and state, keys, labels."""

    layer_probs: np.ndarray  # (N, L+1, C) under the head being evaluated (the LM head's as recorded)
    states: np.ndarray  # (N, L+1, H) answer-position residual stream
    keys: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    data: Dataset

    @property
    def texts(self) -> tuple[str, ...]:
        return self.data.texts


@dataclass(frozen=True)
class _HeadView:
    """The three passes read through one exit head, and what serving it needs."""

    name: str  # "lm" | "offramp"
    head: ExitHead | None  # None: the LM head
    train: _Pass  # the database examples (off-ramps: cross-fitted distributions)
    tune: _Pass
    test: _Pass

    @property
    def suffix(self) -> str:
        return _SUFFIX[self.name]


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
    result = TaskResult(task.name, task.metric, len(train), len(test), backbone.n_layers, n_tune=len(tune))
    start = time.perf_counter()
    tr = _record(backbone, encoder, train, config, quiet)
    result.build_seconds = round(time.perf_counter() - start, 1)
    u = _record(backbone, encoder, tune, config, quiet)
    t = _record(backbone, encoder, test, config, quiet)
    ramps = None
    if "offramp" in config.heads or config.peers:
        with _stage(task, f"fitting off-ramps ({config.offramp_folds} folds and the final ones, {len(train)} "
                          "examples)"):
            ramps = _offramps(tr, u, t, task, config)
    timers: dict[str, Timer] = {"full": lambda rows: _predict(backbone, t.data, rows, backbone.n_layers)}
    with ExitStack() as stack:
        for name in config.heads:
            view = _HeadView("lm", None, tr, u, t) if name == "lm" else ramps
            with _stage(task, f"RAEE's policies over the {name} head (database, tuning, engine check)"):
                timers.update(_evaluate_head(view, task, backbone, encoder, config, result, stack,
                                             figure_dir if name == "lm" else None))
        if config.peers:
            with _stage(task, "the paper's peers (SLEB's block search runs the backbone)"):
                timers.update(_evaluate_peers(task, backbone, tr, u, t, ramps, config, result))
        with _stage(task, f"latency of {len(timers)} methods"):
            result.latency_ms = _latency(timers, t.data, config)
    return result


@contextmanager
def _stage(task: Task, what: str) -> Iterator[None]:
    """Log a long step of the evaluation and its duration: some run for minutes without a progress bar."""
    log.info("%s: %s ...", task.name, what)
    start = time.perf_counter()
    yield
    log.info("%s: %s done in %.0f s", task.name, what, time.perf_counter() - start)


def _evaluate_head(view: _HeadView, task: Task, backbone: Backbone, encoder: KeyEncoder, config: EvalConfig,
                   result: TaskResult, stack: ExitStack, figure_dir: str | None) -> dict[str, Timer]:
    """RAEE's policies (and the head's own baselines) over one exit head; returns the engines' latency timers."""
    tr, u, t, sfx = view.train, view.tune, view.test, view.suffix
    n_layers = backbone.n_layers
    calibration = fit_calibration(tr.layer_probs)  # the database examples of the training split, nothing else
    meta = setup_meta(backbone, encoder, task, head=view.head.name if view.head is not None else "lm")
    suffix = f"_n{len(tr.data)}_tune{len(u.data)}_seed{config.seed}"
    raw_db = stack.enter_context(ExitDB(config.db_uri, collection=collection_name(meta) + suffix, meta=meta,
                                        calibration=calibration))
    if raw_db.calibration is None or not np.allclose(raw_db.calibration.bias, calibration.bias):
        raise ValueError(f"{raw_db.collection} holds another calibration; rerun with rebuild=True")
    if view.head is not None:
        raw_db.put_blob("head", view.head.to_bytes())
    wo_db = None
    if view.name == "lm":
        wo = BuildVariant(only_correct=True)
        wo_db = stack.enter_context(ExitDB(config.db_uri, collection=collection_name(meta, wo) + suffix, meta=meta,
                                           variant=wo))
    records = _write(task, tr, raw_db, wo_db, rebuild=config.rebuild)
    cal_probs = calibration.apply(t.layer_probs)  # (N, L+1, C)

    found_u = raw_db.search(u.keys, k=config.k)
    fused, grid = tune_fused(calibrated_view(found_u, calibration), u, calibration, task, config, n_layers)
    policies: dict[str, Policy] = {"raee": ExitPolicy(tau=config.tau, k=config.k),
                                   "raee_cal": CalibratedExitPolicy(tau=config.tau, k=config.k), "fused": fused}
    no_confident = backbone.rule_exit_unsupported(task, view.head)  # the engine could not run it: not reported
    if no_confident is None:
        confident, confident_grid = tune_confident(found_u, u, calibration, task, config, n_layers)
        policies["confident"] = confident
        result.peer_params["confident" + sfx] = {"beta": confident.beta, "threshold": confident.threshold,
                                                "tune_score": confident_grid["score"],
                                                "tune_mean_exit": confident_grid["mean_exit"]}
    else:
        result.peer_params["confident" + sfx] = {"unavailable": no_confident}
    found = raw_db.search(t.keys, k=max((config.k, *config.k_sweep)))
    found_cal = calibrated_view(closest(found, config.k), calibration)
    exits = {"full": np.full(len(t.data), n_layers), "oracle": oracle_exit(t.layer_probs, t.labels)}
    preds = {method: _preds_at(t.layer_probs, layers) for method, layers in exits.items()}
    for method, policy in policies.items():
        nb = found_cal if policy.calibrated else found
        if method == "confident":
            exits[method] = policy.exit_layers_recorded(calibration.apply(t.layer_probs),
                                                        policy.prior(nb, task.n_classes))
        else:
            exits[method] = policy.exit_layers(nb)
        preds[method] = answers(policy, t.layer_probs, exits[method], nb, calibration if policy.calibrated else None)
    exits["full_cal"] = exits["full"]
    preds["full_cal"] = cal_probs[:, -1].argmax(-1)  # the full model with the last layer's calibration
    if view.name == "lm":
        exits["raee_wo"] = ExitPolicy(tau=config.tau, k=config.k).exit_layers(wo_db.search(t.keys, k=config.k))
        exits["confidence"] = confidence_exit(t.layer_probs, config.confidence_threshold)
        exits["fixed_trunc"] = np.full(len(t.data), round(float(exits["raee"].mean())) if len(t.data) else n_layers)
        for method in ("raee_wo", "confidence", "fixed_trunc"):
            preds[method] = _preds_at(t.layer_probs, exits[method])
    for method in exits:
        result.scores[method + sfx] = score(task, preds[method], t.labels)
        result.mean_exit[method + sfx] = float(np.mean(exits[method])) if len(t.data) else float("nan")

    served = ServedTask(task, raw_db, view.head)
    checked = [m for m in ENGINE_METHODS if m in policies]
    engines = {m + sfx: BatchEngine(backbone, encoder, {task.name: served}, {ENGINE_METHODS[m]: policies[m]},
                                    ENGINE_METHODS[m]) for m in checked}
    n_check = len(t.data) if config.engine_check_examples is None else min(config.engine_check_examples, len(t.data))
    result.engine_checked = n_check
    for m in checked:
        result.engine_mismatches[m + sfx] = _engine_mismatches(engines[m + sfx], task, t.data.head(n_check),
                                                               exits[m][:n_check], preds[m][:n_check])
    scores, shares = layer_stats(task, t.layer_probs, t.labels)
    curve = [{"slack": slack, **_policy_point(FusedPolicy(config.k, fused.beta, slack, fused.alpha), found_cal, t,
                                              task, calibration)} for slack in config.curve_slacks]
    fused_params = {"k": fused.k, "beta": fused.beta, "slack": fused.slack, "alpha": fused.alpha}
    if view.name == "offramp":
        result.offramp = {"head": view.head.name, "fused_params": fused_params, "tune_grid": grid,
                          "layer_scores": scores.tolist(), "depth_curve": curve,
                          "share_train_no_correct_layer": float(np.mean((records.exit_probs == 0).all(axis=1)))}
        if "full" not in result.scores:  # pragma: no cover - heads always include lm
            result.scores["full"] = result.scores["full_or"]
    else:
        result.share_train_no_correct_layer = float(np.mean((records.exit_probs == 0).all(axis=1)))
        result.fused_params, result.tune_grid, result.depth_curve = fused_params, grid, curve
        result.layer_scores, result.constant_share = scores.tolist(), shares.tolist()
        scores, shares = layer_stats(task, cal_probs, t.labels)
        result.layer_scores_calibrated, result.constant_share_calibrated = scores.tolist(), shares.tolist()
        knn = closest(found, config.k)
        result.scores["knn"] = score(task, knn_vote(knn.distances, knn.labels, task.n_classes).argmax(-1), t.labels)
        result.mean_exit["knn"] = 0.0
        result.exit_histogram = np.bincount(exits["raee"], minlength=n_layers + 1).tolist()
        result.fused_exit_histogram = np.bincount(exits["fused"], minlength=n_layers + 1).tolist()
        result.k_sweep = {str(k): _policy_point(ExitPolicy(tau=config.tau, k=k), closest(found, k), t, task)
                          for k in config.k_sweep}
        result.fraction_sweep = _fraction_sweep(records, meta, t, task, policies["raee"], config)
        if figure_dir:
            from orchestration.report import plot_depth_accuracy, plot_task_figures

            plot_task_figures(figure_dir, task, t.layer_probs, t.labels, found, result.exit_histogram, config.k)
            plot_depth_accuracy(figure_dir, result.to_dict())
    return {name: partial(_classify, engine, t.data) for name, engine in engines.items()}


def _offramps(tr: _Pass, u: _Pass, t: _Pass, task: Task, config: EvalConfig) -> _HeadView:
    """Off-ramps fitted on the database examples' states: cross-fitted for them, the final ones for the rest."""
    from raee.offramps import cross_fit

    fitted = cross_fit(tr.states, tr.labels, task.n_classes, n_folds=config.offramp_folds, seed=config.seed,
                       l2=config.offramp_l2)
    head = fitted.final
    return _HeadView("offramp", head, replace(tr, layer_probs=fitted.layer_probs.astype(np.float32)),
                     replace(u, layer_probs=head.layer_probs(u.states).astype(np.float32)),
                     replace(t, layer_probs=head.layer_probs(t.states).astype(np.float32)))


def _evaluate_peers(task: Task, backbone: Backbone, tr: _Pass, u: _Pass, t: _Pass, ramps: _HeadView,
                    config: EvalConfig, result: TaskResult) -> dict[str, Timer]:
    """The paper's peers, each fitted or tuned on the training split, read on test; their latency timers."""
    n_layers = backbone.n_layers
    budget = config.depth_budget * n_layers

    def metric(preds: np.ndarray, labels: np.ndarray) -> float:
        return score(task, preds, labels)

    def tuned(rule: Callable[[np.ndarray, float], np.ndarray], tune_signal: np.ndarray, tune_probs: np.ndarray,
              name: str) -> float:
        chosen = peers.tune_threshold(partial(rule, tune_signal), peers.candidate_thresholds(
            _signal_values(rule, tune_signal)), tune_probs, u.labels, metric, max_mean_exit=budget)
        result.peer_params[name] = chosen.threshold
        return chosen.threshold

    exits: dict[str, np.ndarray] = {}
    answer_probs_of: dict[str, np.ndarray] = {}
    heads: dict[str, ExitHead | None] = {}
    # DeeBERT: the off-ramps (frozen backbone), entropy threshold tuned on the slice through the final off-ramps.
    threshold = tuned(peers.entropy_exit, ramps.tune.layer_probs, ramps.tune.layer_probs, "deebert_entropy")
    exits["deebert"], answer_probs_of["deebert"], heads["deebert"] = (
        peers.entropy_exit(ramps.test.layer_probs, threshold), ramps.test.layer_probs, ramps.head)
    # AdaInfer: the stop classifier fitted on the database examples' LM-head distributions, stop where it says so.
    ada = peers.fit_adainfer(tr.layer_probs, tr.labels)
    result.peer_params["adainfer_coef"] = [float(c) for c in ada.coef] + [ada.intercept]
    exits["adainfer"] = ada.exit_layers(t.layer_probs)
    # CALM: softmax response of the LM head and saturation of the states, zero-shot and tuned on the slice.
    exits["calm_sr"] = peers.softmax_response_exit(t.layer_probs, peers.CALM_SOFTMAX_THRESHOLD)
    exits["calm_sr_tuned"] = peers.softmax_response_exit(
        t.layer_probs, tuned(peers.softmax_response_exit, u.layer_probs, u.layer_probs, "calm_sr_threshold"))
    exits["calm_sat"] = peers.saturation_exit(t.states, peers.CALM_SATURATION_THRESHOLD)
    exits["calm_sat_tuned"] = peers.saturation_exit(
        t.states, tuned(peers.saturation_exit, u.states, u.layer_probs, "calm_sat_threshold"))
    for name in ("adainfer", "calm_sr", "calm_sr_tuned", "calm_sat", "calm_sat_tuned"):
        answer_probs_of[name], heads[name] = t.layer_probs, None
    for name, layers in exits.items():
        result.scores[name] = score(task, _preds_at(answer_probs_of[name], layers), t.labels)
        result.mean_exit[name] = float(np.mean(layers))
    timers: dict[str, Timer] = {
        name: (lambda rows, e=exits[name], h=heads[name]: _predict(backbone, t.data, rows, e[rows], head=h))
        for name in exits}
    if backbone.family.name == "decoder":  # SLEB removes decoder blocks (Backbone.predict_blocks)
        kept = _sleb_blocks(backbone, task, tr, config)
        result.peer_params["sleb_kept_blocks"] = list(kept)
        probs = np.concatenate([_predict(backbone, t.data, np.arange(s, min(s + 64, len(t.data))), blocks=kept).probs
                                for s in range(0, len(t.data), 64)])
        result.scores["sleb"] = score(task, probs.argmax(-1), t.labels)
        result.mean_exit["sleb"] = float(len(kept))
        timers["sleb"] = lambda rows: _predict(backbone, t.data, rows, blocks=kept)
    return timers


def _signal_values(rule: Callable, signal: np.ndarray) -> np.ndarray:
    """The per-layer signal a threshold rule compares, for choosing candidate thresholds."""
    if rule is peers.entropy_exit:
        return peers.entropy(signal)
    if rule is peers.softmax_response_exit:
        return peers.softmax_response(signal)
    return peers.state_saturation(signal)[:, 1:]  # layer 0 has no predecessor (-inf)


def _sleb_blocks(backbone: Backbone, task: Task, tr: _Pass, config: EvalConfig) -> tuple[int, ...]:
    """SLEB's greedy removal of int(0.6 L) blocks, scored by the gold label words' NLL on training prompts."""
    rows = np.sort(np.random.default_rng(config.seed).permutation(len(tr.data))[: config.sleb_prompts])
    labels = tr.labels[rows]

    def nll(removed: tuple[int, ...]) -> float:
        kept = [b for b in range(backbone.n_layers) if b not in removed]
        probs = _predict(backbone, tr.data, rows, blocks=kept).probs
        return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))

    return peers.sleb_select(backbone.n_layers, peers.sleb_n_remove(backbone.n_layers), nll)


def _predict(backbone: Backbone, data: Dataset, rows: np.ndarray, exit_layers: np.ndarray | int | None = None, *,
             head: ExitHead | None = None, blocks: tuple[int, ...] | list[int] | None = None):
    """Backbone.predict (or predict_blocks with `blocks`) on data's rows."""
    part = data.take(np.asarray(rows))
    if blocks is not None:
        return backbone.predict_blocks(part.texts, part.task, blocks, pairs=part.pairs, head=head)
    return backbone.predict(part.texts, part.task, exit_layers, pairs=part.pairs, head=head)


def _classify(engine: BatchEngine, data: Dataset, rows: np.ndarray) -> list:
    """The engine on data's rows."""
    part = data.take(np.asarray(rows))
    return engine.classify(list(part.texts), part.task, pairs=None if part.pairs is None else list(part.pairs))


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


def tune_confident(found: Neighbours, tune: _Pass, calibration: Calibration, task: Task, config: EvalConfig,
                   n_layers: int) -> tuple[ConfidentPolicy, dict[str, float]]:
    """The (beta, threshold) that score best on the tuning slice with a mean exit within the budget (ties: the
    shallower); beta from 0 (DeeBERT's rule on the head alone) to the fused policy's grid, thresholds from the
    slice's own entropies."""
    cal_probs = calibration.apply(tune.layer_probs)  # (N, L+1, C)
    best: tuple[float, float, ConfidentPolicy] | None = None
    for beta in (0.0, *config.fused_betas):
        probe = ConfidentPolicy(k=config.k, beta=beta, threshold=0.0)
        prior = probe.prior(found, task.n_classes)
        signal = entropy(fuse(cal_probs, prior[:, None, :], beta))[:, probe.min_layer:]  # (N, L+1 - min_layer)
        candidates = peers.candidate_thresholds(signal, n=33)
        for threshold in candidates:
            policy = ConfidentPolicy(k=config.k, beta=beta, threshold=float(threshold))
            layers = policy.exit_layers_recorded(cal_probs, prior)
            mean_exit = float(layers.mean()) if len(layers) else 0.0
            if mean_exit > config.depth_budget * n_layers:
                continue
            value = score(task, answers(policy, tune.layer_probs, layers, found, calibration), tune.labels)
            key = (round(value, 9), -mean_exit)
            if best is None or key > (round(best[0], 9), -best[1]):
                best = (value, mean_exit, policy)
    if best is None:  # no setting within the budget: the earliest exits (every layer from min_layer is confident)
        policy = ConfidentPolicy(k=config.k, beta=0.0, threshold=float("inf"))
        layers = policy.exit_layers_recorded(cal_probs, policy.prior(found, task.n_classes))
        best = (score(task, answers(policy, tune.layer_probs, layers, found, calibration), tune.labels),
                float(layers.mean()), policy)
    return best[2], {"score": best[0], "mean_exit": best[1]}


def _record(backbone: Backbone, encoder: KeyEncoder, data: Dataset, config: EvalConfig, quiet: bool) -> _Pass:
    recorded = cached_layer_pass(backbone, data, config.cache_dir, quiet=quiet)
    keys = encoder.encode(data.inputs, data.task, show_progress=not quiet) if len(data) else \
        np.zeros((0, encoder.dim), np.float32)
    return _Pass(recorded.probs, recorded.states, keys, data.labels, data)


def _write(task: Task, tr: _Pass, raw_db: ExitDB, wo_db: ExitDB | None, *, rebuild: bool) -> ExitRecords:
    """The databases from ONE recorded pass; rows are rewritten only when a database is incomplete."""
    raw, _ = exit_records(task, "train", tr.data, tr.layer_probs, tr.keys)
    targets = [(raw_db, raw)]
    if wo_db is not None:
        targets.append((wo_db, _select(raw, raw.exit_probs[:, -1] > 0)))  # the full model (last layer) is right
    for db, records in targets:
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


def _latency(timers: dict[str, Timer], data: Dataset, config: EvalConfig) -> dict[str, dict[str, float]]:
    """ms per example of every method on the same test texts in the same process, alternating repeats; medians.

    "full" is the full model; retrieval policies run end to end through the engine (keys, search, policy,
    truncated forward); peers run a truncated forward to the exit layers their rules chose (their per-layer
    checks are not timed, which favours them) or, for SLEB, the kept blocks."""
    n = min(config.latency_examples, len(data))
    out: dict[str, dict[str, float]] = {}
    for batch_size in config.latency_batch_sizes:
        batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        times: dict[str, list[float]] = {m: [] for m in timers}
        for _ in range(config.latency_repeats):
            for method, run in timers.items():
                start = time.perf_counter()
                for rows in batches:
                    run(rows)
                times[method].append(time.perf_counter() - start)
        ms = {m: 1000 * float(np.median(v)) / max(n, 1) for m, v in times.items()}
        row = {f"{m}_ms": round(v, 2) for m, v in ms.items()}
        row.update({f"{m}_speedup": round(ms["full"] / ms[m], 3) for m in timers if m != "full" and ms[m] > 0})
        out[str(batch_size)] = row
    return out
