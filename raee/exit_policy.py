"""Exit policies (paper Eq. 4-6) and the baselines they are compared with, as pure numpy functions.

Every function takes batch-first arrays and returns arrays: no torch, no I/O, no global state, no Python
loop over queries, neighbours or layers. Layer 0 is the embedding output and layers 1..L are the blocks,
so a score or probability array over layers has L+1 columns. Decisions on the edge cases (no layer above
tau, exact duplicates, padding, nothing accumulated, ties) are explained in docs/exit-policy.md.

Policies register by name in POLICIES: "raee" (the paper), "raee-cal" (the same over the calibrated view),
"fused" (calibrated layer x neighbour vote) and "confident" (an entropy exit on that fusion, decided during the
forward); docs/exit-policies.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Protocol

import numpy as np

from raee.calibration import Calibration
from raee.records import Neighbours

# Float rounding that a distance of an exact duplicate carries (1 - cos in float32 gives -1.2e-7; Milvus'
# squared L2 of a stored key against itself gives 0 or ~1e-7 depending on the query batch). Distances in
# [-_DUPLICATE_ATOL, 0) count as 0; anything more negative is a caller bug. A positive distance counts as 0
# when it is within _DUPLICATE_RTOL of the row's largest valid distance (relative, so scaling all distances
# never changes which neighbours are duplicates), or below _DUPLICATE_FLOOR: a row of nothing but duplicates
# (MPQA's test "wants" has 20 in train) has no larger distance to be relative to, and its ~1e-12 rounding
# noise, which differs with the query's batch, would otherwise weight the duplicates differently per batch.
_DUPLICATE_ATOL = 1e-5
_DUPLICATE_RTOL = 1e-5
_DUPLICATE_FLOOR = 1e-6
# Scores are summed in float64; two layers whose scores agree to this relative tolerance are a tie
# (earliest wins), so summation order (a permutation of the neighbours) can never change the exit.
_TIE_RTOL = 1e-9
# Probabilities are floored here before a log, so a zero never turns a product of experts into NaN.
_LOG_FLOOR = 1e-12


def exit_sets(layer_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Alg. 3.1's exit set: e[..., l] = p[..., l, y] if argmax_c p[..., l, c] = y else 0.

    layer_probs (..., L+1, C), labels (...) ints, -1 for padding -> (..., L+1) float32, 0 for padding rows.
    argmax ties go to the lower class."""
    probs = np.asarray(layer_probs)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.shape[:-2] != labels.shape:
        raise ValueError(f"layer_probs {probs.shape} and labels {labels.shape} disagree on the leading dimensions")
    safe = np.maximum(labels, 0)[..., None, None]  # padding reads class 0, then is zeroed
    gold = np.take_along_axis(probs, np.broadcast_to(safe, (*labels.shape, probs.shape[-2], 1)), axis=-1)[..., 0]
    correct = (probs.argmax(axis=-1) == labels[..., None]) & (labels[..., None] >= 0)  # (..., L+1)
    return np.where(correct, gold, 0.0).astype(np.float32)


def calibrated_view(neighbours: Neighbours, calibration: Calibration | None) -> Neighbours:
    """The neighbours as a calibrated database would hold them: layer distributions calibrated, exit sets redone.

    One stored build serves the raw policy (the paper's) and the calibrated ones (raee-cal, fused)."""
    if neighbours.layer_probs is None:
        raise ValueError("calibrated policies need the neighbours' per-layer label distributions; this exit "
                         "database does not store them: rebuild it with `raee build`")
    if calibration is None:
        raise ValueError("this exit database stores no calibration, which the calibrated policies (raee-cal, fused) "
                         "need: rebuild it with `raee build`, or use --policy raee")
    shape = neighbours.layer_probs.shape  # (N, K, L+1, C)
    valid = neighbours.valid[..., None, None]
    filled = np.where(valid, neighbours.layer_probs, 1.0)  # padding rows are all 0: keep the division defined
    probs = calibration.apply(filled.reshape(-1, *shape[2:])).reshape(shape)
    probs = np.where(valid, probs, 0.0).astype(np.float32)
    return replace(neighbours, layer_probs=probs, exit_probs=exit_sets(probs, neighbours.labels))


