"""Per-layer contextual calibration of the label-word distributions, fitted on the training split only.

A small base model's intermediate layers put nearly every input into one class: the prompt always ends
in the same tokens, so the label-word logits at layer l carry a per-layer bias b_l that swamps the input.
Contextual calibration (Zhao et al., 2021) divides it out: with q[l] the mean label distribution of
layer l over the training split,

    p~[n, l, c] = (p[n, l, c] / q[l, c]) / sum_c' (p[n, l, c'] / q[l, c']).

A layer that answers the same for every input becomes uniform (it carries no information, and now says
so), and a layer whose ranking moves with the input keeps that movement without the bias. The fit is a
mean, so it can be computed from any seeded sample of the training split and stored with the exit
database (`Calibration.to_json`); inference applies the same q at the exit layer. See
docs/exit-policies.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

# Floor on q so that a class a layer never predicts cannot divide by zero (p~ is then dominated by it,
# which is the right reading: any mass on a never-predicted class is news).
MIN_BIAS = 1e-6


@dataclass(frozen=True)
class Calibration:
    """q (L+1, C): each layer's mean label distribution over the training examples it was fitted on."""

    bias: np.ndarray  # (L+1, C) float64, rows sum to 1
    n_examples: int  # training examples the means were taken over
    kind: str = "contextual"

    def __post_init__(self) -> None:
        bias = np.asarray(self.bias, dtype=np.float64)
        if bias.ndim != 2 or bias.shape[1] < 2:
            raise ValueError(f"calibration bias must be (L+1, C) with C >= 2, got shape {bias.shape}")
        if not np.isfinite(bias).all() or (bias < 0).any():
            raise ValueError("calibration bias must be finite and non-negative")
        if self.kind != "contextual":
            raise ValueError(f"unknown calibration kind {self.kind!r}; known: 'contextual'")
        object.__setattr__(self, "bias", bias)

    @property
    def n_layers(self) -> int:
        return self.bias.shape[0] - 1

    @property
    def n_classes(self) -> int:
        return self.bias.shape[1]

    def apply(self, layer_probs: np.ndarray) -> np.ndarray:
        """Calibrate every layer: layer_probs (N, L+1, C) -> (N, L+1, C), rows sum to 1."""
        probs = np.asarray(layer_probs, dtype=np.float64)
        if probs.ndim != 3 or probs.shape[1:] != self.bias.shape:
            raise ValueError(f"layer_probs must be (N, {self.bias.shape[0]}, {self.bias.shape[1]}), "
                             f"got {probs.shape}")
        return _normalise(probs / np.maximum(self.bias, MIN_BIAS)[None])

    def apply_at(self, probs: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """Calibrate each row at its own exit layer: probs (N, C), layers (N,) in [0, L] -> (N, C)."""
        probs = np.asarray(probs, dtype=np.float64)
        layers = np.asarray(layers, dtype=np.int64)
        if probs.ndim != 2 or probs.shape[1] != self.n_classes or layers.shape != probs.shape[:1]:
            raise ValueError(f"need probs (N, {self.n_classes}) and layers (N,), got {probs.shape}, {layers.shape}")
        if layers.size and (layers.min() < 0 or layers.max() > self.n_layers):
            raise ValueError(f"layers must lie in [0, {self.n_layers}]")
        return _normalise(probs / np.maximum(self.bias[layers], MIN_BIAS))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "n_examples": self.n_examples, "bias": self.bias.tolist()})

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        return cls(np.asarray(data["bias"], dtype=np.float64), int(data["n_examples"]), data["kind"])


def fit_calibration(train_layer_probs: np.ndarray) -> Calibration:
    """q[l, c] = mean_n p[n, l, c] over training examples: train_layer_probs (N, L+1, C), N >= 1."""
    probs = np.asarray(train_layer_probs, dtype=np.float64)
    if probs.ndim != 3 or len(probs) == 0:
        raise ValueError(f"need a non-empty (N, L+1, C) array of training-split probabilities, got {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("training layer probabilities contain NaN or inf")
    return Calibration(_normalise(probs.mean(axis=0)), len(probs))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / x.sum(axis=-1, keepdims=True)
