"""Contracts of the layer-wise engine: exactness, real savings, batch independence, parity with the model.

Every family runs the generic contracts (tiny_backbone_reused); decoder-only specifics (multi-token label
words, text pairs, block subsets) run on tiny Llama and Gemma 3. Encoder-decoders: tests/test_t5.py.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from raee.backbones import BackboneError, LayerPass
from raee.heads import ExitHead
from raee.tasks import DataSpec, Task, builtin_tasks, get_task
from tests.fixtures_models import SENTENCES, tiny_backbone

SST2 = get_task("sst2")
DATA = DataSpec(text="t", label="l")
# first tokens collide ("not"): each label scores the sum of its tokens' log-probabilities
MULTI = Task(name="multi", template=SST2.template, label_values=("0", "1", "2"),
             words=("not good", "not great", "not a mess"), data=DATA)
# several tokens, distinct first tokens: scored by the first token, like the single words "great" / "bad"
FIRSTS = Task(name="firsts", template=SST2.template, label_values=("0", "1"), words=("great film", "bad film"),
              data=DATA)
SINGLE = Task(name="single", template=SST2.template, label_values=("0", "1"), words=("great", "bad"), data=DATA)
PAIRS = Task(name="pairs", template="{text} ? {text_pair} The answer is", label_values=("0", "1"),
             words=("yes", "no"), data=DataSpec(text="t", label="l", text_pair="p"),
             mlm_template="{text} ? {text_pair} It was {mask} .", mlm_words=("yes", "no"))


@contextmanager
def count_block_rows(backbone):
    """Plain hooks, independent of the engine's own: counts[k] = rows entering block k (all stacks, in order)."""
    blocks = [block for stack in backbone.family.stacks for block in stack.blocks]
    counts = [0] * len(blocks)

    def count(k, module, args, kwargs):
        counts[k] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    with ExitStack() as stack:
        for k, block in enumerate(blocks):
            stack.callback(block.register_forward_pre_hook(partial(count, k), with_kwargs=True).remove)
        yield counts


class LinearHead:
    """A random linear off-ramp per layer, p = softmax(states @ W[l] + b[l]): a stand-in `ExitHead`."""

    def __init__(self, n_layers: int, hidden: int, n_classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(n_layers + 1, hidden, n_classes)).astype(np.float32)
        self.b = rng.normal(size=(n_layers + 1, n_classes)).astype(np.float32)
        self.calls: list[tuple[int, int]] = []  # (layer, rows) per call

    @property
    def name(self) -> str:
        return "linear-test"

    def probs(self, layer_idx: int, states: np.ndarray) -> np.ndarray:
        self.calls.append((layer_idx, len(states)))
        z = states @ self.w[layer_idx] + self.b[layer_idx]  # (n, C)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def head_for(backbone, task) -> LinearHead:
    return LinearHead(backbone.n_layers, backbone.model.config.get_text_config().hidden_size, task.n_classes)


def softmax(x: torch.Tensor) -> np.ndarray:
    return torch.softmax(x.float(), dim=-1).numpy()


# ---- every family ---------------------------------------------------------------------------------------------