def neighbour_weights(distances: np.ndarray, *, valid: np.ndarray | None = None) -> np.ndarray:
    """Eq. 5: w[n, i] = min_j d[n, j] / d[n, i] over valid j; 1 where d[n, i] is the min, 0 where padded.

    distances (N, K) non-negative, smaller is closer; valid (N, K) bool or None -> (N, K) float64 in [0, 1].
    A neighbour is padding where valid is False or its distance is +inf. When the closest distance is 0
    (exact duplicates), the duplicates get weight 1 and every other neighbour 0: the limit of min/d as the
    closest distance goes to 0.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"distances must be (N, K), got shape {d.shape}")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    if (d < -_DUPLICATE_ATOL).any():
        raise ValueError(
            f"distances must be non-negative (smallest is {d.min():.3g}); convert similarities to distances "
            "first, e.g. 1 - cos clipped at 0"
        )
    d = np.maximum(d, 0.0)  # rounding below 0 on exact duplicates
    ok = np.isfinite(d)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != d.shape:
            raise ValueError(f"valid has shape {valid.shape}, distances {d.shape}")
        ok &= valid
    scale = np.where(ok, d, 0.0).max(axis=1, keepdims=True) if d.shape[1] else np.zeros((d.shape[0], 1))
    d = np.where(d <= np.maximum(_DUPLICATE_RTOL * scale, _DUPLICATE_FLOOR), 0.0, d)  # rounding on duplicates
    d = np.where(ok, d, np.inf)  # (N, K) padding sits at +inf
    d_min = d.min(axis=1, keepdims=True) if d.shape[1] else np.full((d.shape[0], 1), np.inf)  # (N, 1)
    # d == d_min gives exactly 1 (this also settles 0/0 for duplicates); elsewhere min/d, and 0 for
    # padding (finite/inf = 0). Divide only where the ratio is defined so no warning is raised.
    ratio = np.divide(d_min, d, out=np.zeros_like(d), where=ok & (d > 0))
    return np.where(ok & (d == d_min), 1.0, ratio)


def layer_scores(
    distances: np.ndarray,
    exit_probs: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    tau: float = 0.9,
    fallback_top: int = 3,
) -> np.ndarray:
    """Eq. 4-6: s[n, l] = sum_i w[n, i] * p[n, i, l] * m[n, i, l], w of Eq. 5, m the selected layers.

    distances (N, K), exit_probs (N, K, L+1) gold-label prob, 0 where wrong, valid (N, K) or None -> (N, L+1).
    m[n, i, l] = 1[p > 0 and p >= tau]. A neighbour with no such layer instead selects its `fallback_top`
    most confident correct layers (ties: earliest layer), as the authors' code does; fallback_top=0 turns
    the fallback off. Padded neighbours contribute nothing; a row where nothing accumulates is all zeros.
    """
    p = np.asarray(exit_probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[:2] != np.shape(distances):
        raise ValueError(f"exit_probs must be (N, K, L+1) to match distances {np.shape(distances)}, "
                         f"got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("exit_probs must be finite and non-negative (0 where the layer is wrong)")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if fallback_top < 0:
        raise ValueError(f"fallback_top must be >= 0, got {fallback_top}")

    w = neighbour_weights(distances, valid=valid)  # (N, K)
    correct = p > 0  # (N, K, L+1): the build stores 0 exactly where a layer is wrong
    confident = correct & (p >= tau)  # (N, K, L+1)
    has_confident = confident.any(axis=2, keepdims=True)  # (N, K, 1)
    # Rank layers by descending probability; the stable sort keeps the earlier layer first on ties.
    order = np.argsort(-p, axis=2, kind="stable")  # (N, K, L+1) layer indices, best first
    rank = np.argsort(order, axis=2, kind="stable")  # (N, K, L+1) rank of each layer
    fallback = correct & (rank < fallback_top)  # (N, K, L+1)
    selected = np.where(has_confident, confident, fallback)  # (N, K, L+1)
    return np.einsum("nk,nkl->nl", w, np.where(selected, p, 0.0))


def choose_exit_layers(scores: np.ndarray, *, n_layers: int) -> np.ndarray:
    """Eq. 4: exit[n] = min{l : s[n, l] = max_l' s[n, l']}, or n_layers (the full model) where s[n] is all 0.

    scores (N, L+1) non-negative, n_layers = L -> (N,) int64 in [0, L]. Scores equal to the row maximum
    up to a relative 1e-9 count as tied, so float summation order cannot move the exit.
    """
    s = np.asarray(scores, dtype=np.float64)
    if n_layers < 0 or s.ndim != 2 or s.shape[1] != n_layers + 1:
        raise ValueError(f"scores must be (N, n_layers+1) = (N, {n_layers + 1}), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    best = s.max(axis=1, keepdims=True)  # (N, 1)
    near_best = s >= best * (1.0 - _TIE_RTOL)  # (N, L+1) ties within rounding
    first = np.argmax(near_best, axis=1)  # argmax of bools: the earliest True
    return np.where(best[:, 0] > 0, first, n_layers).astype(np.int64)


class Policy(Protocol):
    """What the inference engine needs from an exit policy.

    k: neighbours to retrieve; calibrated: whether it needs a calibrated exit database (records' exit sets
    and layer distributions calibrated, the calibration stored with the collection); exit_layers: one exit
    per query from its neighbours; final_probs: the label distribution to answer with, from the
    (calibrated, when `calibrated`) distribution at the exit layer and the same neighbours.
    """

    @property
    def k(self) -> int: ...

    @property
    def calibrated(self) -> bool: ...

    def exit_layers(self, neighbours: Neighbours) -> np.ndarray: ...

    def final_probs(self, exit_probs: np.ndarray, neighbours: Neighbours) -> np.ndarray: ...


@dataclass(frozen=True)
class ExitPolicy:
    """RAEE's policy: retrieve k neighbours, score layers by Eq. 4-6, exit at the best (earliest on ties)."""

    tau: float = 0.9
    k: int = 12
    fallback_top: int = 3
    calibrated: bool = field(default=False, init=False)  # reads the raw exit sets, as the paper does

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {self.tau}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.fallback_top < 0:
            raise ValueError(f"fallback_top must be >= 0, got {self.fallback_top}")

    def exit_layers(self, neighbours: Neighbours) -> np.ndarray:
        """exit[n] = choose_exit_layers(layer_scores(k nearest neighbours of query n)).

        neighbours with K columns and exit_probs (N, K, L+1) -> (N,) int64 in [0, L]. When K > k only the k
        closest valid neighbours of each row are used; K < k (short results, padding) is fine.
        """
        nb = closest(neighbours, self.k)
        distances, exit_probs, valid = nb.distances, nb.exit_probs, nb.valid
        scores = layer_scores(distances, exit_probs, valid=valid,
                              tau=self.tau, fallback_top=self.fallback_top)  # (N, L+1)
        return choose_exit_layers(scores, n_layers=exit_probs.shape[2] - 1)

    def final_probs(self, exit_probs: np.ndarray, neighbours: Neighbours) -> np.ndarray:
        """The paper answers with the exit layer's own distribution."""
        return np.asarray(exit_probs, dtype=np.float64)


