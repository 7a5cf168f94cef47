"""Layer-wise engine over Hugging Face language models: per-layer label probabilities and early-exit prediction.

The model's own `forward` runs unchanged; forward hooks on its blocks read the residual stream and,
for early exit, shrink the batch as examples reach their exit layer and stop the forward once every
example has left. So masks, rotary embeddings and per-layer attention types stay the model's own, and
an example with exit layer l runs exactly l blocks, whatever the other examples in its batch do.

Layer indexing: layer 0 is the embedding output, layer l the output of block l (1..L).
Exit logits at layer l: decoder-only `lm_head(final_norm(h_l))`, masked LM `mlm_head(h_l)`, both
restricted to the task's label words at the answer position (last real token / the mask token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from raee.tasks import Style, Task

_DECODER_TYPES = {
    "llama", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "phi3", "olmo", "olmo2",
    "smollm3", "granite",
}
_GPT2_TYPES = {"gpt2"}
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert"}


class BackboneError(ValueError):
    """A model/task combination the engine cannot run, with the reason and the fix."""


@dataclass(frozen=True)
class Predictions:
    """Early-exit predictions for B texts."""

    labels: np.ndarray  # (B,) int64 argmax over label words at the exit layer
    probs: np.ndarray  # (B, C) float32 softmax over the label words at the exit layer
    exit_layers: np.ndarray  # (B,) int64 blocks run per text
    truncated: np.ndarray | None = None  # (B,) bool: the sentence was cut to fit max_length (None -> all False)

    def __post_init__(self) -> None:
        if self.truncated is None:  # frozen: set the default once, so callers always get an array
            object.__setattr__(self, "truncated", np.zeros(len(self.labels), dtype=bool))


@dataclass(frozen=True)
class LayerPass:
    """One recorded forward: every layer's label distribution and answer-position state."""

    probs: np.ndarray  # (B, L+1, C) float32
    states: np.ndarray  # (B, L+1, H) float32, residual stream leaving each layer (pre final norm)


@dataclass(frozen=True)
class _Parts:
    """Where an architecture keeps what early exit needs."""

    style: Style
    base: nn.Module  # called with input_ids/attention_mask, runs embeddings and blocks
    blocks: nn.ModuleList
    exit_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, H), label ids (C,) -> (B, C)