def test_predict_at_every_layer_equals_layer_probs(tiny_backbone_reused):
    probs = tiny_backbone_reused.layer_probs(SENTENCES, SST2)  # (B, L+1, C)
    assert probs.shape == (len(SENTENCES), tiny_backbone_reused.n_layers + 1, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    for layer in range(tiny_backbone_reused.n_layers + 1):
        pred = tiny_backbone_reused.predict(SENTENCES, SST2, layer)
        np.testing.assert_allclose(pred.probs, probs[:, layer], atol=1e-4)
        np.testing.assert_array_equal(pred.labels, probs[:, layer].argmax(-1))


def test_mixed_exit_layers_are_exact_and_run_only_their_blocks(tiny_backbone_reused):
    backbone = tiny_backbone_reused
    n_layers = backbone.n_layers
    probs = backbone.layer_probs(SENTENCES, SST2)
    exits = np.array([0, n_layers, 2, 1, 3, n_layers, 0, n_layers - 1])[: len(SENTENCES)]
    with count_block_rows(backbone) as counts:
        pred = backbone.predict(SENTENCES, SST2, exits)
    np.testing.assert_allclose(pred.probs, probs[np.arange(len(exits)), exits], atol=1e-4)
    assert sum(counts) == exits.sum()  # exactly l blocks per example
    # block k runs only for the examples that exit after it: never the whole batch to the deepest exit
    assert counts == [int((exits > k).sum()) for k in range(n_layers)]


def test_a_text_does_not_depend_on_its_batch(tiny_backbone_reused):
    together = tiny_backbone_reused.layer_probs(SENTENCES, SST2, batch_size=len(SENTENCES))
    for i in (0, 3, len(SENTENCES) - 1):  # short and long texts: padding differs in each batch
        alone = tiny_backbone_reused.layer_probs([SENTENCES[i]], SST2)
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5)
    reversed_order = tiny_backbone_reused.layer_probs(SENTENCES[::-1], SST2, batch_size=3)
    np.testing.assert_allclose(reversed_order[::-1], together, atol=1e-5)


def test_layer_pass_records_layer_probs_exactly_and_the_states_heads_read(tiny_backbone_reused):
    backbone = tiny_backbone_reused
    recorded = backbone.layer_pass(SENTENCES, SST2)
    assert isinstance(recorded, LayerPass)
    hidden = backbone.model.config.get_text_config().hidden_size
    assert recorded.states.shape == (len(SENTENCES), backbone.n_layers + 1, hidden)
    assert recorded.states.dtype == recorded.probs.dtype == np.float32
    np.testing.assert_array_equal(recorded.probs, backbone.layer_probs(SENTENCES, SST2))
    head = head_for(backbone, SST2)
    assert isinstance(head, ExitHead)
    for layer in range(backbone.n_layers + 1):  # an off-ramp fitted on the recorded states reproduces at inference
        pred = backbone.predict(SENTENCES, SST2, layer, head=head)
        np.testing.assert_allclose(pred.probs, head.probs(layer, recorded.states[:, layer]), atol=1e-4)
    exits = np.arange(len(SENTENCES)) % (backbone.n_layers + 1)
    with count_block_rows(backbone) as counts:
        pred = backbone.predict(SENTENCES, SST2, exits, head=head)
    assert counts == [int((exits > k).sum()) for k in range(backbone.n_layers)]
    expected = np.stack([head.probs(e, recorded.states[i, e][None])[0] for i, e in enumerate(exits)])
    np.testing.assert_allclose(pred.probs, expected, atol=1e-4)


