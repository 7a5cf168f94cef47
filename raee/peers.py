"""The paper's peers (Section 4, Table 1, Appendix C) as pure decision rules, with the tuning they need.

Every exit rule turns a per-layer signal into one exit layer per example through `earliest(mask)`: the
first layer whose signal passes, or L (the full model) when none does. Layer 0 is the embedding output
and layers 1..L the blocks, as everywhere in raee; an example answers with its exit layer's distribution.

- DeeBERT: entropy of the off-ramp distribution (raee.offramps) below a threshold (`entropy_exit`).
- CALM: softmax response, top-1 minus top-2 probability of the LM-head label-word distribution, at least a
  threshold (`softmax_response_exit`); hidden-state saturation, cosine of the answer-position states of
  consecutive layers, at least a threshold (`saturation_exit`). Zero-shot at the default thresholds, or tuned.
- AdaInfer: a linear stop classifier on (top-1 probability, top-1 minus top-2 gap) per layer (`AdaInfer`).
- SLEB: no exit rule but a static set of blocks kept, chosen by greedy removal (`sleb_select`).
- HashEE: not implemented; docs/peers.md says why.

Everything fitted or tuned here (the stop classifier, thresholds, SLEB's blocks) is fitted or tuned on the
training split or a slice of it, never on test. `tune_threshold` is the one tuner for every threshold rule:
it takes the rule as a function of the threshold and the task's score function as a callable. numpy (and
scikit-learn for AdaInfer's classifier) only; no loop over examples or layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import entr, expit

# CALM's zero-shot threshold: the reference reimplementation of CALM (FREE, Bae et al., 2023, scripts/run_*.sh)
# exits on softmax response (top-1 minus top-2) above 0.9; CALM's own code calibrates it per task (LTT).
CALM_SOFTMAX_THRESHOLD = 0.9
# Neither CALM nor its reimplementations publish a fixed threshold for state saturation (only calibrated
# ones); we use the same 0.9 so the zero-shot row is defined, and report the tuned row beside it.
CALM_SATURATION_THRESHOLD = 0.9
# SLEB as the paper ran it (Appendix C): remove int(0.6 L) blocks, "since RAEE exits at about 40% layers".
SLEB_REMOVE_FRACTION = 0.6
# Two task scores closer than this are a tie (then the shallower mean exit wins).
_SCORE_TOL = 1e-12


def earliest(mask: np.ndarray) -> np.ndarray:
    """exit[n] = min{l : mask[n, l]}, or L where no layer of row n is True.

    mask (N, L+1) bool -> (N,) int64 in [0, L]."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or m.shape[1] == 0:
        raise ValueError(f"mask must be (N, L+1) with L+1 >= 1, got shape {m.shape}")
    return np.where(m.any(axis=1), np.argmax(m, axis=1), m.shape[1] - 1).astype(np.int64)


def probs_at(layer_probs: np.ndarray, exit_layers: np.ndarray) -> np.ndarray:
    """p[n, :] = layer_probs[n, exit_layers[n], :]: layer_probs (N, L+1, C), exit_layers (N,) -> (N, C)."""
    probs = _check_layer_probs(layer_probs)
    layers = np.asarray(exit_layers)
    if layers.shape != probs.shape[:1] or not np.issubdtype(layers.dtype, np.integer):
        raise ValueError(f"exit_layers must be (N,) = ({len(probs)},) ints, got {layers.dtype} {layers.shape}")
    if layers.size and (layers.min() < 0 or layers.max() >= probs.shape[1]):
        raise ValueError(f"exit_layers must lie in [0, {probs.shape[1] - 1}]")
    return np.take_along_axis(probs, layers[:, None, None], axis=1)[:, 0, :]


def predictions_at(layer_probs: np.ndarray, exit_layers: np.ndarray) -> np.ndarray:
    """pred[n] = argmax_c layer_probs[n, exit_layers[n], c] (ties: lower class) -> (N,) int64."""
    return probs_at(layer_probs, exit_layers).argmax(axis=1).astype(np.int64)


def entropy(probs: np.ndarray) -> np.ndarray:
    """H[...] = -sum_c p[..., c] log p[..., c] in nats (0 log 0 = 0): probs (..., C) -> (...), in [0, log C]."""
    return entr(np.asarray(probs, dtype=np.float64)).sum(axis=-1)


