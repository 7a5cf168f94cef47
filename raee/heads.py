"""What an exit head is: the read-out that turns a layer's answer-position state into a label distribution.

The paper's head is the LM head restricted to the label words (`raee.backbones`, `--head lm`); trained
off-ramps (`raee.offramps`, `--head offramp`) are the other. numpy only, so heads fitted without torch plug
into the torch engine: the backbone hands each group of exiting states to `probs` and keeps the answer.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ExitHead(Protocol):
    """A label distribution from the residual stream at one layer."""

    @property
    def name(self) -> str:
        """Identifies the head (kind and digest of its weights): exit databases store it and refuse another."""
        ...

    def probs(self, layer_idx: int, states: np.ndarray) -> np.ndarray:
        """p[n, c] from states (n, H) float32 leaving layer layer_idx (0 = embeddings) -> (n, C), rows sum to 1."""
        ...