@pytest.mark.parametrize("use_head", [False, True])
def test_confidence_exits_stop_where_the_recorded_layers_say_and_run_only_their_blocks(tiny_backbone_reused,
                                                                                      use_head):
    """predict_until: a rule on each layer's distribution decides the exit during the forward; the exits equal the
    rule applied to the recorded layers (first layer >= min_layer where it holds, else L), the answers are the
    recorded distributions there, and each example runs exactly its exit layer's blocks."""
    backbone = tiny_backbone_reused
    if backbone.family.name == "encoder-decoder":
        with pytest.raises(BackboneError, match="decoder-only and masked"):
            backbone.predict_until(SENTENCES, SST2, lambda layer, rows, probs: probs.max(1) > 0.5)
        return
    recorded = backbone.layer_pass(SENTENCES, SST2)
    head = head_for(backbone, SST2) if use_head else None
    probs = (np.stack([head.probs(layer, recorded.states[:, layer]) for layer in range(backbone.n_layers + 1)],
                      axis=1) if use_head else recorded.probs)  # (B, L+1, C)
    threshold = float(np.median(probs.max(-1)))  # some examples stop early, some never do
    seen: list[tuple[int, list[int]]] = []

    def stop(layer: int, rows: np.ndarray, layer_probs: np.ndarray) -> np.ndarray:
        seen.append((layer, sorted(rows.tolist())))
        np.testing.assert_allclose(layer_probs, probs[rows, layer], atol=1e-4)
        return layer_probs.max(1) > threshold

    with count_block_rows(backbone) as counts:
        pred = backbone.predict_until(SENTENCES, SST2, stop, head=head, min_layer=1)
    confident = probs.max(-1) > threshold  # (B, L+1)
    confident[:, 0] = False  # min_layer=1
    expected = np.where(confident.any(1), confident.argmax(1), backbone.n_layers)
    np.testing.assert_array_equal(pred.exit_layers, expected)
    np.testing.assert_allclose(pred.probs, probs[np.arange(len(SENTENCES)), expected], atol=1e-4)
    assert counts == [int((expected > k).sum()) for k in range(backbone.n_layers)]
    assert 0 not in {layer for layer, _ in seen}  # never asked below min_layer
    assert backbone.n_layers not in {layer for layer, _ in seen}  # at L everything leaves without asking


def test_confidence_exits_need_one_read_out_per_row():
    backbone = tiny_backbone("llama")
    with pytest.raises(BackboneError, match="sum rule"):
        backbone.predict_until(SENTENCES, MULTI, lambda layer, rows, probs: probs.max(1) > 0.5)
    with pytest.raises(BackboneError, match="min_layer"):
        backbone.predict_until(SENTENCES, SST2, lambda layer, rows, probs: probs.max(1) > 0.5, min_layer=99)


def test_families_name_their_adapter_and_template(tiny_backbone_reused):
    family = tiny_backbone_reused.family
    expected = {"decoder": "causal", "masked": "mlm", "encoder-decoder": "causal"}
    assert expected[family.name] == tiny_backbone_reused.style
    assert tiny_backbone_reused.n_layers == sum(len(s.blocks) for s in family.stacks)


# ---- decoder-only and masked: the model's own forward ---------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "gpt2", "bert", "roberta", "distilbert"])
def test_layer_probs_match_the_models_own_forward(family):
    """Layer l of the engine == the model's hidden_states[l] through its own head (final norm once)."""
    backbone = tiny_backbone(family)
    text = SENTENCES[2]
    mask = backbone.tokenizer.mask_token or "<mask>"
    batch = backbone.tokenizer(SST2.prompt(text, backbone.style, mask), return_tensors="pt")
    ids = backbone.label_ids(SST2)
    readout = backbone.family.readout(0)
    with torch.no_grad():
        out = backbone.model(**batch, output_hidden_states=True)
        if backbone.style == "causal":
            pos = -1
            expected = [readout.logits(h[:, pos], ids) for h in out.hidden_states[:-1]]
            expected.append(out.logits[:, pos, ids])  # the model applies the final norm to the last layer itself
        else:
            pos = int((batch["input_ids"][0] == backbone.tokenizer.mask_token_id).nonzero()[0, 0])
            expected = [readout.logits(h[:, pos], ids) for h in out.hidden_states]
            torch.testing.assert_close(expected[-1], out.logits[:, pos, ids])
    recorded = backbone.layer_pass([text], SST2)
    np.testing.assert_allclose(recorded.probs[0], softmax(torch.cat(expected)), atol=1e-5)
    states = torch.stack([h[0, pos] for h in out.hidden_states]).numpy()  # (L+1, H)
    last = -1 if backbone.style == "causal" else len(states)  # causal: HF's last entry is after the final norm
    np.testing.assert_allclose(recorded.states[0, :last], states[:last], atol=1e-5)


def test_every_task_runs_on_the_decoder_family():
    backbone = tiny_backbone("llama")
    for task in builtin_tasks().values():
        probs = backbone.layer_probs(SENTENCES[:2], task)
        assert probs.shape == (2, backbone.n_layers + 1, task.n_classes)