@dataclass(frozen=True)
class CalibratedExitPolicy(ExitPolicy):
    """Eq. 4-6 unchanged, over a calibrated database: exit sets and the answer use calibrated distributions."""

    calibrated: bool = field(default=True, init=False)


def knn_prior(
    weights: np.ndarray, labels: np.ndarray, n_classes: int, *, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed neighbour label distributions: the query's, and each neighbour's leave-one-out one.

    weights (N, K) from Eq. 5 (0 for padding), labels (N, K) -> prior (N, C) and loo (N, K, C) with
    prior[n, c] = (v[n, c] + alpha) / (sum_c v[n, c] + C alpha), v[n, c] = sum_i w[n, i] 1[y[n, i] = c],
    and loo[n, i] the same with neighbour i's own vote taken out (how its neighbourhood, the query's other
    neighbours, would have voted for it without seeing its label).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (it keeps log-priors finite), got {alpha}")
    w = np.asarray(weights, dtype=np.float64)
    onehot = (np.asarray(labels)[..., None] == np.arange(n_classes)) & (w[..., None] > 0)  # (N, K, C)
    own = w[..., None] * onehot  # (N, K, C) each neighbour's vote
    votes = own.sum(axis=1)  # (N, C)
    prior = (votes + alpha) / (votes.sum(axis=1, keepdims=True) + n_classes * alpha)
    loo_votes = votes[:, None, :] - own  # (N, K, C)
    loo = (loo_votes + alpha) / (loo_votes.sum(axis=2, keepdims=True) + n_classes * alpha)
    return prior, loo


