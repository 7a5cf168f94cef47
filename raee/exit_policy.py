"""Exit policies (paper Eq. 4-6) and the baselines they are compared with, as pure numpy functions.

Every function takes batch-first arrays and returns arrays: no torch, no I/O, no global state, no Python
loop over queries, neighbours or layers. Layer 0 is the embedding output and layers 1..L are the blocks,
so a score or probability array over layers has L+1 columns. Decisions on the edge cases (no layer above
tau, exact duplicates, padding, nothing accumulated, ties) are explained in docs/exit-policy.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from raee.records import Neighbours

# Float rounding that a distance of an exact duplicate may carry (e.g. 1 - cos computed in float32 is
# -1.2e-7). Distances in [-_DUPLICATE_ATOL, 0) count as 0; anything more negative is a caller bug.
_DUPLICATE_ATOL = 1e-5
# Scores are summed in float64; two layers whose scores agree to this relative tolerance are a tie
# (earliest wins), so summation order (a permutation of the neighbours) can never change the exit.
_TIE_RTOL = 1e-9


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
    """What the inference engine needs from an exit policy: how many neighbours, and the exit layers."""

    @property
    def k(self) -> int: ...

    def exit_layers(self, neighbours: Neighbours) -> np.ndarray: ...


@dataclass(frozen=True)
class ExitPolicy:
    """RAEE's policy: retrieve k neighbours, score layers by Eq. 4-6, exit at the best (earliest on ties)."""

    tau: float = 0.9
    k: int = 12
    fallback_top: int = 3

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
        distances, exit_probs, valid = neighbours.distances, neighbours.exit_probs, neighbours.valid
        if distances.shape[1] > self.k:
            # Padding sorts last (+inf); the stable sort keeps retrieval order among equal distances.
            keyed = np.where(valid, np.asarray(distances, dtype=np.float64), np.inf)  # (N, K)
            keep = np.argsort(keyed, axis=1, kind="stable")[:, : self.k]  # (N, k)
            distances = np.take_along_axis(distances, keep, axis=1)
            valid = np.take_along_axis(valid, keep, axis=1)
            exit_probs = np.take_along_axis(exit_probs, keep[..., None], axis=1)
        scores = layer_scores(distances, exit_probs, valid=valid,
                              tau=self.tau, fallback_top=self.fallback_top)  # (N, L+1)
        return choose_exit_layers(scores, n_layers=exit_probs.shape[2] - 1)


# Policies by name, for configs and the CLI; later policies register here.
POLICIES: dict[str, type[Policy]] = {"raee": ExitPolicy}


def get_policy(name: str, **params: object) -> Policy:
    """POLICIES[name](**params), with an error naming the known policies or the accepted parameters."""
    if name not in POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    accepted = {f.name for f in fields(cls)} if hasattr(cls, "__dataclass_fields__") else None
    unknown = sorted(set(params) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}")
    return cls(**params)


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