# ---- multi-token label words ----------------------------------------------------------------------------------


def by_hand_sum_rule(backbone, texts, task) -> np.ndarray:
    """softmax_c sum_j log p(token_j of label c | prompt, earlier tokens), each row a plain HF forward; (B, C)."""
    labels = backbone.label_tokens(task)
    out = np.zeros((len(texts), task.n_classes))
    for b, text in enumerate(texts):
        prompt = backbone.tokenizer(task.prompt(text))["input_ids"]
        for c, tokens in enumerate(labels.tokens):
            ids = torch.tensor([prompt + list(tokens[:-1])])
            with torch.no_grad():
                logp = torch.log_softmax(backbone.model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
            out[b, c] = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens))
    return softmax(torch.from_numpy(out))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_multi_token_labels_sum_log_probs_exactly(family):
    backbone = tiny_backbone(family)
    labels = backbone.label_tokens(MULTI)
    assert labels.summed and labels.n_read == 3 and [len(t) for t in labels.tokens] == [2, 2, 3]
    probs = backbone.layer_probs(SENTENCES, MULTI)
    assert probs.shape == (len(SENTENCES), backbone.n_layers + 1, 3)
    np.testing.assert_allclose(probs[:, -1], by_hand_sum_rule(backbone, SENTENCES, MULTI), atol=1e-5)
    for layer in range(backbone.n_layers + 1):
        np.testing.assert_allclose(backbone.predict(SENTENCES, MULTI, layer).probs, probs[:, layer], atol=1e-4)
    exits = np.array([0, 4, 2, 1, 3, 4, 0, 2])
    with count_block_rows(backbone) as counts:
        pred = backbone.predict(SENTENCES, MULTI, exits)
    np.testing.assert_allclose(pred.probs, probs[np.arange(len(exits)), exits], atol=1e-4)
    assert counts == [3 * int((exits > k).sum()) for k in range(backbone.n_layers)]  # one row per label
    alone = backbone.layer_probs(SENTENCES[5:6], MULTI)
    np.testing.assert_allclose(alone[0], probs[5], atol=1e-5)


def test_multi_token_labels_with_distinct_first_tokens_read_the_first_token():
    backbone = tiny_backbone("llama")
    assert not backbone.label_tokens(FIRSTS).summed
    np.testing.assert_array_equal(backbone.layer_probs(SENTENCES, FIRSTS), backbone.layer_probs(SENTENCES, SINGLE))


def test_a_head_reads_one_row_per_example_under_the_sum_rule():
    backbone = tiny_backbone("llama")
    recorded = backbone.layer_pass(SENTENCES, MULTI)
    prompt_only = backbone.layer_pass(SENTENCES, SINGLE)  # same template: the answer-position states are the same
    np.testing.assert_allclose(recorded.states, prompt_only.states, atol=1e-5)
    head = head_for(backbone, MULTI)
    exits = np.array([0, 4, 2, 1, 3, 4, 0, 2])
    with count_block_rows(backbone) as counts:
        pred = backbone.predict(SENTENCES, MULTI, exits, head=head)
    assert counts == [int((exits > k).sum()) for k in range(backbone.n_layers)]
    expected = np.stack([head.probs(e, recorded.states[i, e][None])[0] for i, e in enumerate(exits)])
    np.testing.assert_allclose(pred.probs, expected, atol=1e-4)