def fuse(layer_probs: np.ndarray, prior: np.ndarray, beta: float) -> np.ndarray:
    """f[..., c] proportional to p[..., c] * prior[..., c] ** beta: a product of experts, beta the prior's weight.

    layer_probs (..., C) and prior broadcastable to it -> (..., C), rows sum to 1. beta = 0 is the layer
    alone; large beta tends to the neighbours' vote."""
    logits = np.log(np.maximum(layer_probs, _LOG_FLOOR)) + beta * np.log(np.maximum(prior, _LOG_FLOOR))
    logits -= logits.max(axis=-1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=-1, keepdims=True)


def fused_reliability(weights: np.ndarray, labels: np.ndarray, layer_probs: np.ndarray, *, beta: float,
                      alpha: float = 1.0) -> np.ndarray:
    """r[n, l]: weighted share of the query's neighbours whose fused prediction at layer l is their label.

    weights (N, K) (Eq. 5, 0 for padding), labels (N, K), layer_probs (N, K, L+1, C) the neighbours'
    (calibrated) label distributions per layer -> (N, L+1) in [0, 1]; all 0 where no neighbour is valid.
    Each neighbour is fused with its leave-one-out prior, so its own label never votes for itself.
    """
    p = np.asarray(layer_probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if p.ndim != 4 or p.shape[:2] != w.shape:
        raise ValueError(f"layer_probs must be (N, K, L+1, C) to match weights {w.shape}, got {p.shape}")
    _, loo = knn_prior(w, labels, p.shape[3], alpha=alpha)  # (N, K, C)
    fused = fuse(p, loo[:, :, None, :], beta)  # (N, K, L+1, C)
    correct = fused.argmax(axis=3) == np.asarray(labels)[..., None]  # (N, K, L+1); ties -> lower class
    total = w.sum(axis=1, keepdims=True)  # (N, 1)
    hits = np.einsum("nk,nkl->nl", w, correct.astype(np.float64))
    return np.divide(hits, total, out=np.zeros_like(hits), where=total > 0)


def earliest_reliable_layer(reliability: np.ndarray, *, slack: float) -> np.ndarray:
    """exit[n] = min{l : r[n, l] >= max_l r[n, l] - slack}; the full model L where r[n] is all 0.

    reliability (N, L+1) in [0, 1] -> (N,) int64. slack = 0 is the earliest of the most reliable layers;
    a larger slack accepts a less reliable layer for an earlier exit (the depth-accuracy knob)."""
    r = np.asarray(reliability, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"reliability must be (N, L+1), got shape {r.shape}")
    if not 0.0 <= slack <= 1.0:
        raise ValueError(f"slack must lie in [0, 1], got {slack}")
    best = r.max(axis=1, keepdims=True)  # (N, 1)
    good = r >= best - slack - _TIE_RTOL  # (N, L+1)
    first = np.argmax(good, axis=1)
    return np.where(best[:, 0] > 0, first, r.shape[1] - 1).astype(np.int64)


@dataclass(frozen=True)
class FusedPolicy:
    """Calibrated layer x neighbour vote: exit at the earliest layer whose fused prediction is (nearly) as
    reliable among the retrieved neighbours as the best layer's, and answer with the fused distribution.

    beta weighs the neighbours' vote against the layer, slack trades accuracy for depth, alpha smooths the
    vote. See docs/exit-policies.md for the maths and how the defaults were chosen.
    """

    k: int = 12
    beta: float = 1.0  # defaults: the medians of the values tuned per task in docs/results.md, section 3
    slack: float = 0.02
    alpha: float = 1.0
    calibrated: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.slack <= 1.0:
            raise ValueError(f"slack must lie in [0, 1], got {self.slack}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")

    def reliability(self, neighbours: Neighbours) -> np.ndarray:
        """(N, L+1) fused_reliability over the k closest valid neighbours."""
        nb = closest(neighbours, self.k)
        if nb.layer_probs is None:
            raise ValueError("the fused policy needs the neighbours' per-layer label distributions; this exit "
                             "database does not store them (built before schema 2): rebuild it")
        w = neighbour_weights(nb.distances, valid=nb.valid)
        return fused_reliability(w, nb.labels, nb.layer_probs, beta=self.beta, alpha=self.alpha)

    def exit_layers(self, neighbours: Neighbours) -> np.ndarray:
        return earliest_reliable_layer(self.reliability(neighbours), slack=self.slack)

    def final_probs(self, exit_probs: np.ndarray, neighbours: Neighbours) -> np.ndarray:
        """fuse(exit-layer distribution, the query's neighbour prior): (N, C) -> (N, C)."""
        nb = closest(neighbours, self.k)
        probs = np.asarray(exit_probs, dtype=np.float64)
        w = neighbour_weights(nb.distances, valid=nb.valid)
        prior, _ = knn_prior(w, nb.labels, probs.shape[1], alpha=self.alpha)
        return fuse(probs, prior, self.beta)


def entropy(probs: np.ndarray) -> np.ndarray:
    """H[...] = -sum_c p[..., c] log p[..., c] in nats (0 log 0 = 0): probs (..., C) -> (...)."""
    p = np.asarray(probs, dtype=np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


@dataclass(frozen=True)
class ConfidentPolicy:
    """Exit at the first layer whose answer is confident - the layer's (calibrated) distribution fused with the
    neighbours' vote has entropy <= threshold - and answer with that fusion.

    beta = 0 is DeeBERT's entropy exit on the example alone; the neighbours' vote (beta > 0) sharpens the answer
    where they agree (an earlier exit) and blurs it where they disagree (a later one). The exit is decided during
    the forward (the engine's dynamic exit, Backbone.predict_until), from min_layer on; L when no layer is
    confident. With trained off-ramps (`--head offramp`) this is RAEE absorbing DeeBERT (docs/exit-policies.md)."""

    k: int = 12
    beta: float = 1.0
    threshold: float = 0.3  # nats; tune it per task (raee eval), it depends on the number of classes
    alpha: float = 1.0
    min_layer: int = 1
    calibrated: bool = field(default=True, init=False)
    dynamic: ClassVar[bool] = True  # decided during the forward: the engine calls prior/stops, not exit_layers

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.beta < 0 or self.threshold < 0 or self.alpha <= 0 or self.min_layer < 0:
            raise ValueError(f"need beta >= 0, threshold >= 0, alpha > 0 and min_layer >= 0, got {self}")

    def prior(self, neighbours: Neighbours, n_classes: int) -> np.ndarray:
        """pi[n, c]: the smoothed vote of the k closest valid neighbours (knn_prior) -> (N, C)."""
        nb = closest(neighbours, self.k)
        return knn_prior(neighbour_weights(nb.distances, valid=nb.valid), nb.labels, n_classes, alpha=self.alpha)[0]

    def stops(self, layer_probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """stop[n] = H(fuse(p[n], pi[n], beta)) <= threshold: probs (n, C), prior (n, C) -> (n,) bool."""
        return entropy(fuse(layer_probs, prior, self.beta)) <= self.threshold

    def exit_layers_recorded(self, layer_probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """The exits the engine reaches, read from recorded layers: the first l >= min_layer that stops, else L.

        layer_probs (N, L+1, C) (calibrated when the policy is), prior (N, C) -> (N,) int64."""
        fused = fuse(np.asarray(layer_probs, dtype=np.float64), np.asarray(prior)[:, None, :], self.beta)
        confident = entropy(fused) <= self.threshold  # (N, L+1)
        confident[:, : self.min_layer] = False
        n_layers = confident.shape[1] - 1
        return np.where(confident.any(axis=1), np.argmax(confident, axis=1), n_layers).astype(np.int64)

    def exit_layers(self, neighbours: Neighbours) -> np.ndarray:
        raise TypeError("the confident policy decides each exit during the forward from the layer's own "
                        "distribution: use exit_layers_recorded(layer_probs, prior), or the engine")

    def final_probs(self, exit_probs: np.ndarray, neighbours: Neighbours) -> np.ndarray:
        """fuse(exit-layer distribution, the neighbours' vote): (N, C) -> (N, C)."""
        probs = np.asarray(exit_probs, dtype=np.float64)
        return fuse(probs, self.prior(neighbours, probs.shape[1]), self.beta)


def closest(neighbours: Neighbours, k: int) -> Neighbours:
    """The k closest valid neighbours of each row (padding sorts last; stable among equal distances)."""
    if neighbours.distances.shape[1] <= k:
        return neighbours
    keyed = np.where(neighbours.valid, np.asarray(neighbours.distances, dtype=np.float64), np.inf)  # (N, K)
    keep = np.argsort(keyed, axis=1, kind="stable")[:, :k]  # (N, k)

    def take(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        return np.take_along_axis(a, keep.reshape(keep.shape + (1,) * (a.ndim - 2)), axis=1)

    texts = None if neighbours.texts is None else tuple(
        tuple(row[j] for j in cols) for row, cols in zip(neighbours.texts, keep.tolist(), strict=True))
    return Neighbours(take(neighbours.ids), take(neighbours.distances), take(neighbours.exit_probs),
                      take(neighbours.labels), texts, take(neighbours.layer_probs))


def answer_probs(policy: Policy, exit_probs: np.ndarray, exit_layers: np.ndarray, neighbours: Neighbours,
                 calibration: Calibration | None) -> np.ndarray:
    """The policy's answer: its final_probs of the exit layer's distribution, calibrated at that layer first
    when the database is (the correction its exit sets were computed with). (N, C), (N,) -> (N, C)."""
    if calibration is not None:
        exit_probs = calibration.apply_at(exit_probs, exit_layers)
    return policy.final_probs(exit_probs, neighbours)


# Policies by name, for configs and the CLI: name -> a constructor taking the policy's keyword parameters.
POLICIES: dict[str, type[Policy]] = {"raee": ExitPolicy, "raee-cal": CalibratedExitPolicy, "fused": FusedPolicy,
                                     "confident": ConfidentPolicy}
DEFAULT_POLICY = "fused"  # the best measured (docs/results.md); "raee" is the paper's


def all_policies(**knobs: float | None) -> dict[str, Policy]:
    """Every registered policy, each given the knobs it accepts (k, tau, beta, slack, ...; None = its default)."""
    return {name: get_policy(name, **policy_kwargs(name, **knobs)) for name in POLICIES}


def get_policy(name: str, **params: object) -> Policy:
    """POLICIES[name](**params), with an error naming the known policies or the accepted parameters."""
    if name not in POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    make = POLICIES[name]
    accepted = _parameters(make)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}")
    return make(**params)


def policy_parameters(name: str) -> set[str]:
    """The keyword parameters policy `name` accepts (for CLI and config validation)."""
    if name not in POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    return _parameters(POLICIES[name])


def policy_kwargs(name: str, **values: float | None) -> dict[str, float]:
    """The values policy `name` accepts, None dropped: one set of CLI options (k, tau, beta, slack) serves all."""
    accepted = policy_parameters(name)
    return {key: value for key, value in values.items() if key in accepted and value is not None}


def _parameters(make: type[Policy]) -> set[str]:
    return {f.name for f in fields(make) if f.init}


def knn_vote(
    distances: np.ndarray, labels: np.ndarray, n_classes: int, *, valid: np.ndarray | None = None
) -> np.ndarray:
    """kNN baseline: p[n, c] = sum_i w[n, i] 1[labels[n, i] = c] / sum_i w[n, i], w as in Eq. 5.

    distances (N, K), labels (N, K) ints in [0, C) where valid (padding ignored) -> (N, C), rows sum to 1.
    A row with no valid neighbour gets the uniform distribution 1/C.
    """
    w = neighbour_weights(distances, valid=valid)  # (N, K)
    labels = np.asarray(labels)
    if labels.shape != w.shape:
        raise ValueError(f"labels must match distances {w.shape}, got {labels.shape}")
    used = w > 0
    if ((labels < 0) | (labels >= n_classes))[used].any():
        raise ValueError(f"labels of valid neighbours must lie in [0, {n_classes})")
    onehot = labels[..., None] == np.arange(n_classes)  # (N, K, C)
    votes = np.einsum("nk,nkc->nc", w, onehot.astype(np.float64))  # (N, C)
    total = votes.sum(axis=1, keepdims=True)  # (N, 1); > 0 whenever a neighbour is valid (closest has w=1)
    return np.divide(votes, total, out=np.full_like(votes, 1.0 / n_classes), where=total > 0)


def confidence_exit(layer_probs: np.ndarray, threshold: float) -> np.ndarray:
    """Confidence baseline: exit[n] = min{l : max_c p[n, l, c] >= threshold}, or L if no layer reaches it.

    layer_probs (N, L+1, C) label probabilities per layer -> (N,) int64 in [0, L].
    """
    probs = np.asarray(layer_probs)
    if probs.ndim != 3:
        raise ValueError(f"layer_probs must be (N, L+1, C), got shape {probs.shape}")
    n_layers = probs.shape[1] - 1
    confident = probs.max(axis=2) >= threshold  # (N, L+1)
    return np.where(confident.any(axis=1), np.argmax(confident, axis=1), n_layers).astype(np.int64)


def oracle_exit(layer_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Oracle upper bound: exit[n] = min{l : argmax_c p[n, l, c] = labels[n]}, or L if no layer is correct.

    layer_probs (N, L+1, C), labels (N,) ints -> (N,) int64 in [0, L]. argmax ties go to the lower class,
    as np.argmax (and the build's correctness test) does.
    """
    probs = np.asarray(layer_probs)
    labels = np.asarray(labels)
    if probs.ndim != 3 or labels.shape != probs.shape[:1]:
        raise ValueError(f"need layer_probs (N, L+1, C) and labels (N,), got {probs.shape}, {labels.shape}")
    n_layers = probs.shape[1] - 1
    correct = np.argmax(probs, axis=2) == labels[:, None]  # (N, L+1)
    return np.where(correct.any(axis=1), np.argmax(correct, axis=1), n_layers).astype(np.int64)
