"""Key encoders: shapes, normalisation, determinism, the layer they read, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raee.backbones import Backbone
from raee.keys import BackboneStateEncoder, KeyEncoder, SentenceEncoder, check_texts, load_encoder
from raee.tasks import get_task
from tests.fixtures_models import SENTENCES, tiny_model

SST2 = get_task("sst2")


@pytest.fixture(scope="module")
def minilm_reused():
    """The packaged all-MiniLM-L6-v2 (real weights, ~1 s to load), shared by this module."""
    return SentenceEncoder("all-minilm-l6-v2", device="cpu")


@pytest.fixture(scope="module")
def tiny_llama_reused():
    model, tokenizer = tiny_model("llama")
    return Backbone(model, tokenizer, name="tiny-llama", device="cpu", batch_size=4)


@pytest.mark.real_model
def test_sentence_encoder_shapes_normalised_deterministic(minilm_reused):
    keys = minilm_reused.encode(SENTENCES)
    assert isinstance(minilm_reused, KeyEncoder)
    assert keys.shape == (len(SENTENCES), 384) == (len(SENTENCES), minilm_reused.dim)
    assert keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(minilm_reused.encode(SENTENCES), keys)
    one_by_one = np.stack([minilm_reused.encode([s])[0] for s in SENTENCES[:3]])
    np.testing.assert_allclose(one_by_one, keys[:3], atol=1e-5)  # batch composition does not matter
    assert minilm_reused.encode([]).shape == (0, 384)
    assert minilm_reused.name == "all-minilm-l6-v2:sentence"


@pytest.mark.real_model
def test_prompt_keys_template_the_text_and_need_the_task(minilm_reused):
    prompt_encoder = SentenceEncoder.__new__(SentenceEncoder)  # share the loaded model, change only the input
    prompt_encoder.__dict__.update(minilm_reused.__dict__, _key_input="prompt")
    assert prompt_encoder.name == "all-minilm-l6-v2:prompt-causal" != minilm_reused.name
    keys = prompt_encoder.encode(SENTENCES[:2], SST2)
    templated = minilm_reused.encode([SST2.prompt(s) for s in SENTENCES[:2]])
    np.testing.assert_allclose(keys, templated, atol=1e-6)
    with pytest.raises(ValueError, match="needs the task"):
        prompt_encoder.encode(SENTENCES[:2])


@pytest.mark.parametrize("bad, index", [(["ok", ""], 1), (["   ", "ok"], 0), (["ok", "fine", "\n\t"], 2)])
def test_empty_text_is_rejected_naming_its_index(bad, index):
    with pytest.raises(ValueError, match=f"text {index} is empty"):
        check_texts(bad)
    with pytest.raises(ValueError, match="not one string"):
        check_texts("a sentence")


@pytest.mark.parametrize("layer_idx", [0, 2, 3])
def test_backbone_states_match_hidden_states(tiny_llama_reused, layer_idx):
    backbone = tiny_llama_reused
    mean = BackboneStateEncoder(backbone, layer_idx=layer_idx, pooling="mean", normalize=False, batch_size=3)
    last = BackboneStateEncoder(backbone, layer_idx=layer_idx, pooling="last", normalize=False, batch_size=3)
    texts = SENTENCES[:5]
    got_mean, got_last = mean.encode(texts), last.encode(texts)
    assert got_mean.shape == got_last.shape == (5, 32) and got_mean.dtype == np.float32
    for i, text in enumerate(texts):  # reference: one text at a time, no padding, the model's own hidden_states
        ids = backbone.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            states = backbone.model(**ids, output_hidden_states=True).hidden_states[layer_idx][0]  # (T, H)
        np.testing.assert_allclose(got_mean[i], states.mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(got_last[i], states[-1].numpy(), atol=1e-5)


def test_backbone_states_normalised_and_stop_at_their_layer(tiny_llama_reused):
    backbone = tiny_llama_reused
    encoder = BackboneStateEncoder(backbone, layer_idx=1, key_input="prompt")
    calls = [0] * backbone.n_layers
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(backbone.model.model.layers)]
    try:
        keys = encoder.encode(SENTENCES, SST2)
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    assert calls[0] > 0 and calls[1:] == [0] * (backbone.n_layers - 1)  # deeper blocks never ran
    assert encoder.name == "backbone:tiny-llama:layer-1:mean:prompt"
    assert not np.allclose(keys, BackboneStateEncoder(backbone, layer_idx=1).encode(SENTENCES))


def test_load_encoder_choices(tiny_llama_reused):
    encoder = load_encoder("backbone", backbone=tiny_llama_reused, layer_idx=2, pooling="last")
    assert isinstance(encoder, BackboneStateEncoder) and encoder.dim == 32 and encoder.layer_idx == 2
    assert load_encoder("backbone", backbone=tiny_llama_reused).layer_idx == 2  # middle of 4
    with pytest.raises(ValueError, match="needs the backbone"):
        load_encoder("backbone")
    with pytest.raises(ValueError, match="layer_idx must lie"):
        BackboneStateEncoder(tiny_llama_reused, layer_idx=5)
    with pytest.raises(ValueError, match="pooling"):
        BackboneStateEncoder(tiny_llama_reused, pooling="max")
