"""Layer-wise engine over Hugging Face language models: per-layer label probabilities and early-exit prediction.

The model's own `forward` runs unchanged; forward hooks on its blocks read the residual stream and,
for early exit, shrink the batch as rows reach their exit layer and stop the forward once every
row has left. So masks, rotary embeddings, relative position biases and per-layer attention types stay
the model's own, and a row with exit layer l runs exactly l blocks, whatever the other rows in its batch do.

One adapter per architecture family (`DecoderFamily`, `MaskedFamily`, `EncoderDecoderFamily`) says where
the blocks are, where the answer is read, how a row's tokens are laid out and how exit logits are read;
`Backbone` asks its adapter and never branches on the family.

Layer numbering: layer 0 is the embedding output, layer l the output of block l (1..L). An encoder-decoder
(T5, BART) counts L = encoder blocks + decoder blocks (RAEE paper, Table 8): layers 1..L_enc are the encoder's
blocks read at the answer position, layers L_enc+1..L the decoder's blocks read at the decoder-start position
after the whole encoder has run.

Label words (see docs/backbones.md): when the first tokens of the label words (after a space) all differ,
a label's score is its first token's logit, softmaxed over the labels. Otherwise a label scores the sum of its
tokens' log-probabilities (teacher-forced, full-vocabulary log-softmax at each position, same layer-l read-out)
and the sums are softmaxed over the labels; then an example runs one row per label (C rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from itertools import pairwise
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from raee.heads import ExitHead
from raee.tasks import Style, Task

FamilyName = Literal["decoder", "masked", "encoder-decoder"]


class BackboneError(ValueError):
    """A model/task combination the engine cannot run, with the reason and the fix."""


@dataclass(frozen=True)
class Predictions:
    """Early-exit predictions for B texts."""

    labels: np.ndarray  # (B,) int64 argmax over the labels at the exit layer
    probs: np.ndarray  # (B, C) float32 label distribution at the exit layer
    exit_layers: np.ndarray  # (B,) int64 blocks run per text
    truncated: np.ndarray | None = None  # (B,) bool: the text was cut to fit max_length (None -> all False)

    def __post_init__(self) -> None:
        if self.truncated is None:  # frozen: set the default once, so callers always get an array
            object.__setattr__(self, "truncated", np.zeros(len(self.labels), dtype=bool))


@dataclass(frozen=True)
class LayerPass:
    """The recorded (build-time) pass over B texts: what every layer says, and the state it says it from."""

    probs: np.ndarray  # (B, L+1, C) float32, exactly what `Backbone.layer_probs` returns
    states: np.ndarray  # (B, L+1, H) float32 residual stream at the answer position leaving each layer (pre final norm)


@dataclass(frozen=True)
class LabelTokens:
    """A task's label words as one backbone tokenises them (after a space), and the rule that scores them."""

    words: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]  # (C,) token ids of " " + word

    @property
    def summed(self) -> bool:
        """First tokens collide: each label scores the sum of its tokens' log-probabilities (C rows per example)."""
        firsts = [t[0] for t in self.tokens]
        return len(set(firsts)) < len(firsts)

    @property
    def first_ids(self) -> tuple[int, ...]:
        return tuple(t[0] for t in self.tokens)

    @property
    def n_read(self) -> int:
        """Positions read per row: the longest label under the sum rule, else 1."""
        return max(len(t) for t in self.tokens) if self.summed else 1

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(targets (C, K) int64 each label's tokens, zero-padded; valid (C, K) bool), K = the longest label."""
        lengths = np.array([len(t) for t in self.tokens])
        valid = np.arange(lengths.max()) < lengths[:, None]
        targets = np.zeros(valid.shape, dtype=np.int64)
        targets[valid] = np.concatenate(self.tokens)
        return targets, valid


# ---- adapters -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """A run of blocks the model calls in order: all blocks of a decoder-only or masked LM, or an encoder / decoder."""

    name: str
    module: nn.Module  # what the model's forward calls to run this stack from token ids
    blocks: nn.ModuleList
    first_layer: int  # the layer number of the stack's input (0, or L_enc for a decoder stack)
    reads_input: bool  # False for a decoder stack: its input (decoder embeddings) is no layer; L_enc is the encoder's

    @property
    def last_layer(self) -> int:
        return self.first_layer + len(self.blocks)


@dataclass(frozen=True)
class _Row:
    """One forward row: token ids and the answer position for each stack."""

    ids: tuple[list[int], ...]  # per stack
    answers: tuple[int, ...]  # per stack; rows read answers[s] + j for j < n_read


class _LinearReadout:
    """logits = softcap(lm_head(scale * norm(h))), computed on the requested vocabulary rows only."""

    def __init__(self, norm: nn.Module, head: nn.Linear, *, scale: float = 1.0, softcap: float | None = None,
                 logits_bias: Callable[[], torch.Tensor] | None = None):
        self.norm, self.head, self.scale, self.softcap, self.logits_bias = norm, head, scale, softcap, logits_bias

    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None) -> torch.Tensor:
        """hidden (n, H), vocab_ids (C,) or None (all) -> (n, C) or (n, V)."""
        bias = self.head.bias
        if self.logits_bias is not None:  # BART adds final_logits_bias after lm_head
            bias = self.logits_bias() if bias is None else bias + self.logits_bias()
        weight = self.head.weight
        if vocab_ids is not None:  # C dot products instead of V
            weight, bias = weight[vocab_ids], None if bias is None else bias[vocab_ids]
        normed = self.norm(hidden)
        if self.scale != 1.0:
            normed = normed * self.scale
        logits = nn.functional.linear(normed, weight, bias)
        if self.softcap:  # Gemma 2 style final-logit soft-capping is elementwise, so restriction commutes
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _ModuleReadout:
    """A masked-LM head (dense + norm + decoder): run it whole, then pick the requested columns."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor]):
        self.head = head

    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None) -> torch.Tensor:
        out = self.head(hidden)
        return out if vocab_ids is None else out[:, vocab_ids]


Readout = _LinearReadout | _ModuleReadout


class Family:
    """An architecture family: where the blocks are, where the answer is, how rows are laid out and read out.

    Subclasses set `stacks` and their read-outs in `__init__` and override what differs. Adding a family is
    one subclass listed in FAMILIES."""

    name: ClassVar[FamilyName]
    style: ClassVar[Style]  # the template the family reads: "causal" (Table 7) or "mlm" (Table 6)
    model_types: ClassVar[frozenset[str]]
    stacks: tuple[Stack, ...]

    def __init__(self, model: nn.Module, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return model.config.model_type in cls.model_types

    @property
    def n_layers(self) -> int:
        return self.stacks[-1].last_layer

    def readout(self, layer_idx: int) -> Readout:
        """The read-out that turns layer layer_idx's state into logits."""
        raise NotImplementedError

    def answer_position(self, ids: Sequence[int]) -> int:
        """Where a prompt's label is read: the last real token (the label word comes next)."""
        return len(ids) - 1

    def layout(self, ids: list[int], answer: int, prefix: Sequence[int], exit_layer: int) -> _Row:
        """The row for a prompt teacher-forced with `prefix` (a label's earlier tokens) after its answer position."""
        return _Row((ids[: answer + 1] + list(prefix) + ids[answer + 1 :],), (answer,))

    def section_ends(self, summed: bool) -> tuple[int, ...]:
        """Exit layers whose rows, run whole, read every layer under the layout `layout` gives that layer."""
        return (self.n_layers,)

    def check_tokens(self, word: str, pieces: list[int], where: str) -> None:
        """Raise BackboneError for a label word this family cannot score."""

    def run(self, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Call the model's own forward on (ids (R, T), mask (R, T)) per stack; the exit hooks stop it."""
        ids, mask = inputs[0]
        self.stacks[0].module(input_ids=ids, attention_mask=mask)

    @contextmanager
    def keep_blocks(self, blocks: Sequence[int]) -> Iterator[tuple[Stack, ...]]:
        """While active, the model runs only `blocks` (in order): yields the stacks that hold them."""
        raise BackboneError(f"running a subset of blocks is implemented for decoder-only models, not {self.name}")
        yield ()  # pragma: no cover


class DecoderFamily(Family):
    """Decoder-only LMs: Llama, Mistral, Gemma 1-3, Qwen 2/3, Phi-3, OLMo, GPT-2. Exit logits lm_head(norm(h_l))."""

    name = "decoder"
    style = "causal"
    model_types = frozenset({"llama", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "phi3",
                             "olmo", "olmo2", "smollm3", "granite", "gpt2"})

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__(model, tokenizer)
        if hasattr(model, "model") and hasattr(model.model, "layers"):  # the Llama layout most families share
            self._base, self._attr, norm = model.model, "layers", model.model.norm
        elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2
            self._base, self._attr, norm = model.transformer, "h", model.transformer.ln_f
        else:
            raise BackboneError(f"{type(model).__name__} keeps its blocks neither in model.layers nor in "
                                "transformer.h; load the text-only causal LM (AutoModelForCausalLM)")
        self.stacks = (Stack("blocks", self._base, getattr(self._base, self._attr), 0, True),)
        self._readout = _LinearReadout(norm, model.lm_head, softcap=getattr(model.config, "final_logit_softcapping",
                                                                            None))

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return super().accepts(model) or (hasattr(model, "model") and hasattr(model.model, "layers"))

    def readout(self, layer_idx: int) -> Readout:
        return self._readout

    def run(self, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        ids, mask = inputs[0]
        self._base(input_ids=ids, attention_mask=mask, use_cache=False)

    @contextmanager
    def keep_blocks(self, blocks: Sequence[int]) -> Iterator[tuple[Stack, ...]]:
        """The model with only `blocks` in its block list, as if the others were deleted; restored on exit.

        Per-layer attention types (config.layer_types: sliding or full) follow their block. Not re-entrant:
        one call at a time per model, as for every hooked forward."""
        full, config = getattr(self._base, self._attr), self._base.config
        kept = nn.ModuleList([full[i] for i in blocks])
        saved = {"num_hidden_layers": config.num_hidden_layers}
        if getattr(config, "layer_types", None) is not None:
            saved["layer_types"] = config.layer_types
            config.layer_types = [config.layer_types[i] for i in blocks]
        setattr(self._base, self._attr, kept)
        config.num_hidden_layers = len(kept)
        try:
            yield (replace(self.stacks[0], blocks=kept),)
        finally:
            setattr(self._base, self._attr, full)
            for key, value in saved.items():
                setattr(config, key, value)


class MaskedFamily(Family):
    """Masked LMs: BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT. Read at the mask token; exit logits mlm_head(h_l)."""

    name = "masked"
    style = "mlm"
    model_types = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "camembert"})

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__(model, tokenizer)
        if tokenizer.mask_token is None:
            raise BackboneError("a masked-LM backbone needs a tokenizer with a mask token")
        base = model.base_model
        if model.config.model_type == "distilbert":
            blocks = base.transformer.layer
            head = _ModuleReadout(lambda h: model.vocab_projector(model.vocab_layer_norm(
                model.activation(model.vocab_transform(h)))))
        else:
            blocks = base.encoder.layer
            head = _ModuleReadout(model.cls if hasattr(model, "cls") else model.lm_head)
        self.stacks = (Stack("blocks", base, blocks, 0, True),)
        self._readout = head

    def readout(self, layer_idx: int) -> Readout:
        return self._readout

    def answer_position(self, ids: Sequence[int]) -> int:
        mask_id = self.tokenizer.mask_token_id
        if mask_id not in ids:
            raise BackboneError("a prompt lost its mask token (too long?)")
        return list(ids).index(mask_id)

    def check_tokens(self, word: str, pieces: list[int], where: str) -> None:
        if len(pieces) != 1:
            shown = self.tokenizer.convert_ids_to_tokens(pieces)
            raise BackboneError(f"label word {word!r} of {where} is {len(pieces)} tokens {shown}; a masked LM "
                                "predicts one token at the mask, so it needs single-token label words (choose "
                                "other [mlm_labels] or another backbone)")


