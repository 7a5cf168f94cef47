"""Key embeddings for the exit database: a sentence-transformers encoder or the backbone's own hidden states.

A key decides which training examples count as "similar" at inference time, so the same encoder (and the
same input: raw sentence or templated prompt) must be used at build and at query time. Each encoder's
`name` spells out everything that changes its vectors; the exit database stores it and refuses a mismatch.

Default: all-MiniLM-L6-v2 on the raw sentence, L2-normalised. docs/keys.md has the measurement behind
`key_input="sentence"`: the template adds the same words to every key and only blurs the neighbourhoods.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from raee.backbones import Backbone
from raee.models import DEFAULT_ENCODER, resolve
from raee.tasks import Style, Task

KeyInput = Literal["sentence", "prompt"]
Pooling = Literal["mean", "last"]

DEFAULT_KEY_INPUT: KeyInput = "sentence"
_KEY_INPUTS = ("sentence", "prompt")
_POOLINGS = ("mean", "last")


@runtime_checkable
class KeyEncoder(Protocol):
    """What the collector and the inference engine need from a key encoder."""

    @property
    def name(self) -> str:
        """Identifies the vectors (model, input, pooling): stored as the exit database's `encoder`."""
        ...

    @property
    def dim(self) -> int: ...

    @property
    def key_input(self) -> KeyInput: ...

    def encode(self, texts: Sequence[str], task: Task | None = None, *, show_progress: bool = False) -> np.ndarray:
        """texts (N,) -> (N, D) float32 keys; `task` is needed when key_input == "prompt"."""
        ...


def check_texts(texts: Sequence[str]) -> None:
    """Raise ValueError naming the first index whose text is not a string, or is empty / whitespace only.

    An empty sentence has no meaningful key or prediction; failing early beats a silent nearest-anything."""
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not one string (wrap it in a list)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i} is a {type(text).__name__}, expected a string")
        if not text.strip():
            raise ValueError(f"text {i} is empty or whitespace only: {text!r}")


def key_texts(texts: Sequence[str], task: Task | None, key_input: KeyInput, style: Style = "causal") -> list[str]:
    """What the encoder reads: the sentences themselves, or each one inside the task's template."""
    if key_input == "sentence":
        return list(texts)
    if task is None:
        raise ValueError('key_input="prompt" needs the task to template the texts; pass task=...')
    return [task.prompt(text, style) for text in texts]


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