def test_label_words_that_cannot_be_scored_are_clear_errors():
    llama, bert = tiny_backbone("llama"), tiny_backbone("bert")
    same = Task(name="same", template=SST2.template, label_values=("0", "1"), words=("good", "good "), data=DATA)
    with pytest.raises(BackboneError, match=r"'good' and 'good ' of task same .* same tokens \['good'\]"):
        llama.layer_probs(SENTENCES[:1], same)
    unknown = Task(name="unknown", template=SST2.template, label_values=("0", "1"), words=("positive", "zzzunknown"),
                   data=DATA)
    with pytest.raises(BackboneError, match="zzzunknown"):
        llama.layer_probs(SENTENCES[:1], unknown)
    masked = Task(name="masked", template=SST2.template, label_values=("0", "1"), words=("a", "b"), data=DATA,
                  mlm_template="{text} It was {mask} .", mlm_words=("great", "not great"))
    with pytest.raises(BackboneError, match=r"'not great' of task masked .* is 2 tokens \['not', 'great'\]"):
        bert.layer_probs(SENTENCES[:1], masked)


def test_sum_rule_prompts_leave_room_for_the_label_tokens():
    backbone = tiny_backbone("llama")  # max_length 64, longest label 3 tokens
    long_text = " ".join(["great"] * 100)
    prompt = backbone._prompt(long_text, MULTI)
    assert len(backbone.tokenizer(prompt)["input_ids"]) <= 64 - 2 and prompt.endswith("The answer is")
    assert backbone.predict([long_text], MULTI, 4).truncated.tolist() == [True]


# ---- text pairs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_pairs_are_templated_and_exact(family):
    backbone = tiny_backbone(family)
    texts, pairs = SENTENCES[:4], SENTENCES[4:]
    joined = Task(name="joined", template="{text} The answer is", label_values=("0", "1"), words=("yes", "no"),
                  data=DATA, mlm_template="{text} It was {mask} .", mlm_words=("yes", "no"))
    probs = backbone.layer_probs(texts, PAIRS, pairs=pairs)
    same = backbone.layer_probs([f"{t} ? {p}" for t, p in zip(texts, pairs, strict=True)], joined)
    np.testing.assert_allclose(probs, same, atol=1e-6)
    exits = np.arange(4) % (backbone.n_layers + 1)
    np.testing.assert_allclose(backbone.predict(texts, PAIRS, exits, pairs=pairs).probs, probs[np.arange(4), exits],
                               atol=1e-4)


def test_pairs_are_cut_after_the_text_and_never_the_template():
    backbone = tiny_backbone("llama")  # word tokenizer, max_length 64
    long_text, long_pair = " ".join(["great"] * 80), " ".join(["bad"] * 80)
    prompt = backbone._prompt(long_text, PAIRS, "the plot")
    assert prompt.endswith("? the plot The answer is") and "great" in prompt
    assert len(backbone.tokenizer(prompt)["input_ids"]) <= 64
    prompt = backbone._prompt("the film", PAIRS, long_pair)  # the text goes first, then the pair is cut
    assert prompt.startswith(" ? bad") and prompt.endswith("The answer is") and "film" not in prompt
    assert len(backbone.tokenizer(prompt)["input_ids"]) <= 64
    pred = backbone.predict(["fine", long_text], PAIRS, 2, pairs=["the plot", long_pair])
    assert pred.truncated.tolist() == [False, True]


def test_pairs_must_match_the_task():
    backbone = tiny_backbone("llama")
    with pytest.raises(BackboneError, match="classifies text pairs"):
        backbone.layer_probs(SENTENCES[:2], PAIRS)
    with pytest.raises(BackboneError, match="has no text_pair"):
        backbone.predict(SENTENCES[:2], SST2, 1, pairs=SENTENCES[2:4])
    with pytest.raises(BackboneError, match="one per text"):
        backbone.layer_probs(SENTENCES[:2], PAIRS, pairs=SENTENCES[:1])


# ---- block subsets (SLEB) -------------------------------------------------------------------------------------