class EncoderDecoderFamily(Family):
    """Encoder-decoders: T5 / mT5 and BART, with the causal template (paper Table 7).

    Layers 1..L_enc: the encoder's state at the answer position (the last prompt token, before the EOS the
    tokenizer appends) through the encoder's final norm (T5; BART has none), T5's tied-embedding scaling
    d_model**-0.5 and the LM head. Layers L_enc+1..L: the whole encoder, then the first l - L_enc decoder
    blocks on the decoder start token, through the decoder's final norm, the same scaling and the LM head;
    layer L is the model's own logits for the first decoder step."""

    name = "encoder-decoder"
    style = "causal"
    model_types = frozenset({"t5", "mt5", "bart"})

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__(model, tokenizer)
        config = model.config
        self.start_id = config.decoder_start_token_id
        if self.start_id is None or tokenizer.eos_token_id is None:
            raise BackboneError("an encoder-decoder backbone needs config.decoder_start_token_id and an EOS token")
        encoder, decoder = model.get_encoder(), model.get_decoder()
        self.n_encoder = len(self._blocks(encoder))
        self.stacks = (Stack("encoder", encoder, self._blocks(encoder), 0, True),
                       Stack("decoder", decoder, self._blocks(decoder), self.n_encoder, False))
        scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False))
        scale = config.d_model**-0.5 if config.model_type in ("t5", "mt5") and scaled else 1.0
        bias = (lambda: model.final_logits_bias[0]) if hasattr(model, "final_logits_bias") else None
        self._readouts = tuple(_LinearReadout(self._norm(stack), model.lm_head, scale=scale, logits_bias=bias)
                               for stack in (encoder, decoder))

    @staticmethod
    def _blocks(stack: nn.Module) -> nn.ModuleList:
        return stack.block if hasattr(stack, "block") else stack.layers  # T5Stack.block, BartEncoder.layers

    @staticmethod
    def _norm(stack: nn.Module) -> nn.Module:
        for name in ("final_layer_norm", "layer_norm"):  # T5; mBART-style final norms
            if isinstance(getattr(stack, name, None), nn.Module):
                return getattr(stack, name)
        return nn.Identity()

    def readout(self, layer_idx: int) -> Readout:
        return self._readouts[0 if layer_idx <= self.n_encoder else 1]

    def answer_position(self, ids: Sequence[int]) -> int:
        return len(ids) - 2 if len(ids) > 1 and ids[-1] == self.tokenizer.eos_token_id else len(ids) - 1

    def layout(self, ids: list[int], answer: int, prefix: Sequence[int], exit_layer: int) -> _Row:
        """Teacher forcing happens in the stack that is read: exits in the encoder put the label's earlier tokens
        after the prompt in the encoder input; exits in the decoder after the decoder start token."""
        if prefix and exit_layer <= self.n_encoder:
            return _Row((ids[: answer + 1] + list(prefix) + ids[answer + 1 :], [self.start_id]), (answer, 0))
        return _Row((ids, [self.start_id, *prefix]), (answer, 0))

    def section_ends(self, summed: bool) -> tuple[int, ...]:
        return (self.n_encoder, self.n_layers) if summed else (self.n_layers,)

    def run(self, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        (ids, mask), (dec_ids, dec_mask) = inputs
        self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
                   use_cache=False)