class SentenceEncoder:
    """A sentence-transformers model; embeddings are L2-normalised so squared L2 = 2 - 2 cos."""

    def __init__(
        self,
        model: str = DEFAULT_ENCODER,
        *,
        key_input: KeyInput = DEFAULT_KEY_INPUT,
        style: Style = "causal",
        batch_size: int = 64,
        device: str | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        _check_choice("key_input", key_input, _KEY_INPUTS)
        self.model_name = model
        self._key_input: KeyInput = key_input
        self.style = style  # which template a prompt key uses; only matters for key_input="prompt"
        self.batch_size = batch_size
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SentenceTransformer(resolve(model), device=device)
        self._dim = int(self.model.get_embedding_dimension())

    @property
    def name(self) -> str:
        suffix = f"prompt-{self.style}" if self._key_input == "prompt" else "sentence"
        return f"{self.model_name}:{suffix}"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def key_input(self) -> KeyInput:
        return self._key_input

    def encode(self, texts: Sequence[str], task: Task | None = None, *, show_progress: bool = False) -> np.ndarray:
        """keys[i] = normalise(model(texts[i] or its prompt)); texts (N,) -> (N, D) float32."""
        check_texts(texts)
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        inputs = key_texts(texts, task, self._key_input, self.style)
        keys = self.model.encode(inputs, batch_size=self.batch_size, show_progress_bar=show_progress,
                                 normalize_embeddings=True, convert_to_numpy=True)
        return np.ascontiguousarray(keys, dtype=np.float32)


class _StopForward(Exception):
    """Raised from a hook once the wanted layer is captured: the deeper blocks never run."""


@contextmanager
def _capture_layer(blocks: nn.ModuleList, layer_idx: int, into: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, a forward stores the (B, T, H) state at layer `layer_idx` in into["hidden"] and stops.

    Layer 0 is the embedding output (the input of block 0); layer l >= 1 is the output of block l."""

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        into["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    def after(module: nn.Module, args: tuple, out: Any) -> None:
        into["hidden"] = out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)
        raise _StopForward

    with ExitStack() as stack:
        if layer_idx == 0:
            stack.enter_context(blocks[0].register_forward_pre_hook(before, with_kwargs=True))
        else:
            stack.enter_context(blocks[layer_idx - 1].register_forward_hook(after))
        yield


class BackboneStateEncoder:
    """Keys from the backbone itself: the hidden state at `layer_idx`, mean-pooled or at the last token.

    Costs `layer_idx` blocks per text on top of inference, and needs no second model. `layer_idx=None`
    takes the middle layer. With key_input="prompt" and pooling="last" the key is the state the exit head
    reads at the answer position (decoder-only). An encoder-decoder's keys come from its encoder: layer_idx
    in [0, encoder blocks], "last" is the EOS the tokenizer appends.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        layer_idx: int | None = None,
        pooling: Pooling = "mean",
        key_input: KeyInput = DEFAULT_KEY_INPUT,
        normalize: bool = True,
        batch_size: int = 32,
    ) -> None:
        _check_choice("pooling", pooling, _POOLINGS)
        _check_choice("key_input", key_input, _KEY_INPUTS)
        self._stack = backbone.family.stacks[0]  # the blocks a forward from token ids runs first (an encoder's)
        n_layers = len(self._stack.blocks)
        layer_idx = n_layers // 2 if layer_idx is None else layer_idx
        if not 0 <= layer_idx <= n_layers:
            where = backbone.name if len(backbone.family.stacks) == 1 else f"the encoder of {backbone.name}"
            raise ValueError(f"layer_idx must lie in [0, {n_layers}] for {where}, got {layer_idx}")
        self.backbone = backbone
        self.layer_idx = layer_idx
        self.pooling: Pooling = pooling
        self._key_input: KeyInput = key_input
        self.normalize = normalize
        self.batch_size = batch_size
        self._dim = int(backbone.model.config.get_text_config().hidden_size)

    @property
    def name(self) -> str:
        norm = "" if self.normalize else ":raw"
        return f"backbone:{self.backbone.name}:layer-{self.layer_idx}:{self.pooling}:{self._key_input}{norm}"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def key_input(self) -> KeyInput:
        return self._key_input

    @torch.no_grad()
    def encode(self, texts: Sequence[str], task: Task | None = None, *, show_progress: bool = False) -> np.ndarray:
        """keys[i] = pool_t h[layer_idx][i, t] over real tokens (or at the last one); (N,) -> (N, H) float32."""
        check_texts(texts)
        mask_token = self.backbone.tokenizer.mask_token or "<mask>"
        if self._key_input == "prompt":
            if task is None:
                raise ValueError('key_input="prompt" needs the task to template the texts; pass task=...')
            inputs = [task.prompt(t, self.backbone.style, mask_token) for t in texts]
        else:
            inputs = list(texts)
        keys = np.zeros((len(inputs), self._dim), dtype=np.float32)
        order = np.argsort([len(t) for t in inputs], kind="stable")  # similar lengths pad less
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, disable=not show_progress, desc="keys"):
            idx = order[start : start + self.batch_size]
            keys[idx] = self._encode_batch([inputs[i] for i in idx])
        if self.normalize:
            keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        return keys

    def _encode_batch(self, inputs: list[str]) -> np.ndarray:
        tok = self.backbone.tokenizer
        batch = tok(inputs, return_tensors="pt", padding=True, padding_side="right", truncation=True,
                    max_length=self.backbone.max_length)
        batch = {k: v.to(self.backbone.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        into: dict[str, torch.Tensor] = {}
        with _capture_layer(self._stack.blocks, self.layer_idx, into):
            try:
                self._stack.module(**batch)
            except _StopForward:
                pass
        hidden = into["hidden"].float()  # (B, T, H)
        mask = batch["attention_mask"].to(hidden.dtype)  # (B, T)
        if self.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, H)
        else:
            last = batch["attention_mask"].sum(dim=1) - 1  # (B,) right padding: last real token
            pooled = hidden[torch.arange(len(inputs), device=hidden.device), last]  # (B, H)
        return pooled.cpu().numpy()


def load_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    backbone: Backbone | None = None,
    key_input: KeyInput = DEFAULT_KEY_INPUT,
    layer_idx: int | None = None,
    pooling: Pooling = "mean",
    device: str | None = None,
    batch_size: int = 64,
) -> KeyEncoder:
    """A key encoder by name: "backbone" (hidden states of `backbone`), else a sentence-transformers model.

    Sentence models are registry names (e.g. "all-minilm-l6-v2"), local folders or hub ids. `layer_idx`
    and `pooling` apply to "backbone" only."""
    if name == "backbone":
        if backbone is None:
            raise ValueError('the "backbone" key encoder needs the backbone; pass backbone=...')
        return BackboneStateEncoder(backbone, layer_idx=layer_idx, pooling=pooling, key_input=key_input,
                                    batch_size=batch_size)
    style: Style = backbone.style if backbone is not None else "causal"
    return SentenceEncoder(name, key_input=key_input, style=style, batch_size=batch_size, device=device)