def without_blocks(model, blocks, *, follow_types: bool = True):
    """A deep copy of a decoder-only model with only `blocks` left in its block list and its config to match."""
    pruned = copy.deepcopy(model)
    pruned.model.layers = nn.ModuleList([pruned.model.layers[i] for i in blocks])
    pruned.config.num_hidden_layers = len(blocks)
    if follow_types and getattr(pruned.config, "layer_types", None) is not None:
        pruned.config.layer_types = [pruned.config.layer_types[i] for i in blocks]
    return pruned


def own_forward_probs(backbone, model, texts, task) -> np.ndarray:
    ids = backbone.label_ids(task)
    rows = []
    for text in texts:
        batch = backbone.tokenizer(task.prompt(text), return_tensors="pt")
        with torch.no_grad():
            rows.append(softmax(model(**batch, use_cache=False).logits[0, -1, ids]))
    return np.stack(rows)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("blocks", [[0, 2], [1, 3], [0, 1, 3], [3], [0, 1, 2, 3]])
def test_predict_blocks_is_the_model_with_the_other_blocks_deleted(family, blocks):
    backbone = tiny_backbone(family)
    with count_block_rows(backbone) as counts:
        pred = backbone.predict_blocks(SENTENCES, SST2, blocks)
    assert counts == [len(SENTENCES) if k in blocks else 0 for k in range(backbone.n_layers)]  # removed: never run
    assert pred.exit_layers.tolist() == [len(blocks)] * len(SENTENCES)
    pruned = without_blocks(backbone.model, blocks)
    np.testing.assert_allclose(pred.probs, own_forward_probs(backbone, pruned, SENTENCES, SST2), atol=1e-4)
    assert backbone.n_layers == len(backbone.family.stacks[0].blocks) == 4  # the model is whole again
    np.testing.assert_allclose(backbone.predict(SENTENCES, SST2, 4).probs, backbone.layer_probs(SENTENCES, SST2)[:, 4],
                               atol=1e-4)


def test_predict_blocks_keeps_each_blocks_attention_type():
    backbone = tiny_backbone("gemma3")  # layers alternate sliding (window 4) and full attention
    blocks = [1, 2, 3]
    pred = backbone.predict_blocks(SENTENCES, SST2, blocks)
    wrong = without_blocks(backbone.model, blocks, follow_types=False)  # types by position: the test can tell
    assert not np.allclose(pred.probs, own_forward_probs(backbone, wrong, SENTENCES, SST2), atol=1e-4)