FAMILIES: tuple[type[Family], ...] = (MaskedFamily, EncoderDecoderFamily, DecoderFamily)  # first accepting wins


def family_name(config: Any) -> FamilyName:
    """The family of a model config, before any weights load (load_backbone picks the Auto class by it)."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family.name
    return "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"


def family_for(model: nn.Module, tokenizer: Any) -> Family:
    """The adapter for `model`, chosen by config.model_type (decoder-only also by its Llama-like layout)."""
    for family in FAMILIES:
        if family.accepts(model):
            return family(model, tokenizer)
    names = {f.name: sorted(f.model_types) for f in FAMILIES}
    raise BackboneError(f"model type {model.config.model_type!r} is not supported ({names})")


# ---- hooks ----------------------------------------------------------------------------------------------------


def _block_output(out: Any) -> torch.Tensor:
    """Older transformers return (hidden, ...) from a block, newer return hidden (T5 blocks still a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _take_rows(value: Any, rows: torch.Tensor, full_batch: int) -> Any:
    """Slice the batch dimension of every per-row tensor in a block's inputs (masks, positions, rotary)."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == full_batch and full_batch > 1:
            return value[rows]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, rows, full_batch) for v in value)
    return value


class _ExitRun:
    """Hook state for one forward: which rows are still in the stream, and the states recorded so far."""

    def __init__(self, exit_layers: torch.Tensor, reads: list[torch.Tensor], record_all: bool,
                 decide: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.exit_layers = exit_layers  # (R,) the layer each row leaves at (an upper bound when `decide` is set)
        self.reads = reads  # per stack (R, K) positions read per row
        self.record_all = record_all  # recorded pass: every layer a row passes, for every row
        self.decide = decide  # dynamic exits: (layer, rows, (n, K, H) states) -> (n,) bool, leave here now
        self.n_rows = len(exit_layers)
        self.active = torch.arange(self.n_rows, device=exit_layers.device)  # rows still in the stream
        self.n_entry = self.n_rows  # rows that entered the current stack
        self.local = self.active  # positions of the active rows among those that entered the current stack
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (rows, (n, K, H) states)

    def enter_stack(self) -> None:
        self.n_entry, self.local = len(self.active), torch.arange(len(self.active), device=self.active.device)

    def leave(self, layer_idx: int, stack_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Record states at layer_idx (rows exiting there, or all); return the hidden of the rows that stay."""
        if self.decide is not None and len(self.active):
            staying = self.exit_layers[self.active] > layer_idx
            if staying.any():  # ask the rule about the rows that could still go deeper
                rows = self.active[staying]
                stop = self.decide(layer_idx, rows, self._read(hidden, staying, rows, stack_idx))
                self.exit_layers[rows[stop]] = layer_idx
        exiting = self.exit_layers[self.active] == layer_idx
        recorded = torch.ones_like(exiting) if self.record_all else exiting
        if recorded.any():
            rows = self.active[recorded]
            self.states[layer_idx] = (rows, self._read(hidden, recorded, rows, stack_idx))
        if not exiting.any():
            return hidden
        self.active, self.local = self.active[~exiting], self.local[~exiting]
        return hidden[~exiting]

    def _read(self, hidden: torch.Tensor, selected: torch.Tensor, rows: torch.Tensor, stack_idx: int) -> torch.Tensor:
        """(n, K, H) states of the selected rows at their read positions."""
        positions = self.reads[stack_idx][rows]  # (n, K)
        if positions.shape[1] == 1:  # one gather, as the single-token read-out always did
            return hidden[selected, positions[:, 0]][:, None]
        return hidden[selected][torch.arange(len(rows), device=hidden.device)[:, None], positions]


def _decide(stop: Callable[[int, np.ndarray, np.ndarray], np.ndarray], read: Callable[[int, torch.Tensor], np.ndarray],
            examples: np.ndarray, min_layer: int, layer: int, rows: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """A dynamic exit's decision for the rows of one batch at one layer: stop(layer, examples, probs) -> bool."""
    if layer < min_layer:
        return torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    mask = np.asarray(stop(layer, examples[rows.cpu().numpy()], read(layer, states)), dtype=bool)
    return torch.from_numpy(mask).to(rows.device)


class _StopForward(Exception):
    """Raised from a hook once every row has left: the remaining blocks never run."""


@contextmanager
def _exit_hooks(stacks: Sequence[Stack], run: _ExitRun) -> Iterator[None]:
    """While active, block i first lets rows exiting at its input layer leave, then runs on the rest only."""

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # a later stack (decoder) gets its inputs for every row: keep the rows still running
        if len(run.active) < run.n_rows:
            args = tuple(_take_rows(a, run.active, run.n_rows) for a in args)
            kwargs = {k: _take_rows(v, run.active, run.n_rows) for k, v in kwargs.items()}
        run.enter_stack()
        return args, kwargs

    def before(s: int, i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if i > 0 or stacks[s].reads_input:
            hidden = run.leave(stacks[s].first_layer + i, s, hidden)
            if hidden.shape[0] == 0:
                raise _StopForward
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if len(run.local) < run.n_entry:  # someone has left: slice masks and positions to the rows still running
            args = tuple(_take_rows(a, run.local, run.n_entry) for a in args[1:])
            kwargs = {k: _take_rows(v, run.local, run.n_entry) for k, v in kwargs.items()}
        else:
            args = args[1:]
        return (hidden, *args), kwargs

    def after(s: int, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        hidden = run.leave(stacks[s].last_layer, s, _block_output(out))
        if s == len(stacks) - 1 or hidden.shape[0] == 0:
            raise _StopForward  # the final norm and anything after it are applied by the read-out
        return _with_hidden(out, hidden)

    with ExitStack() as stack:  # prepend: other hooks (e.g. a test counting block calls) see the shrunk batch
        for s, part in enumerate(stacks):
            if s > 0:
                stack.enter_context(part.module.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
            for i, block in enumerate(part.blocks):
                stack.enter_context(block.register_forward_pre_hook(partial(before, s, i), with_kwargs=True,
                                                                    prepend=True))
            stack.enter_context(part.blocks[-1].register_forward_hook(partial(after, s), with_kwargs=True,
                                                                      prepend=True))
        yield


# ---- the engine -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prompt:
    """One example's templated input, tokenised."""

    text: str
    ids: list[int]
    answer: int
    truncated: bool


@dataclass(frozen=True)
class _Plan:
    """The rows of one call: which example, which label's earlier tokens follow the prompt, where each leaves."""

    example: np.ndarray  # (R,) index into the texts
    label: np.ndarray  # (R,) teacher-forced label; -1: none (first-token rule, or an exit head)
    exit_layers: np.ndarray  # (R,)
    section: np.ndarray  # (R,) index into Family.section_ends: the layers this row reads (recorded pass)


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
        if tokenizer.pad_token_id is None:  # decoder tokenizers often have none; right padding never reads it
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        try:
            self.family = family_for(self.model, tokenizer)
        except BackboneError as exc:
            raise BackboneError(f"{self.name}: {exc}") from exc
        self.n_layers = self.family.n_layers
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
        self.batch_size = batch_size
        self._labels: dict[tuple[str, str], LabelTokens] = {}

    @property
    def style(self) -> Style:
        """The template style the backbone reads: "causal" (decoder-only, encoder-decoder) or "mlm"."""
        return self.family.style

    def label_tokens(self, task: Task) -> LabelTokens:
        """The task's label words as this backbone tokenises them; BackboneError if they cannot be scored."""
        key = (task.name, task.digest(self.style))
        if key not in self._labels:
            words = task.label_words(self.style)
            where = f"task {task.name} for {self.name}"
            tokens = []
            for word in words:
                pieces = self.tokenizer.encode(" " + word, add_special_tokens=False)
                if not pieces or self.tokenizer.unk_token_id in pieces:
                    shown = self.tokenizer.convert_ids_to_tokens(pieces)
                    raise BackboneError(f"label word {word!r} of {where} is {len(pieces)} tokens {shown}, unknown to "
                                        "the tokenizer (choose another label word)")
                self.family.check_tokens(word, pieces, where)
                tokens.append(tuple(pieces))
            for c, other in enumerate(tokens):
                same = [words[d] for d in range(c) if tokens[d] == other]
                if same:
                    raise BackboneError(f"label words {same[0]!r} and {words[c]!r} of {where} are the same tokens "
                                        f"{self.tokenizer.convert_ids_to_tokens(list(other))}: no read-out tells "
                                        "them apart (choose other label words)")
            self._labels[key] = LabelTokens(tuple(words), tuple(tokens))
        return self._labels[key]

    def label_ids(self, task: Task) -> torch.Tensor:
        """(C,) first token id of each label word, as the model would produce it after a space."""
        return torch.tensor(self.label_tokens(task).first_ids, device=self.device)

    @torch.no_grad()
    def layer_pass(self, texts: Sequence[str], task: Task, *, pairs: Sequence[str] | None = None,
                   batch_size: int | None = None, show_progress: bool = False) -> LayerPass:
        """probs[b, l] = label distribution at layer l, states[b, l] = answer-position state leaving layer l.

        texts (B,) -> probs (B, L+1, C), states (B, L+1, H), float32. Every block runs once per row (the
        build-time pass); under the sum rule C rows per example (two sections of C for an encoder-decoder)."""
        return self._recorded(texts, task, pairs, batch_size, show_progress, keep_states=True)

    @torch.no_grad()
    def layer_probs(self, texts: Sequence[str], task: Task, *, pairs: Sequence[str] | None = None,
                    batch_size: int | None = None, show_progress: bool = False) -> np.ndarray:
        """probs[b, l, c] = label distribution at layer l; texts (B,) -> (B, L+1, C) float32 (layer_pass, no states)."""
        return self._recorded(texts, task, pairs, batch_size, show_progress, keep_states=False).probs

    @torch.no_grad()
    def predict(
        self,
        texts: Sequence[str],
        task: Task,
        exit_layers: Sequence[int] | np.ndarray | int,
        *,
        pairs: Sequence[str] | None = None,
        head: ExitHead | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Predictions:
        """Run each text through exactly its own exit_layers[b] blocks and classify from that layer.

        texts (B,), exit_layers (B,) ints in [0, L] or one int for all -> Predictions with (B,) and (B, C).
        head None: the LM head on the label words (the values `layer_probs` records); else head.probs(l, states)
        on the answer-position states `layer_pass` records, one row per example."""
        layers = np.broadcast_to(np.asarray(exit_layers, dtype=np.int64), (len(texts),)).copy()
        if layers.size and (layers.min() < 0 or layers.max() > self.n_layers):
            raise BackboneError(f"exit layers must lie in [0, {self.n_layers}] for {self.name}")
        return self._predict(texts, task, layers, pairs, head, batch_size, show_progress, self.family.stacks)

    def rule_exit_unsupported(self, task: Task, head: ExitHead | None = None) -> str | None:
        """Why predict_until cannot run this task (and head) here, or None: it needs one read-out row per example
        and a single stack of blocks."""
        if self.family.name == "encoder-decoder":
            return f"{self.name}: exits decided during the forward run on decoder-only and masked LMs"
        if head is None and self.label_tokens(task).summed:
            return (f"task {task.name}'s label words need the sum rule ({self.name}), which reads C rows per example; "
                    "an exit decided during the forward needs one read-out per row: use an exit head "
                    "(raee build --head offramp)")
        return None

    @torch.no_grad()
    def predict_until(
        self,
        texts: Sequence[str],
        task: Task,
        stop: Callable[[int, np.ndarray, np.ndarray], np.ndarray],
        *,
        pairs: Sequence[str] | None = None,
        head: ExitHead | None = None,
        min_layer: int = 0,
        batch_size: int | None = None,
    ) -> Predictions:
        """Run each text until stop(l, examples, probs) says so (from layer min_layer on), or to L; classify there.

        stop gets the layer l, the (n,) indices into texts of the examples still running and their (n, C) label
        distributions at l (the LM head's label words, or `head`), and returns (n,) bool: leave at l. A row that
        leaves at l has run exactly l blocks, and its answer is the distribution `stop` saw there, so the exit
        layers equal those a rule applied to the recorded layers (`layer_pass`) picks. One row per example:
        label words under the sum rule need a `head`; decoder-only and masked LMs."""
        reason = self.rule_exit_unsupported(task, head)
        if reason is not None:
            raise BackboneError(reason)
        labels = self.label_tokens(task)
        if not 0 <= min_layer <= self.n_layers:
            raise BackboneError(f"min_layer must lie in [0, {self.n_layers}], got {min_layer}")
        prompts = self._prompts(texts, task, pairs, labels)
        plan = self._plan(len(texts), None, np.full(len(texts), self.n_layers, dtype=np.int64), None)
        out = np.zeros((len(texts), task.n_classes), dtype=np.float32)
        exits = np.full(len(texts), self.n_layers, dtype=np.int64)

        def read(layer: int, states: torch.Tensor) -> np.ndarray:
            if head is not None:
                return self._head_probs(head, layer, states, task.n_classes)
            return self._first_token_probs(layer, states, labels).cpu().numpy()

        for idx, run in self._runs(prompts, plan, labels, batch_size, False, record_all=False,
                                   stacks=self.family.stacks, n_read=1,
                                   decide=lambda idx: partial(_decide, stop, read, plan.example[idx], min_layer)):
            for layer, (rows, layer_states) in run.states.items():
                r = plan.example[idx[rows.cpu().numpy()]]
                out[r], exits[r] = read(layer, layer_states), layer
        truncated = np.array([p.truncated for p in prompts], dtype=bool)
        return Predictions(out.argmax(axis=1).astype(np.int64), out, exits, truncated)

    @torch.no_grad()
    def predict_blocks(self, texts: Sequence[str], task: Task, blocks: Sequence[int], *,
                       pairs: Sequence[str] | None = None, head: ExitHead | None = None,
                       batch_size: int | None = None) -> Predictions:
        """Run only `blocks` (0-based, ascending, a subset of range(L)) in order, then classify after the last.

        The model's own forward runs with the other blocks out of its block list (SLEB-style removal, each
        block keeping its attention type), so they never execute; exit_layers = len(blocks), which is also the
        layer index a `head` is asked for. Decoder-only backbones."""
        kept = [int(b) for b in blocks]
        if any(b < 0 or b >= self.n_layers for b in kept) or any(a >= b for a, b in pairwise(kept)):
            raise BackboneError(f"blocks must be ascending, distinct and in [0, {self.n_layers}) for {self.name}, "
                                f"got {list(blocks)}")
        layers = np.full(len(texts), len(kept), dtype=np.int64)
        with self.family.keep_blocks(kept) as stacks:  # BackboneError for families without block subsets
            if kept:
                return self._predict(texts, task, layers, pairs, head, batch_size, False, stacks)
        return self._predict(texts, task, layers, pairs, head, batch_size, False, self.family.stacks)  # layer 0

    # ---- internals ----

    def _recorded(self, texts: Sequence[str], task: Task, pairs: Sequence[str] | None, batch_size: int | None,
                  show_progress: bool, *, keep_states: bool) -> LayerPass:
        labels = self.label_tokens(task)
        prompts = self._prompts(texts, task, pairs, labels)
        n, n_layers, n_classes = len(texts), self.n_layers, task.n_classes
        ends = np.array(self.family.section_ends(labels.summed))
        owner = np.searchsorted(ends, np.arange(n_layers + 1))  # (L+1,) the section whose rows read each layer
        plan = self._plan(n, labels if labels.summed else None, None, ends)
        out = np.zeros((n, n_layers + 1, n_classes), dtype=np.float32)  # probs, or summed log-probs per label
        hidden = self.model.config.get_text_config().hidden_size
        states = np.zeros((n, n_layers + 1, hidden), dtype=np.float32) if keep_states else None
        for idx, run in self._runs(prompts, plan, labels, batch_size, show_progress, record_all=True,
                                   stacks=self.family.stacks, n_read=labels.n_read):
            for layer, (rows, layer_states) in run.states.items():
                r = idx[rows.cpu().numpy()]
                own = plan.section[r] == owner[layer]
                if labels.summed:
                    if own.any():  # encoder-decoder: the other section's rows read this layer
                        scores = self._label_log_probs(layer, layer_states[own], plan.label[r[own]], labels)
                        out[plan.example[r[own]], layer, plan.label[r[own]]] = scores.cpu().numpy()
                else:
                    out[plan.example[r], layer] = self._first_token_probs(layer, layer_states, labels).cpu().numpy()
                if states is not None:  # one prompt-only state per example: label 0's row, last section
                    first = (plan.label[r] <= 0) & (plan.section[r] == len(ends) - 1)
                    states[plan.example[r[first]], layer] = layer_states[first, 0].float().cpu().numpy()
        probs = torch.softmax(torch.from_numpy(out), dim=-1).numpy() if labels.summed else out
        return LayerPass(probs, states if states is not None else np.zeros((n, n_layers + 1, 0), dtype=np.float32))

    def _predict(self, texts: Sequence[str], task: Task, layers: np.ndarray, pairs: Sequence[str] | None,
                 head: ExitHead | None, batch_size: int | None, show_progress: bool,
                 stacks: tuple[Stack, ...]) -> Predictions:
        labels = self.label_tokens(task)
        prompts = self._prompts(texts, task, pairs, labels)
        summed = labels.summed and head is None  # a head reads one state per example
        plan = self._plan(len(texts), labels if summed else None, layers, None)
        out = np.zeros((len(texts), task.n_classes), dtype=np.float32)
        for idx, run in self._runs(prompts, plan, labels, batch_size, show_progress, record_all=False,
                                   stacks=stacks, n_read=labels.n_read if summed else 1):
            for layer, (rows, layer_states) in run.states.items():  # at most L+1 groups, one per exit layer
                r = idx[rows.cpu().numpy()]
                if head is not None:
                    out[plan.example[r]] = self._head_probs(head, layer, layer_states, task.n_classes)
                elif summed:
                    scores = self._label_log_probs(layer, layer_states, plan.label[r], labels)
                    out[plan.example[r], plan.label[r]] = scores.cpu().numpy()
                else:
                    out[plan.example[r]] = self._first_token_probs(layer, layer_states, labels).cpu().numpy()
        probs = torch.softmax(torch.from_numpy(out), dim=-1).numpy() if summed else out
        truncated = np.array([p.truncated for p in prompts], dtype=bool)
        return Predictions(probs.argmax(axis=1).astype(np.int64), probs, layers, truncated)

    def _plan(self, n: int, summed: LabelTokens | None, layers: np.ndarray | None, ends: np.ndarray | None) -> _Plan:
        """Rows: one per example, or one per (example, label) under the sum rule; exits given, or each section's end."""
        n_labels = len(summed.tokens) if summed is not None else 1
        example = np.repeat(np.arange(n), n_labels)  # example-major: an example's rows stay together
        label = np.tile(np.arange(n_labels), n) if summed is not None else np.full(n, -1)
        if layers is not None:
            return _Plan(example, label, layers[example], np.zeros(len(example), dtype=np.int64))
        section = np.repeat(np.arange(len(ends)), len(example))
        return _Plan(np.tile(example, len(ends)), np.tile(label, len(ends)), ends[section], section)

    def _first_token_probs(self, layer: int, states: torch.Tensor, labels: LabelTokens) -> torch.Tensor:
        """softmax over the labels' first-token logits; states (n, K, H) -> (n, C)."""
        ids = torch.tensor(labels.first_ids, device=states.device)
        return torch.softmax(self.family.readout(layer).logits(states[:, 0], ids).float(), dim=-1)

    def _label_log_probs(self, layer: int, states: torch.Tensor, label: np.ndarray,
                         labels: LabelTokens) -> torch.Tensor:
        """score[r] = sum_j log softmax_V(logits(states[r, j]))[tokens[label[r]][j]]; (n, K, H) -> (n,)."""
        n, k, h = states.shape
        all_targets, all_valid = labels.padded()  # (C, K)
        targets = torch.from_numpy(all_targets[label]).to(states.device)  # (n, K)
        valid = torch.from_numpy(all_valid[label]).to(states.device)
        logits = self.family.readout(layer).logits(states.reshape(n * k, h), None).float()  # (n K, V)
        picked = torch.log_softmax(logits, dim=-1).gather(1, targets.reshape(-1, 1)).reshape(n, k)
        return torch.where(valid, picked, torch.zeros_like(picked)).sum(dim=1)

    @staticmethod
    def _head_probs(head: ExitHead, layer: int, states: torch.Tensor, n_classes: int) -> np.ndarray:
        probs = np.asarray(head.probs(layer, states[:, 0].float().cpu().numpy()), dtype=np.float32)
        if probs.shape != (len(states), n_classes):
            raise BackboneError(f"exit head {head.name} returned shape {probs.shape} at layer {layer}; expected "
                                f"({len(states)}, {n_classes})")
        return probs

    def _runs(self, prompts: list[_Prompt], plan: _Plan, labels: LabelTokens, batch_size: int | None,
              show_progress: bool, *, record_all: bool, stacks: tuple[Stack, ...], n_read: int,
              decide: Callable[[np.ndarray], Callable] | None = None) -> Iterator[tuple[np.ndarray, _ExitRun]]:
        """Yield (plan row indices, finished run) per mini-batch of rows; batches group similar exits and lengths."""
        lengths = np.array([len(prompts[b].text) for b in plan.example], dtype=np.int64)
        order = np.lexsort((lengths, plan.exit_layers))  # by exit layer, then prompt length
        size = batch_size or self.batch_size
        for start in tqdm(range(0, len(order), size), disable=not show_progress, desc="row batches"):
            idx = order[start : start + size]
            rows = []
            for r in idx:
                prompt, c = prompts[plan.example[r]], plan.label[r]
                prefix = labels.tokens[c][:-1] if c >= 0 else ()
                rows.append(self.family.layout(prompt.ids, prompt.answer, prefix, int(plan.exit_layers[r])))
            yield idx, self._forward(rows, plan.exit_layers[idx], record_all, stacks, n_read,
                                     decide(idx) if decide is not None else None)

    def _forward(self, rows: list[_Row], exit_layers: np.ndarray, record_all: bool, stacks: tuple[Stack, ...],
                 n_read: int, decide: Callable | None = None) -> _ExitRun:
        inputs = [_pad([row.ids[s] for row in rows], self.tokenizer.pad_token_id, self.device)
                  for s in range(len(rows[0].ids))]
        reads = []
        for s, (ids, _) in enumerate(inputs):
            answers = torch.tensor([row.answers[s] for row in rows], device=self.device)
            offsets = torch.arange(n_read, device=self.device)
            reads.append((answers[:, None] + offsets).clamp(max=ids.shape[1] - 1))  # (R, K) past the end: unused
        run = _ExitRun(torch.as_tensor(exit_layers, device=self.device).clone(), reads, record_all, decide)
        with _exit_hooks(stacks, run):
            try:
                self.family.run(inputs)
            except _StopForward:
                pass
        return run

    def _prompts(self, texts: Sequence[str], task: Task, pairs: Sequence[str] | None,
                 labels: LabelTokens) -> list[_Prompt]:
        """Each example templated and tokenised, checked before any work so bad input fails fast.

        Prompts leave room for the label tokens that follow them under the sum rule (n_read - 1)."""
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise BackboneError("texts must be a sequence of strings")
        if task.has_pairs != (pairs is not None):
            need = "classifies text pairs: pass pairs=[...]" if task.has_pairs else "has no text_pair: drop pairs="
            raise BackboneError(f"task {task.name} {need}")
        if pairs is not None and (len(pairs) != len(texts) or any(not isinstance(p, str) for p in pairs)):
            raise BackboneError(f"pairs must be {len(texts)} strings, one per text")
        limit = self.max_length - (labels.n_read - 1)
        mask = self.tokenizer.mask_token or "<mask>"
        second = list(pairs) if pairs is not None else [None] * len(texts)
        texts_in = [task.prompt(t, self.style, mask, pair=p) for t, p in zip(texts, second, strict=True)]
        all_ids = self.tokenizer(texts_in)["input_ids"] if texts_in else []
        prompts = []
        for text, pair, prompt, ids in zip(texts, second, texts_in, all_ids, strict=True):
            cut = len(ids) > limit
            if cut:
                prompt, ids = self._fit(text, pair, task, limit)
            prompts.append(_Prompt(prompt, list(ids), self.family.answer_position(ids), cut))
        return prompts

    def _prompt(self, text: str, task: Task, pair: str | None = None) -> str:
        """The templated text as the backbone reads it (cut to fit max_length)."""
        return self._prompts([text], task, None if pair is None else [pair], self.label_tokens(task))[0].text

    def _fit(self, text: str, pair: str | None, task: Task, limit: int) -> tuple[str, list[int]]:
        """Cut the text, then the pair, never the template, until the prompt is at most `limit` tokens."""
        mask = self.tokenizer.mask_token or "<mask>"
        for _ in range(8):  # each round cuts at least the overflow; retokenising may shift a token or two
            prompt = task.prompt(text, self.style, mask, pair=pair)
            ids = self.tokenizer(prompt)["input_ids"]
            over = len(ids) - limit
            if over <= 0:
                return prompt, ids
            text, over = self._cut(text, over)
            if over > 0 and pair is not None:
                pair, over = self._cut(pair, over)
            if over > 0:
                break
        raise BackboneError(f"{self.name}: the template of task {task.name} alone is longer than {limit} tokens")

    def _cut(self, text: str, over: int) -> tuple[str, int]:
        """(text shortened by over tokens plus 2 of retokenisation slack, tokens still over once it is empty)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        keep = max(len(ids) - over - 2, 0)
        return self.tokenizer.decode(ids[:keep]), (max(over - len(ids), 0) if keep == 0 else 0)


def _pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids (R, T), attention mask (R, T)) int64, as a tokenizer's padding=True gives them."""
    lengths = np.array([len(s) for s in seqs])
    mask = np.arange(lengths.max()) < lengths[:, None]  # (R, T)
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.concatenate(seqs)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask.astype(np.int64)).to(device)
