"""A picklable recipe for the models a worker process needs: backbone and key encoder.

Ray actors and Serve replicas each load their own models once in `__init__`; what travels to them is
this small frozen dataclass, never a loaded model (hundreds of MB through the object store, and torch
modules do not pickle across devices). Tests pass `factory`, a module-level function building tiny
models, so the same code path runs with seconds-long loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raee.backbones import Backbone
from raee.keys import KeyEncoder, KeyInput, Pooling, load_encoder
from raee.models import DEFAULT_BACKBONE, DEFAULT_ENCODER, load_backbone

ModelFactory = Callable[[], tuple[Backbone, KeyEncoder]]


@dataclass(frozen=True)
class ModelSpec:
    """What `load()` builds: load_backbone(backbone, ...) and load_encoder(encoder, ...), or factory()."""

    backbone: str = DEFAULT_BACKBONE
    encoder: str = DEFAULT_ENCODER
    cache_dir: str | None = None
    device: str | None = None  # None: cuda when the process sees a GPU, else cpu
    batch_size: int = 32
    key_input: KeyInput = "sentence"
    key_layer_idx: int | None = None  # encoder="backbone" only
    key_pooling: Pooling = "mean"  # encoder="backbone" only
    factory: ModelFactory | None = None  # a module-level function (picklable by reference); overrides the rest

    def load(self, *, n_threads: int | None = None) -> tuple[Backbone, KeyEncoder]:
        """(backbone, encoder), loaded in the calling process.

        n_threads sets torch's intra-op threads first: N CPU workers on one machine each want 1, not all cores."""
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        if self.factory is not None:
            return self.factory()
        backbone = load_backbone(self.backbone, cache_dir=self.cache_dir, device=self.device,
                                 batch_size=self.batch_size)
        encoder = load_encoder(self.encoder, backbone=backbone, key_input=self.key_input,
                               layer_idx=self.key_layer_idx, pooling=self.key_pooling, device=self.device,
                               batch_size=self.batch_size)
        return backbone, encoder