def entropy_exit(layer_probs: np.ndarray, threshold: float) -> np.ndarray:
    """DeeBERT: exit[n] = min{l : H(p[n, l]) < threshold}, or L.

    layer_probs (N, L+1, C), the off-ramps' distributions -> (N,) int64. A larger threshold never exits later."""
    return earliest(entropy(_check_layer_probs(layer_probs)) < threshold)


def softmax_response(probs: np.ndarray) -> np.ndarray:
    """CALM's softmax response: c[...] = p_(1) - p_(2), the top-1 minus the top-2 probability.

    probs (..., C) with C >= 2 -> (...), in [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[-1] < 2:
        raise ValueError(f"softmax response needs C >= 2 classes, got shape {p.shape}")
    top2 = -np.partition(-p, 1, axis=-1)[..., :2]  # (..., 2): the largest, then the second largest
    return top2[..., 0] - top2[..., 1]


def softmax_response_exit(layer_probs: np.ndarray, threshold: float = CALM_SOFTMAX_THRESHOLD) -> np.ndarray:
    """CALM: exit[n] = min{l : p_(1)[n, l] - p_(2)[n, l] >= threshold}, or L.

    layer_probs (N, L+1, C), the LM head's label-word distributions -> (N,) int64. A larger threshold never
    exits earlier. (Max-probability confidence, CALM code's other option, is raee.exit_policy.confidence_exit.)"""
    return earliest(softmax_response(_check_layer_probs(layer_probs)) >= threshold)


def state_saturation(states: np.ndarray) -> np.ndarray:
    """CALM's hidden-state saturation: s[n, l] = cos(h[n, l-1], h[n, l]) for l >= 1; s[n, 0] = -inf.

    states (N, L+1, H) at the answer position -> (N, L+1) float64 in [-1, 1] from layer 1. Layer 0 has no
    previous state, so it never saturates. A zero state has cosine 0 with anything (it never saturates)."""
    h = np.asarray(states)
    if h.ndim != 3 or h.shape[1] < 1:
        raise ValueError(f"states must be (N, L+1, H), got shape {h.shape}")
    prev, cur = h[:, :-1], h[:, 1:]  # (N, L, H) views
    dot = np.einsum("nlh,nlh->nl", prev, cur, dtype=np.float64)  # accumulated in float64, no temporary
    norms = np.sqrt(np.einsum("nlh,nlh->nl", h, h, dtype=np.float64))  # (N, L+1)
    denom = norms[:, :-1] * norms[:, 1:]
    cos = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
    return np.concatenate([np.full((len(h), 1), -np.inf), np.clip(cos, -1.0, 1.0)], axis=1)


def saturation_exit(states: np.ndarray, threshold: float = CALM_SATURATION_THRESHOLD) -> np.ndarray:
    """CALM: exit[n] = min{l >= 1 : cos(h[n, l-1], h[n, l]) >= threshold}, or L.

    states (N, L+1, H) -> (N,) int64. A larger threshold never exits earlier."""
    return earliest(state_saturation(states) >= threshold)


def candidate_thresholds(signal: np.ndarray, *, n: int = 65) -> np.ndarray:
    """Sorted unique quantiles of the finite entries of signal, plus one value below and one above them all.

    signal (...) e.g. entropy (N, L+1) on the tuning slice -> (T,) with T <= n + 2. The two extremes make
    "exit at the first layer" and "never exit early" candidates whatever the comparison's direction."""
    s = np.asarray(signal, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("signal has no finite entry to take thresholds from")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    inner = np.quantile(s, np.linspace(0.0, 1.0, n))
    return np.unique(np.concatenate([[np.nextafter(s.min(), -np.inf)], inner, [np.nextafter(s.max(), np.inf)]]))


@dataclass(frozen=True, eq=False)
class TunedThreshold:
    """The threshold chosen on a tuning slice, and every candidate's score and mean exit layer."""

    threshold: float
    score: float
    mean_exit: float
    thresholds: np.ndarray = field(repr=False)  # (T,) the candidates, in the order given
    scores: np.ndarray = field(repr=False)  # (T,)
    mean_exits: np.ndarray = field(repr=False)  # (T,) in [0, L]


def tune_threshold(
    rule: Callable[[float], np.ndarray],
    thresholds: Sequence[float] | np.ndarray,
    layer_probs: np.ndarray,
    labels: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
    *,
    max_mean_exit: float | None = None,
) -> TunedThreshold:
    """t* = argmax_t score(pred(t), labels), pred(t)[n] = argmax_c layer_probs[n, rule(t)[n], c].

    rule(t) -> (N,) exit layers of the tuning slice at threshold t (e.g. functools.partial(entropy_exit,
    tuning_layer_probs)); thresholds (T,) candidates; layer_probs (N, L+1, C) the distributions the examples
    answer with (off-ramps for DeeBERT, the LM head for CALM); labels (N,); score(preds, labels) -> float,
    higher is better (the task's metric, passed in). Ties within 1e-12 go to the smaller mean exit layer,
    then to the first candidate given. With max_mean_exit, only candidates whose mean exit layer is at most
    that count; none is a ValueError naming the shallowest mean exit reached. The tuning slice must come
    from the training split (cross-fitted probabilities for trained heads), never from test.
    """
    probs = _check_layer_probs(layer_probs)
    y = np.asarray(labels)
    if y.shape != probs.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({len(probs)},) to match layer_probs {probs.shape}, got {y.shape}")
    ts = np.asarray(thresholds, dtype=np.float64).ravel()
    if ts.size == 0:
        raise ValueError("no candidate thresholds")
    scores = np.empty(ts.size)
    mean_exits = np.empty(ts.size)
    for i, t in enumerate(ts):  # one call per candidate: the rule is the caller's, vectorised over examples
        exits = np.asarray(rule(float(t)))
        preds = predictions_at(probs, exits)
        scores[i] = float(score(preds, y))
        mean_exits[i] = exits.mean()
    if not np.isfinite(scores).all():
        raise ValueError(f"score returned a non-finite value at thresholds {ts[~np.isfinite(scores)].tolist()}")
    feasible = np.ones(ts.size, dtype=bool) if max_mean_exit is None else mean_exits <= max_mean_exit
    if not feasible.any():
        raise ValueError(f"no candidate threshold keeps the mean exit layer <= {max_mean_exit}; the shallowest "
                         f"reaches {mean_exits.min():.3f} (add candidates that exit earlier, or raise the budget)")
    best = scores[feasible].max()
    tied = np.flatnonzero(feasible & (scores >= best - _SCORE_TOL))
    pick = tied[np.argmin(mean_exits[tied])]  # argmin: the first candidate among equal mean exits
    return TunedThreshold(float(ts[pick]), float(scores[pick]), float(mean_exits[pick]), ts, scores, mean_exits)


def adainfer_features(layer_probs: np.ndarray) -> np.ndarray:
    """AdaInfer's features: f[n, l] = (p_(1)[n, l], p_(1)[n, l] - p_(2)[n, l]), "top prob" and "gap".

    layer_probs (N, L+1, C), the LM head's label-word distributions -> (N, L+1, 2) float64."""
    probs = _check_layer_probs(layer_probs)
    top = probs.max(axis=2)
    return np.stack([top, softmax_response(probs)], axis=2)


@dataclass(frozen=True, eq=False)
class AdaInfer:
    """AdaInfer's stop rule: stop at the first layer l where sigmoid(coef . f[n, l] + intercept) >= threshold.

    coef (2,) on the features of adainfer_features (top prob, gap); intercept may be +-inf for a classifier
    fitted on one class only (always / never stop). threshold 0.5 is "the classifier says stop"; another
    value trades depth for accuracy and can be tuned with tune_threshold."""

    coef: np.ndarray  # (2,) float64
    intercept: float
    threshold: float = 0.5

    def __post_init__(self) -> None:
        coef = np.array(self.coef, dtype=np.float64)
        if coef.shape != (2,) or not np.isfinite(coef).all():
            raise ValueError(f"coef must be 2 finite weights on (top prob, gap), got {coef.shape}")
        if np.isnan(self.intercept):
            raise ValueError("intercept must not be NaN")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        coef.setflags(write=False)
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "intercept", float(self.intercept))

    def stop_probs(self, layer_probs: np.ndarray) -> np.ndarray:
        """s[n, l] = sigmoid(coef . f[n, l] + intercept): layer_probs (N, L+1, C) -> (N, L+1) in [0, 1]."""
        return expit(adainfer_features(layer_probs) @ self.coef + self.intercept)

    def exit_layers(self, layer_probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """exit[n] = min{l : s[n, l] >= threshold}, or L; threshold defaults to self.threshold -> (N,) int64."""
        t = self.threshold if threshold is None else threshold
        return earliest(self.stop_probs(layer_probs) >= t)


def fit_adainfer(layer_probs: np.ndarray, labels: np.ndarray, *, l2: float = 1.0, balanced: bool = True) -> AdaInfer:
    """AdaInfer's stop classifier: logistic regression of y[n, l] = 1[argmax_c p[n, l, c] = labels[n]] on f[n, l].

    layer_probs (N, L+1, C) of training examples (the LM head's), labels (N,) -> AdaInfer. Every
    (example, layer) pair is one sample, target "this layer's prediction is correct" (argmax ties: lower
    class). balanced weights the two targets equally (sklearn's class_weight="balanced"): the share of
    correct layers runs from about 1/C to 1 across tasks, and unweighted a many-class task would almost
    never stop. l2 is sklearn's 1 / C. One target only gives a constant rule (always or never stop).
    """
    probs = _check_layer_probs(layer_probs)
    y = np.asarray(labels)
    if y.shape != probs.shape[:1] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be (N,) = ({len(probs)},) ints, got {y.dtype} {y.shape}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    features = adainfer_features(probs).reshape(-1, 2)  # (N * (L+1), 2)
    target = (probs.argmax(axis=2) == y[:, None]).ravel()  # (N * (L+1),)
    if target.all() or not target.any():
        return AdaInfer(np.zeros(2), np.inf if target.all() else -np.inf)
    from sklearn.linear_model import LogisticRegression  # deferred: only AdaInfer's fit needs scikit-learn

    clf = LogisticRegression(C=1.0 / l2, class_weight="balanced" if balanced else None)
    clf.fit(features, target)
    return AdaInfer(clf.coef_[0], float(clf.intercept_[0]))


def sleb_n_remove(n_layers: int, fraction: float = SLEB_REMOVE_FRACTION) -> int:
    """int(fraction * n_layers): the paper's SLEB setting, int(0.6 L) (18 blocks -> remove 10, keep 8)."""
    return int(fraction * n_layers)


def sleb_select(
    n_layers: int,
    n_remove: int,
    removal_cost: Callable[[tuple[int, ...]], float],
    *,
    early_barrier: int = 1,
    latter_barrier: int = 1,
) -> tuple[int, ...]:
    """SLEB's greedy removal: n_remove times, remove b* = argmin_b removal_cost(removed + (b,)); kept ascending.

    n_layers = L blocks, indexed 0..L-1 as in model.layers (block b outputs layer b+1); removal_cost(blocks)
    is the caller's cost of the model with those blocks (sorted ascending) removed, lower is better, e.g. the
    negative log-likelihood of the gold label words on training prompts. At each step the candidates are the
    kept blocks except the first early_barrier and the last latter_barrier of them (SLEB's defaults: 1 and 1,
    the first and last block are never removed); ties go to the lowest block, as SLEB's strict `<` does.
    Returns the kept blocks, ascending: L - n_remove of them.
    """
    if min(early_barrier, latter_barrier) < 0:
        raise ValueError(f"barriers must be >= 0, got early {early_barrier}, latter {latter_barrier}")
    removable = n_layers - early_barrier - latter_barrier
    if n_layers < 1 or not 0 <= n_remove <= max(removable, 0):
        raise ValueError(f"n_remove must lie in [0, {max(removable, 0)}] for {n_layers} blocks with barriers "
                         f"{early_barrier} and {latter_barrier}, got {n_remove}")
    kept = list(range(n_layers))
    removed: tuple[int, ...] = ()
    for _ in range(n_remove):  # greedy: each step depends on the previous one's choice
        candidates = kept[early_barrier:len(kept) - latter_barrier]
        costs = np.array([removal_cost(tuple(sorted((*removed, b)))) for b in candidates], dtype=np.float64)
        if not np.isfinite(costs).all():
            bad = [b for b, c in zip(candidates, costs, strict=True) if not np.isfinite(c)]
            raise ValueError(f"removal_cost is not finite when also removing block(s) {bad} after {removed}")
        block = candidates[int(np.argmin(costs))]  # argmin: the first (lowest) block among equal costs
        removed = tuple(sorted((*removed, block)))
        kept.remove(block)
    return tuple(kept)


def _check_layer_probs(layer_probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(layer_probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[1] < 1 or probs.shape[2] < 2:
        raise ValueError(f"layer_probs must be (N, L+1, C) with C >= 2, got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("layer_probs must be finite")
    return probs
