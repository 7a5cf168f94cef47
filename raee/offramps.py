"""Trained off-ramps: one multinomial logistic regression per layer on the answer-position residual stream.

DeeBERT's off-ramps (Xin et al., 2020) as the RAEE paper ran them (Appendix C): the backbone frozen and a
linear classifier per layer trained on the task's training split. Off-ramp l reads x[n, l], the state leaving
layer l at the answer position (layer 0 = embeddings), standardised with the training split's per-feature
mean and scale:

    p[n, l, :] = softmax(((x[n, l] - mean[l]) / scale[l]) @ weight[l] + bias[l])

and is fitted by minimising sum_n CE(p[n, l], y[n]) + (l2 / 2) ||weight[l]||^2 (the bias is not penalised).
`OffRamps` is an `ExitHead` (raee.heads), stored as safetensors and named by a digest of its weights, so an
exit database built with one set of off-ramps refuses another. `cross_fit` gives every training example the
probabilities of off-ramps that never saw it (what thresholds are tuned on, raee.peers) together with the
`final` off-ramps fitted on the whole training split (what serving uses). numpy and scipy only; see
docs/peers.md.
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save
from scipy.optimize import minimize

# A feature whose standard deviation is below this fraction of the layer's RMS state entry is (nearly)
# constant: layer 0 is the embedding of the prompt's last token, the same for every input. Its scale is
# floored there instead of dividing float noise up to unit variance.
_SCALE_FLOOR = 1e-4
# L-BFGS stops when every gradient entry of the per-example objective is below this (or at max_iter).
_GTOL = 1e-6
# Curvature of the softmax cross-entropy per unit feature variance used to precondition the fit: the
# logistic loss's largest second derivative, p (1 - p) <= 1/4.
_CURVATURE = 0.25
_TENSORS = ("mean", "scale", "weight", "bias")
_FORMAT = "raee.offramps/1"


@dataclass(frozen=True, eq=False)
class OffRamps:
    """Per-layer standardisation and linear softmax classifier: an ExitHead fitted on a task's training split.

    mean, scale (L+1, H): the training split's per-feature mean and (floored) standard deviation per layer;
    weight (L+1, H, C), bias (L+1, C): the classifier on the standardised state. A class absent from the
    training labels has weight 0 and bias -inf: probability exactly 0, never predicted, rows still sum to 1.
    """

    mean: np.ndarray  # (L+1, H) float64
    scale: np.ndarray  # (L+1, H) float64, > 0
    weight: np.ndarray  # (L+1, H, C) float64
    bias: np.ndarray  # (L+1, C) float64, finite or -inf

    def __post_init__(self) -> None:
        arrays = {key: np.array(getattr(self, key), dtype=np.float64) for key in _TENSORS}
        mean, scale, weight, bias = (arrays[key] for key in _TENSORS)
        if mean.ndim != 2 or scale.shape != mean.shape:
            raise ValueError(f"mean and scale must both be (L+1, H), got {mean.shape} and {scale.shape}")
        if weight.ndim != 3 or weight.shape[:2] != mean.shape or weight.shape[2] < 2:
            raise ValueError(f"weight must be (L+1, H, C) = {(*mean.shape, 'C')} with C >= 2, got {weight.shape}")
        if bias.shape != (weight.shape[0], weight.shape[2]):
            raise ValueError(f"bias must be (L+1, C) = {(weight.shape[0], weight.shape[2])}, got {bias.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and np.isfinite(weight).all()):
            raise ValueError("off-ramp mean, scale and weight must be finite")
        if (scale <= 0).any():
            raise ValueError("off-ramp scale must be > 0")
        if np.isnan(bias).any() or (bias == np.inf).any() or not np.isfinite(bias).any(axis=1).all():
            raise ValueError("off-ramp bias must be finite or -inf, with a finite entry on every layer")
        for key, value in arrays.items():
            value.setflags(write=False)  # frozen weights: the digest in `name` stays true
            object.__setattr__(self, key, value)

    @property
    def n_layers(self) -> int:
        """L: off-ramps exist for layers 0..L."""
        return self.weight.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def n_classes(self) -> int:
        return self.weight.shape[2]

    @cached_property
    def name(self) -> str:
        """'offramp:' + the first 12 hex digits of sha256 over the tensors' shapes and float64 bytes."""
        digest = hashlib.sha256(_FORMAT.encode())
        for key in _TENSORS:
            value = getattr(self, key)
            digest.update(f"{key}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value, dtype="<f8").tobytes())
        return "offramp:" + digest.hexdigest()[:12]

    def probs(self, layer_idx: int, states: np.ndarray) -> np.ndarray:
        """p[n, c] = softmax((x[n] - mean[l]) / scale[l] @ weight[l] + bias[l])[c] at l = layer_idx.

        states (n, H) leaving layer layer_idx (0 = embeddings) -> (n, C) float64, rows sum to 1."""
        layer = operator.index(layer_idx)
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer_idx must lie in [0, {self.n_layers}], got {layer}")
        x = np.asarray(states, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"states must be (n, H) = (n, {self.hidden_size}), got shape {x.shape}")
        z = ((x - self.mean[layer]) / self.scale[layer]) @ self.weight[layer] + self.bias[layer]  # (n, C)
        return _softmax(z)

    def layer_probs(self, states: np.ndarray) -> np.ndarray:
        """p[n, l, :] = probs(l, states[:, l]) for every layer at once.

        states (N, L+1, H) -> (N, L+1, C) float64, rows sum to 1."""
        x = np.asarray(states)
        if x.ndim != 3 or x.shape[1:] != self.mean.shape:
            raise ValueError(f"states must be (N, L+1, H) = (N, {self.mean.shape[0]}, {self.mean.shape[1]}), "
                             f"got shape {x.shape}")
        x = (x.astype(np.float64) - self.mean) / self.scale  # (N, L+1, H)
        z = np.einsum("nlh,lhc->nlc", x, self.weight, optimize=True) + self.bias  # (N, L+1, C)
        return _softmax(z)

    def to_bytes(self) -> bytes:
        """The four tensors as a safetensors file (no pickle)."""
        return _st_save({key: np.ascontiguousarray(getattr(self, key)) for key in _TENSORS},
                        metadata={"format": _FORMAT})

    @classmethod
    def from_bytes(cls, data: bytes) -> OffRamps:
        """Inverse of to_bytes; a file that is not an off-ramps safetensors file is a ValueError."""
        try:
            tensors = _st_load(data)
        except (SafetensorError, ValueError) as err:
            raise ValueError(f"not a safetensors file of off-ramps: {err}") from err
        if set(tensors) != set(_TENSORS):
            raise ValueError(f"an off-ramps file holds the tensors {sorted(_TENSORS)}, this one {sorted(tensors)}")
        return cls(**{key: tensors[key] for key in _TENSORS})

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> OffRamps:
        return cls.from_bytes(Path(path).read_bytes())


@dataclass(frozen=True, eq=False)
class CrossFit:
    """Cross-fitted off-ramp probabilities of a training split, and the off-ramps that serve.

    layer_probs (N, L+1, C): row i from heads[folds[i]], fitted on the examples of every other fold;
    folds (N,) int64 in [0, n_folds); heads: the per-fold off-ramps; final: off-ramps fitted on all N.
    """

    layer_probs: np.ndarray
    folds: np.ndarray
    heads: tuple[OffRamps, ...]
    final: OffRamps


def fit_offramps(states: np.ndarray, labels: np.ndarray, n_classes: int, *, l2: float = 1.0,
                 max_iter: int = 500) -> OffRamps:
    """Off-ramp l = argmin_{W, b} sum_n CE(softmax(z[n, l] W + b), y[n]) + (l2 / 2) ||W||^2, z standardised x.

    states (N, L+1, H), labels (N,) ints in [0, n_classes) -> OffRamps. l2 penalises all C columns: it is
    sklearn's 1 / C for C >= 3 (multinomial) and 2 / C for two classes (sklearn's binary fit has one column).
    All layers are fitted together by one L-BFGS run over the sum of the per-layer objectives (they share
    no parameter, so the optimum is each layer's own), in a parametrisation preconditioned by each layer's
    feature covariance (_fit_softmax, docs/peers.md). The fit starts from zero weights and the class prior
    and is deterministic. A class absent from `labels` gets probability 0; a layer whose states are
    identical for every input (layer 0) learns only the class prior.
    """
    x, y = _check_training(states, labels, n_classes)
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (it makes each off-ramp's optimum unique), got {l2}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    n = len(x)
    xs = np.array(x.transpose(1, 0, 2), dtype=np.float64)  # (L+1, N, H), standardised in place below
    mean = xs.mean(axis=1)  # (L+1, H)
    xs -= mean[:, None, :]
    var = np.einsum("lnh,lnh->lh", xs, xs) / n  # (L+1, H) without an (L+1, N, H) temporary
    rms = np.sqrt((var + mean**2).mean(axis=1, keepdims=True))  # (L+1, 1) typical size of a state entry
    scale = np.maximum(np.sqrt(var), _SCALE_FLOOR * rms)  # floored: constant features stay ~0, not noise
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero layer
    xs /= scale[:, None, :]

    present = np.flatnonzero(np.bincount(y, minlength=n_classes) > 0)  # classes seen in training
    weight = np.zeros((xs.shape[0], xs.shape[2], n_classes))  # (L+1, H, C)
    bias = np.full((xs.shape[0], n_classes), -np.inf)  # absent classes stay at -inf
    if len(present) == 1:
        bias[:, present] = 0.0  # one class: probability 1 everywhere, nothing to fit
    else:
        w, b = _fit_softmax(xs, np.searchsorted(present, y), len(present), l2=l2, max_iter=max_iter)
        weight[:, :, present] = w
        bias[:, present] = b
    return OffRamps(mean, scale, weight, bias)


def cross_fit(states: np.ndarray, labels: np.ndarray, n_classes: int, *, n_folds: int = 5, seed: int = 0,
              l2: float = 1.0, max_iter: int = 500) -> CrossFit:
    """K-fold cross-fitting: layer_probs[i] = fit_offramps(examples outside fold(i)).layer_probs(states[i]).

    states (N, L+1, H), labels (N,) -> CrossFit. Folds are stratified by label and random within a label
    (seeded), so a class keeps its share in every fold; the same inputs and seed give the same folds and
    probabilities. `final` is fitted on all N examples: what serving uses.
    """
    x, y = _check_training(states, labels, n_classes)
    if not 2 <= n_folds <= len(x):
        raise ValueError(f"n_folds must lie in [2, N] = [2, {len(x)}], got {n_folds}")
    folds = _stratified_folds(y, n_folds, seed)
    heads = tuple(fit_offramps(x[folds != k], y[folds != k], n_classes, l2=l2, max_iter=max_iter)
                  for k in range(n_folds))
    layer_probs = np.empty((len(x), x.shape[1], n_classes))  # (N, L+1, C)
    for k, head in enumerate(heads):
        layer_probs[folds == k] = head.layer_probs(x[folds == k])
    final = fit_offramps(x, y, n_classes, l2=l2, max_iter=max_iter)
    return CrossFit(layer_probs, folds, heads, final)


def _stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """fold[i] in [0, n_folds): examples sorted by (label, seeded random key) are dealt out round-robin."""
    key = np.random.default_rng(seed).permutation(len(labels))
    order = np.lexsort((key, labels))  # by label, then random within the label
    folds = np.empty(len(labels), dtype=np.int64)
    folds[order] = np.arange(len(labels)) % n_folds
    return folds


def _fit_softmax(xs: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float,
                 max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer L2-penalised multinomial logistic regression, all layers in one preconditioned L-BFGS run.

    xs (L+1, N, H) standardised states, y (N,) in [0, C) with every class present -> weight (L+1, H, C),
    bias (L+1, C). The per-example Hessian in W is at most A = G / 4 + (l2 / N) I per class, G = xs^T xs / N
    the layer's feature covariance; with A = R R^T (Cholesky), W = R^-T U makes it the identity in U. The
    raw standardised states are correlated with a spectrum spanning decades, which plain L-BFGS crawls
    through (hundreds of iterations per layer); preconditioned, all layers converge in tens.
    """
    n_layers1, n, n_features = xs.shape
    gram = np.matmul(xs.transpose(0, 2, 1), xs) / n  # (L+1, H, H)
    curvature = _CURVATURE * gram + (l2 / n) * np.eye(n_features)  # positive definite since l2 > 0
    precond = np.linalg.inv(np.linalg.cholesky(curvature)).transpose(0, 2, 1)  # (L+1, H, H): W = precond @ U
    onehot = np.eye(n_classes)[y]  # (N, C)
    n_u = precond.shape[1] * n_classes * n_layers1
    prior = np.log(onehot.mean(axis=0))  # start at the class prior: the optimum of the constant layer

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        u = theta[:n_u].reshape(n_layers1, -1, n_classes)  # (L+1, H, C)
        b = theta[n_u:].reshape(n_layers1, 1, n_classes)  # (L+1, 1, C)
        w = np.matmul(precond, u)  # (L+1, H, C)
        z = np.matmul(xs, w) + b  # (L+1, N, C)
        z -= z.max(axis=2, keepdims=True)  # log-sum-exp shift
        ez = np.exp(z)
        total = ez.sum(axis=2, keepdims=True)
        loss = np.log(total).sum() - (z * onehot).sum() + 0.5 * l2 * np.vdot(w, w)
        resid = ez / total - onehot  # (L+1, N, C) d loss / d logits
        grad_w = np.matmul(xs.transpose(0, 2, 1), resid) + l2 * w  # (L+1, H, C)
        grad_u = np.matmul(precond.transpose(0, 2, 1), grad_w)
        grad = np.concatenate([grad_u.ravel(), resid.sum(axis=1).ravel()])
        return loss / n, grad / n  # per example, so the tolerance does not scale with N

    theta0 = np.concatenate([np.zeros(n_u), np.tile(prior, n_layers1)])
    result = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "gtol": _GTOL, "ftol": 1e-12, "maxcor": 20})
    if result.status == 1:
        warnings.warn(f"off-ramp fit stopped at max_iter={max_iter} before its gradient fell below {_GTOL} "
                      f"(largest entry {np.abs(result.jac).max():.2g}); the off-ramps are usable, raise "
                      "max_iter for the exact optimum", RuntimeWarning, stacklevel=3)
    u = result.x[:n_u].reshape(n_layers1, -1, n_classes)
    return np.matmul(precond, u), result.x[n_u:].reshape(n_layers1, n_classes)


def _check_training(states: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(states)
    y = np.asarray(labels)
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"states must be a non-empty (N, L+1, H) array, got shape {x.shape}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({len(x)},) to match states {x.shape}, got shape {y.shape}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise ValueError("states must be finite floats")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any() or (y >= n_classes).any():
        raise ValueError(f"labels must be ints in [0, {n_classes})")
    return x, y.astype(np.int64)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)  # shift cancels in the ratio; -inf logits become exactly 0
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