def test_predict_blocks_with_multi_token_labels_and_heads():
    backbone = tiny_backbone("llama")
    blocks = [0, 3]
    pred = backbone.predict_blocks(SENTENCES, MULTI, blocks)
    pruned_backbone = copy.copy(backbone)
    pruned_backbone.model = without_blocks(backbone.model, blocks)
    np.testing.assert_allclose(pred.probs, by_hand_sum_rule(pruned_backbone, SENTENCES, MULTI), atol=1e-5)
    head = head_for(backbone, SST2)
    pred = backbone.predict_blocks(SENTENCES, SST2, blocks, head=head)
    assert {layer for layer, _ in head.calls} == {2}  # the head is asked for layer len(blocks)
    np.testing.assert_allclose(pred.probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(backbone.predict_blocks(SENTENCES, SST2, []).probs,
                               backbone.predict(SENTENCES, SST2, 0).probs, atol=1e-6)


def test_predict_blocks_errors():
    llama = tiny_backbone("llama")
    for blocks in ([2, 1], [1, 1], [4], [-1]):
        with pytest.raises(BackboneError, match="ascending, distinct and in"):
            llama.predict_blocks(SENTENCES[:2], SST2, blocks)
    for family in ("bert", "t5"):
        with pytest.raises(BackboneError, match="decoder-only"):
            tiny_backbone(family).predict_blocks(SENTENCES[:2], SST2, [0, 1])


# ---- input checks and truncation ------------------------------------------------------------------------------


def test_all_exit_at_embedding_runs_no_block(tiny_llama_backbone):
    with count_block_rows(tiny_llama_backbone) as counts:
        tiny_llama_backbone.predict(SENTENCES, SST2, 0)
    assert sum(counts) == 0


def test_exit_layer_out_of_range_is_a_clear_error(tiny_llama_backbone):
    with pytest.raises(BackboneError, match=r"\[0, 4\]"):
        tiny_llama_backbone.predict(SENTENCES[:2], SST2, [1, 5])


def test_empty_batch_returns_empty_arrays(tiny_llama_backbone):
    assert tiny_llama_backbone.layer_probs([], SST2).shape == (0, 5, 2)
    assert tiny_llama_backbone.predict([], SST2, []).probs.shape == (0, 2)
    assert tiny_llama_backbone.layer_pass([], MULTI).states.shape == (0, 5, 32)


def test_long_text_is_truncated_but_keeps_the_template(tiny_llama_backbone):
    long_text = " ".join(["great"] * 500)
    probs = tiny_llama_backbone.layer_probs([long_text], SST2)
    assert np.isfinite(probs).all()
    assert tiny_llama_backbone._prompt(long_text, SST2).endswith("The answer is")


def test_predict_says_which_texts_were_truncated(tiny_llama_backbone):
    backbone = tiny_llama_backbone  # word tokenizer, max_length 64
    fits = " ".join(["great"] * 20)
    cut = " ".join(["great"] * 500)
    pred = backbone.predict([fits, cut, "fine"], SST2, [1, 4, 2])
    assert pred.truncated.dtype == bool and pred.truncated.tolist() == [False, True, False]
    assert backbone.predict([], SST2, 1).truncated.shape == (0,)
    # the flag does not change the answer: the cut text is classified from its first tokens, as before
    np.testing.assert_allclose(pred.probs[1], backbone.predict([cut], SST2, 4).probs[0], atol=1e-6)


def test_texts_must_be_strings(tiny_llama_backbone):
    with pytest.raises(BackboneError, match="strings"):
        tiny_llama_backbone.layer_probs([SENTENCES[0], 3], SST2)


# ---- real weights ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_gemma_exactness_savings_and_parity(gemma_backbone_reused):
    backbone = gemma_backbone_reused
    assert backbone.n_layers == 18 and backbone.family.name == "decoder"
    texts = ["a gorgeous , witty , seductive movie .", "the story is bland and the acting is worse .",
             "it 's a charming and often affecting journey ."]
    probs = backbone.layer_probs(texts, SST2)
    for layer in range(backbone.n_layers + 1):
        np.testing.assert_allclose(backbone.predict(texts, SST2, layer).probs, probs[:, layer], atol=1e-4)
    exits = np.array([3, 17, 9])
    with count_block_rows(backbone) as counts:
        pred = backbone.predict(texts, SST2, exits)
    assert sum(counts) == exits.sum()
    np.testing.assert_allclose(pred.probs, probs[np.arange(3), exits], atol=1e-4)
    batch = backbone.tokenizer(SST2.prompt(texts[1]), return_tensors="pt")
    with torch.no_grad():
        logits = backbone.model(**batch).logits[0, -1, backbone.label_ids(SST2)]
    np.testing.assert_allclose(probs[1, -1], softmax(logits), atol=1e-4)
    alone = backbone.layer_probs(texts[2:], SST2)
    np.testing.assert_allclose(alone[0], probs[2], atol=1e-4)
    # multi-token words sharing a first token: the sum rule equals a plain forward per label
    words = Task(name="gemma-multi", template=SST2.template, label_values=("0", "1"),
                 words=("very negative", "very positive"), data=DATA)
    assert backbone.label_tokens(words).summed
    multi = backbone.layer_probs(texts[:2], words)
    np.testing.assert_allclose(multi[:, -1], by_hand_sum_rule(backbone, texts[:2], words), atol=1e-4)
    np.testing.assert_allclose(backbone.predict(texts[:2], words, 9).probs, multi[:, 9], atol=1e-4)
