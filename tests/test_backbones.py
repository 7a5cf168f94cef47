"""Contracts of the layer-wise engine: exactness, real savings, batch independence, parity with the model."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial

import numpy as np
import pytest
import torch

from raee.backbones import BackboneError
from raee.tasks import TASKS, Task, get_task
from tests.fixtures_models import SENTENCES

SST2 = get_task("sst2")


@contextmanager
def count_block_rows(backbone):
    """Plain hooks, independent of the engine's own: yields counts[i] = rows entering block i over all calls."""
    counts = [0] * backbone.n_layers

    def count(i, module, args, kwargs):
        counts[i] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    with ExitStack() as stack:
        for i, block in enumerate(backbone.parts.blocks):
            stack.callback(block.register_forward_pre_hook(partial(count, i), with_kwargs=True).remove)
        yield counts


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
    probs = backbone.layer_probs(SENTENCES, SST2)
    exits = np.array([0, 4, 2, 1, 3, 4, 0, 2])[: len(SENTENCES)]
    with count_block_rows(backbone) as counts:
        pred = backbone.predict(SENTENCES, SST2, exits)
    np.testing.assert_allclose(pred.probs, probs[np.arange(len(exits)), exits], atol=1e-4)
    assert sum(counts) == exits.sum()  # exactly l blocks per example
    # block i runs only for the examples that exit after it: never the whole batch to the deepest exit
    assert counts == [int((exits > i).sum()) for i in range(backbone.n_layers)]


def test_all_exit_at_embedding_runs_no_block(tiny_llama_backbone):
    with count_block_rows(tiny_llama_backbone) as counts:
        tiny_llama_backbone.predict(SENTENCES, SST2, 0)
    assert sum(counts) == 0


def test_a_text_does_not_depend_on_its_batch(tiny_backbone_reused):
    together = tiny_backbone_reused.layer_probs(SENTENCES, SST2, batch_size=len(SENTENCES))
    for i in (0, 3, len(SENTENCES) - 1):  # short and long texts: padding differs in each batch
        alone = tiny_backbone_reused.layer_probs([SENTENCES[i]], SST2)
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5)
    reversed_order = tiny_backbone_reused.layer_probs(SENTENCES[::-1], SST2, batch_size=3)
    np.testing.assert_allclose(reversed_order[::-1], together, atol=1e-5)


def test_layer_probs_match_the_models_own_forward(tiny_backbone_reused):
    """Layer l of the engine == the model's hidden_states[l] through its own head (final norm once)."""
    backbone = tiny_backbone_reused
    text = SENTENCES[2]
    mask = backbone.tokenizer.mask_token or "<mask>"
    batch = backbone.tokenizer(SST2.prompt(text, backbone.style, mask), return_tensors="pt")
    ids = backbone.label_ids(SST2)
    with torch.no_grad():
        out = backbone.model(**batch, output_hidden_states=True)
        if backbone.style == "causal":
            pos = -1
            expected = [backbone.parts.exit_logits(h[:, pos], ids) for h in out.hidden_states[:-1]]
            expected.append(out.logits[:, pos, ids])  # the model applies the final norm to the last layer itself
        else:
            pos = int((batch["input_ids"][0] == backbone.tokenizer.mask_token_id).nonzero()[0, 0])
            expected = [backbone.parts.exit_logits(h[:, pos], ids) for h in out.hidden_states]
            torch.testing.assert_close(expected[-1], out.logits[:, pos, ids])
    expected_probs = torch.softmax(torch.cat(expected), dim=-1).numpy()  # (L+1, C)
    np.testing.assert_allclose(backbone.layer_probs([text], SST2)[0], expected_probs, atol=1e-5)


def test_every_task_runs_on_both_families(tiny_llama_backbone):
    for task in TASKS.values():
        probs = tiny_llama_backbone.layer_probs(SENTENCES[:2], task)
        assert probs.shape == (2, tiny_llama_backbone.n_layers + 1, task.n_classes)


def test_multi_token_label_word_is_a_clear_error(tiny_llama_backbone):
    template = "Is {x} fine ? The answer is"
    two_tokens = Task("bad", "bad", template, ("positive", "very positive"), "{x} {mask}", ("a", "b"))
    with pytest.raises(BackboneError, match="'very positive' of task bad is 2 tokens"):
        tiny_llama_backbone.layer_probs(SENTENCES[:1], two_tokens)
    unknown = Task("bad2", "bad", template, ("positive", "zzzunknown"), "{x} {mask}", ("a", "b"))
    with pytest.raises(BackboneError, match="zzzunknown"):
        tiny_llama_backbone.layer_probs(SENTENCES[:1], unknown)


def test_exit_layer_out_of_range_is_a_clear_error(tiny_llama_backbone):
    with pytest.raises(BackboneError, match=r"\[0, 4\]"):
        tiny_llama_backbone.predict(SENTENCES[:2], SST2, [1, 5])


def test_empty_batch_returns_empty_arrays(tiny_llama_backbone):
    assert tiny_llama_backbone.layer_probs([], SST2).shape == (0, 5, 2)
    assert tiny_llama_backbone.predict([], SST2, []).probs.shape == (0, 2)


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


@pytest.mark.real_model
def test_gemma_exactness_savings_and_parity(gemma_backbone_reused):
    backbone = gemma_backbone_reused
    assert backbone.n_layers == 18
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
    np.testing.assert_allclose(probs[1, -1], torch.softmax(logits, -1).numpy(), atol=1e-4)
    alone = backbone.layer_probs(texts[2:], SST2)
    np.testing.assert_allclose(alone[0], probs[2], atol=1e-4)