def _restricted_head(head: nn.Linear, norm: nn.Module, softcap: float | None) -> Callable:
    """lm_head(norm(h)) evaluated on the label-word rows only: C dot products instead of V."""

    def exit_logits(hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias[label_ids]
        logits = nn.functional.linear(norm(hidden), head.weight[label_ids], bias)  # (B, C)
        if softcap:  # Gemma 2 style final-logit soft-capping is elementwise, so restriction commutes
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return exit_logits


def _full_head(head: nn.Module) -> Callable:
    """A masked-LM head (dense + norm + decoder): run it whole, then pick the label-word columns."""

    def exit_logits(hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        return head(hidden)[:, label_ids]

    return exit_logits


def _locate_parts(model: nn.Module) -> _Parts:
    """One adapter per architecture family, chosen by config.model_type."""
    model_type = model.config.model_type
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if model_type in _DECODER_TYPES or (hasattr(model, "model") and hasattr(model.model, "layers")):
        base = model.model
        return _Parts("causal", base, base.layers, _restricted_head(model.lm_head, base.norm, softcap))
    if model_type in _GPT2_TYPES:
        base = model.transformer
        return _Parts("causal", base, base.h, _restricted_head(model.lm_head, base.ln_f, softcap))
    if model_type in _ENCODER_TYPES:
        base = model.base_model
        head = model.cls if hasattr(model, "cls") else model.lm_head
        blocks = base.transformer.layer if model_type == "distilbert" else base.encoder.layer
        return _Parts("mlm", base, blocks, _full_head(head))
    raise BackboneError(
        f"model type {model_type!r} is not supported (decoder-only: {sorted(_DECODER_TYPES | _GPT2_TYPES)}; "
        f"masked LM: {sorted(_ENCODER_TYPES)})"
    )


def _block_output(out: Any) -> torch.Tensor:
    """Older transformers return (hidden, ...) from a block, newer return hidden."""
    return out[0] if isinstance(out, tuple) else out


def _take_rows(value: Any, rows: torch.Tensor, full_batch: int) -> Any:
    """Slice the batch dimension of every per-example tensor in a block's inputs (masks, positions, rotary)."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == full_batch and full_batch > 1:
            return value[rows]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, rows, full_batch) for v in value)
    return value


class _ExitRun:
    """Hook state for one forward: which original rows are still in the stream, and what has left it."""

    def __init__(self, exit_layers: torch.Tensor, positions: torch.Tensor, record_all: bool):
        self.exit_layers = exit_layers  # (B,) for each original row, the layer it leaves at
        self.positions = positions  # (B,) answer token index per original row
        self.record_all = record_all  # layer_probs: record every layer for every row, never shrink
        self.active = torch.arange(len(exit_layers), device=exit_layers.device)  # original ids in the stream
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (row ids, (n, H) states)

    def leave(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Record the answer-position state of rows exiting at layer_idx; return the hidden of those staying."""
        if self.record_all:
            leaving = torch.ones_like(self.active, dtype=torch.bool)
        else:
            leaving = self.exit_layers[self.active] == layer_idx
        if leaving.any():
            rows = self.active[leaving]
            self.states[layer_idx] = (rows, hidden[leaving, self.positions[rows]])  # (n, H)
        if self.record_all:
            return hidden
        self.active = self.active[~leaving]
        return hidden[~leaving]


class _StopForward(Exception):
    """Raised from a hook once every example has left: the remaining blocks never run."""


class Backbone:
    """A Hugging Face LM read layer by layer for one classification prompt format."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str = "",
        device: str | torch.device | None = None,
        max_length: int = 512,
        batch_size: int = 32,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.parts = _locate_parts(model)
        self.n_layers = len(self.parts.blocks)
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:  # decoder tokenizers often have none; right padding never reads it
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if self.style == "mlm" and tokenizer.mask_token is None:
            raise BackboneError(f"{self.name}: a masked-LM backbone needs a tokenizer with a mask token")
        self._label_ids: dict[tuple[str, Style], torch.Tensor] = {}

    @property
    def style(self) -> Style:
        return self.parts.style

    def label_ids(self, task: Task) -> torch.Tensor:
        """(C,) token id of each label word, as the model would produce it after a space."""
        key = (task.name, self.style)
        if key not in self._label_ids:
            ids = []
            for word in task.label_words(self.style):
                pieces = self.tokenizer.encode(" " + word, add_special_tokens=False)
                if len(pieces) != 1 or pieces[0] == self.tokenizer.unk_token_id:
                    shown = self.tokenizer.convert_ids_to_tokens(pieces)
                    raise BackboneError(
                        f"label word {word!r} of task {task.name} is {len(pieces)} tokens {shown} for "
                        f"{self.name}; RAEE needs single-token label words (choose another backbone or template)"
                    )
                ids.append(pieces[0])
            self._label_ids[key] = torch.tensor(ids, device=self.device)
        return self._label_ids[key]

    @torch.no_grad()
    def layer_pass(self, texts: Sequence[str], task: Task, *, pairs: Sequence[str] | None = None,
                   batch_size: int | None = None, show_progress: bool = False) -> LayerPass:
        """probs[b, l, c] = softmax over label words of the exit logits at layer l, and the states they read.

        texts (B,) -> LayerPass((B, L+1, C), (B, L+1, H)). Every block runs once per text (the build-time pass)."""
        full = np.full(len(texts), self.n_layers, dtype=np.int64)
        hidden = int(self.model.config.get_text_config().hidden_size)
        out = np.zeros((len(texts), self.n_layers + 1, task.n_classes), dtype=np.float32)
        states = np.zeros((len(texts), self.n_layers + 1, hidden), dtype=np.float32)
        prompts, _ = self._prompts(texts, task, pairs)
        for idx, run in self._runs(prompts, task, full, batch_size, show_progress, record_all=True):
            per_layer = [self._probs(run.states[layer][1], task) for layer in range(self.n_layers + 1)]
            out[idx] = torch.stack(per_layer, dim=1).cpu().numpy()  # (b, L+1, C)
            states[idx] = torch.stack([run.states[layer][1] for layer in range(self.n_layers + 1)],
                                      dim=1).float().cpu().numpy()
        return LayerPass(out, states)

    def layer_probs(self, texts: Sequence[str], task: Task, *, pairs: Sequence[str] | None = None,
                    batch_size: int | None = None, show_progress: bool = False) -> np.ndarray:
        """layer_pass(...).probs: (B, L+1, C)."""
        return self.layer_pass(texts, task, pairs=pairs, batch_size=batch_size, show_progress=show_progress).probs

    @torch.no_grad()
    def predict(
        self,
        texts: Sequence[str],
        task: Task,
        exit_layers: Sequence[int] | np.ndarray | int,
        *,
        pairs: Sequence[str] | None = None,
        head: Any = None,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Predictions:
        """Run each text through exactly its own exit_layers[b] blocks and classify from that layer.

        texts (B,), exit_layers (B,) ints in [0, L] or one int for all -> Predictions with (B,) and (B, C)."""
        layers = np.broadcast_to(np.asarray(exit_layers, dtype=np.int64), (len(texts),)).copy()
        if layers.size and (layers.min() < 0 or layers.max() > self.n_layers):
            raise BackboneError(f"exit layers must lie in [0, {self.n_layers}] for {self.name}")
        probs = np.zeros((len(texts), task.n_classes), dtype=np.float32)
        prompts, truncated = self._prompts(texts, task, pairs)
        for idx, run in self._runs(prompts, task, layers, batch_size, show_progress, record_all=False):
            for layer, (rows, states) in run.states.items():  # at most L+1 groups, one per distinct exit layer
                if head is None:
                    probs[idx[rows.cpu().numpy()]] = self._probs(states, task).cpu().numpy()
                else:
                    probs[idx[rows.cpu().numpy()]] = head.probs(layer, states.float().cpu().numpy())
        return Predictions(probs.argmax(axis=1).astype(np.int64), probs, layers, truncated)

    def _probs(self, states: torch.Tensor, task: Task) -> torch.Tensor:
        return torch.softmax(self.parts.exit_logits(states, self.label_ids(task)).float(), dim=-1)  # (n, C)

    def _prompts(self, texts: Sequence[str], task: Task,
                 pairs: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(prompt per text, (B,) bool truncated): checked before any work, so bad input fails fast."""
        if any(not isinstance(t, str) for t in texts):
            raise BackboneError("texts must be strings")
        self.label_ids(task)  # fail on bad label words before any work
        pairs = pairs if pairs is not None else [None] * len(texts)
        fitted = [self._fit(t, task, p) for t, p in zip(texts, pairs, strict=True)]
        return [p for p, _ in fitted], np.array([cut for _, cut in fitted], dtype=bool)

    def _runs(
        self,
        prompts: list[str],
        task: Task,
        exit_layers: np.ndarray,
        batch_size: int | None,
        show_progress: bool,
        *,
        record_all: bool,
    ) -> Iterator[tuple[np.ndarray, _ExitRun]]:
        """Yield (original indices, finished run) per mini-batch; batches group similar exits and lengths."""
        order = np.lexsort(([len(p) for p in prompts], exit_layers))  # by exit layer, then length
        size = batch_size or self.batch_size
        for start in tqdm(range(0, len(order), size), disable=not show_progress, desc=f"{task.name} batches"):
            idx = order[start : start + size]
            yield idx, self._forward([prompts[i] for i in idx], exit_layers[idx], record_all)

    def _prompt(self, text: str, task: Task) -> str:
        """Template the text, truncating the sentence (never the template) to fit max_length tokens."""
        return self._fit(text, task)[0]

    def _fit(self, text: str, task: Task, pair: str | None = None) -> tuple[str, bool]:
        """(prompt, whether the sentence was cut): callers report the cut, since it changes the answer."""
        mask = self.tokenizer.mask_token or "<mask>"
        prompt = task.prompt(text, self.style, mask, pair)
        n_prompt = len(self.tokenizer.encode(prompt))
        if n_prompt <= self.max_length:
            return prompt, False
        sentence_ids = self.tokenizer.encode(text, add_special_tokens=False)
        keep = max(len(sentence_ids) - (n_prompt - self.max_length) - 2, 0)  # 2: retokenisation slack
        return task.prompt(self.tokenizer.decode(sentence_ids[:keep]), self.style, mask, pair), True

    def _forward(self, prompts: list[str], exit_layers: np.ndarray, record_all: bool) -> _ExitRun:
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right")
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        if self.style == "causal":  # right padding: the answer is read at the last real token
            positions = batch["attention_mask"].sum(dim=1) - 1
        else:
            is_mask = batch["input_ids"] == self.tokenizer.mask_token_id
            if not bool(is_mask.any(dim=1).all()):
                raise BackboneError(f"{self.name}: a prompt lost its mask token (too long?)")
            positions = is_mask.int().argmax(dim=1)
        run = _ExitRun(torch.as_tensor(exit_layers, device=self.device), positions, record_all)
        with _exit_hooks(self.parts.blocks, run, full_batch=len(prompts)):
            try:
                self.parts.base(**batch)
            except _StopForward:
                pass
        return run


@contextmanager
def _exit_hooks(blocks: nn.ModuleList, run: _ExitRun, *, full_batch: int) -> Iterator[None]:
    """While active, block i first lets rows exiting at layer i leave, then runs on the rest only."""
    last = len(blocks) - 1

    def before(i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = run.leave(i, hidden)
        if hidden.shape[0] == 0:
            raise _StopForward
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        rows = run.active
        if len(rows) < full_batch:  # someone has left: slice masks and positions to the rows still running
            args = tuple(_take_rows(a, rows, full_batch) for a in args[1:])
            kwargs = {k: _take_rows(v, rows, full_batch) for k, v in kwargs.items()}
        else:
            args = args[1:]
        return (hidden, *args), kwargs

    def after(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        run.leave(last + 1, _block_output(out))
        raise _StopForward  # the final norm and anything after it are applied by the exit head

    with ExitStack() as stack:  # prepend: other hooks (e.g. a test counting block calls) see the shrunk batch
        for i, block in enumerate(blocks):
            stack.enter_context(block.register_forward_pre_hook(_bind(before, i), with_kwargs=True, prepend=True))
        stack.enter_context(blocks[last].register_forward_hook(after, with_kwargs=True, prepend=True))
        yield


def _bind(fn: Callable, i: int) -> Callable:
    return lambda module, args, kwargs: fn(i, module, args, kwargs)
