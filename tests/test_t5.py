"""Encoder-decoder backbones (T5, T5 v1.1, BART) numbered as the RAEE paper's Table 8: L = encoder + decoder blocks.

Tiny random models with 3 encoder and 2 decoder blocks (L = 5). Layer l <= 3 reads the encoder at the answer
position (the prompt token before </s>), layer l > 3 the decoder at the decoder-start position after the whole
encoder. Block calls are counted with plain hooks on model.encoder / model.decoder blocks, separately.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial

import numpy as np
import pytest
import torch

from raee.backbones import BackboneError
from raee.keys import BackboneStateEncoder
from raee.models import load_backbone
from raee.tasks import get_task
from tests.fixtures_models import SENTENCES, tiny_backbone
from tests.test_backbones import MULTI, head_for, softmax

SST2 = get_task("sst2")
N_ENC, N_DEC = 3, 2


@pytest.fixture(scope="module", params=["t5", "t5v11", "bart"])
def seq2seq(request):
    return tiny_backbone(request.param)


def stacks(model):
    return model.get_encoder(), model.get_decoder()


def blocks(stack):
    return stack.block if hasattr(stack, "block") else stack.layers


@contextmanager
def count_rows(model):
    """(encoder counts, decoder counts): rows entering each block, from plain pre-hooks on the model's blocks."""
    counts = ([0] * N_ENC, [0] * N_DEC)

    def count(side, i, module, args, kwargs):
        counts[side][i] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    with ExitStack() as stack:
        for side, part in enumerate(stacks(model)):
            for i, block in enumerate(blocks(part)):
                stack.callback(block.register_forward_pre_hook(partial(count, side, i), with_kwargs=True).remove)
        yield counts


def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's LM head on (already normed) states: T5's d_model**-0.5 scaling, BART's final_logits_bias."""
    scale = model.config.d_model**-0.5 if getattr(model.config, "scale_decoder_outputs", False) else 1.0
    logits = model.lm_head(hidden * scale)
    return logits + model.final_logits_bias[0] if hasattr(model, "final_logits_bias") else logits


def final_norm(stack):
    return getattr(stack, "final_layer_norm", None) or torch.nn.Identity()


def test_t5_layers_are_encoder_then_decoder_blocks(seq2seq):
    assert seq2seq.family.name == "encoder-decoder" and seq2seq.style == "causal"
    assert seq2seq.n_layers == N_ENC + N_DEC == 5
    assert [s.name for s in seq2seq.family.stacks] == ["encoder", "decoder"]
    assert seq2seq.label_tokens(SST2).first_ids == tuple(seq2seq.tokenizer.convert_tokens_to_ids(["negative",
                                                                                                 "positive"]))


def test_t5_layer_probs_match_the_models_own_forward(seq2seq):
    """Encoder layers: encoder_hidden_states[l] at the token before </s>; decoder layers: decoder_hidden_states;
    layer L: the model's own logits for the first decoder step."""
    model, tok = seq2seq.model, seq2seq.tokenizer
    encoder, decoder = stacks(model)
    ids = seq2seq.label_ids(SST2)
    for text in SENTENCES[:3]:
        batch = tok(SST2.prompt(text), return_tensors="pt")
        assert batch["input_ids"][0, -1] == tok.eos_token_id
        answer = batch["input_ids"].shape[1] - 2
        start = torch.tensor([[model.config.decoder_start_token_id]])
        with torch.no_grad():
            out = model(**batch, decoder_input_ids=start, output_hidden_states=True)
            enc = out.encoder_hidden_states  # L_enc + 1 entries, the last after the final norm
            dec = out.decoder_hidden_states  # entry 0 = decoder embeddings, the last after the final norm
            expected = [lm_head(model, final_norm(encoder)(h[0, answer]))[ids] for h in enc[:-1]]
            expected.append(lm_head(model, enc[-1][0, answer])[ids])
            expected += [lm_head(model, final_norm(decoder)(h[0, 0]))[ids] for h in dec[1:-1]]
            expected.append(out.logits[0, 0, ids])
        got = seq2seq.layer_probs([text], SST2)[0]
        np.testing.assert_allclose(got, softmax(torch.stack(expected)), atol=1e-5)


def test_t5_predict_is_exact_at_every_layer_and_runs_only_its_blocks(seq2seq):
    probs = seq2seq.layer_probs(SENTENCES, SST2)
    for layer in range(seq2seq.n_layers + 1):
        np.testing.assert_allclose(seq2seq.predict(SENTENCES, SST2, layer).probs, probs[:, layer], atol=1e-4)
    exits = np.array([0, 5, 3, 1, 4, 5, 2, 3])
    with count_rows(seq2seq.model) as (enc, dec):
        pred = seq2seq.predict(SENTENCES, SST2, exits)
    np.testing.assert_allclose(pred.probs, probs[np.arange(len(exits)), exits], atol=1e-4)
    assert enc == [int((exits > i).sum()) for i in range(N_ENC)]
    assert dec == [int((exits > N_ENC + j).sum()) for j in range(N_DEC)]
    with count_rows(seq2seq.model) as (enc, dec):
        seq2seq.predict(SENTENCES, SST2, [1, 2, 3, 3, 0, 2, 1, 3])
    assert dec == [0, 0]  # nobody needs the decoder: it never runs


def test_t5_results_do_not_depend_on_the_batch(seq2seq):
    together = seq2seq.layer_probs(SENTENCES, SST2, batch_size=len(SENTENCES))
    alone = np.concatenate([seq2seq.layer_probs([t], SST2) for t in SENTENCES[:3]])
    np.testing.assert_allclose(alone, together[:3], atol=1e-5)


def by_hand_t5_sums(seq2seq, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(encoder layer L_enc, layer L) label distributions under the sum rule, from plain model calls per label."""
    model, tok = seq2seq.model, seq2seq.tokenizer
    prompt = tok(MULTI.prompt(text))["input_ids"]  # ... </s>
    answer = len(prompt) - 2
    start = model.config.decoder_start_token_id
    enc_scores, dec_scores = [], []
    for tokens in seq2seq.label_tokens(MULTI).tokens:
        prefix = list(tokens[:-1])
        with torch.no_grad():
            enc_ids = torch.tensor([prompt[: answer + 1] + prefix + prompt[answer + 1 :]])  # teacher-forced encoder
            states = model.get_encoder()(input_ids=enc_ids).last_hidden_state[0]  # (T, H), after the final norm
            enc_logp = torch.log_softmax(lm_head(model, states).float(), dim=-1)
            dec_ids = torch.tensor([[start, *prefix]])  # teacher-forced decoder
            dec_logp = torch.log_softmax(model(input_ids=torch.tensor([prompt]), decoder_input_ids=dec_ids)
                                         .logits[0].float(), dim=-1)
        enc_scores.append(sum(float(enc_logp[answer + j, t]) for j, t in enumerate(tokens)))
        dec_scores.append(sum(float(dec_logp[j, t]) for j, t in enumerate(tokens)))
    return softmax(torch.tensor(enc_scores)), softmax(torch.tensor(dec_scores))


def test_t5_multi_token_labels_sum_log_probs_exactly(seq2seq):
    assert seq2seq.label_tokens(MULTI).summed
    probs = seq2seq.layer_probs(SENTENCES, MULTI)
    for i in (0, 5):
        at_encoder_end, at_end = by_hand_t5_sums(seq2seq, SENTENCES[i])
        np.testing.assert_allclose(probs[i, N_ENC], at_encoder_end, atol=1e-5)
        np.testing.assert_allclose(probs[i, -1], at_end, atol=1e-5)
    for layer in range(seq2seq.n_layers + 1):
        np.testing.assert_allclose(seq2seq.predict(SENTENCES, MULTI, layer).probs, probs[:, layer], atol=1e-4)
    exits = np.array([0, 5, 3, 1, 4, 5, 2, 3])
    with count_rows(seq2seq.model) as (enc, dec):
        pred = seq2seq.predict(SENTENCES, MULTI, exits)
    np.testing.assert_allclose(pred.probs, probs[np.arange(len(exits)), exits], atol=1e-4)
    assert enc == [3 * int((exits > i).sum()) for i in range(N_ENC)]  # one row per label
    assert dec == [3 * int((exits > N_ENC + j).sum()) for j in range(N_DEC)]


def test_t5_states_are_the_encoder_then_the_decoder_and_heads_reproduce_them(seq2seq):
    model, tok = seq2seq.model, seq2seq.tokenizer
    recorded = seq2seq.layer_pass(SENTENCES, SST2)
    assert recorded.states.shape == (len(SENTENCES), 6, model.config.d_model)
    batch = tok(SST2.prompt(SENTENCES[1]), return_tensors="pt")
    start = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        out = model(**batch, decoder_input_ids=start, output_hidden_states=True)
    answer = batch["input_ids"].shape[1] - 2
    expected = [h[0, answer] for h in out.encoder_hidden_states[:-1]] + [out.decoder_hidden_states[1][0, 0]]
    np.testing.assert_allclose(recorded.states[1, [0, 1, 2, 4]], torch.stack(expected).numpy(), atol=1e-5)
    np.testing.assert_allclose(recorded.states, seq2seq.layer_pass(SENTENCES, MULTI).states, atol=1e-5)
    head = head_for(seq2seq, MULTI)  # a head reads one prompt-only state per example, whatever the label words
    for layer in range(seq2seq.n_layers + 1):
        pred = seq2seq.predict(SENTENCES, MULTI, layer, head=head)
        np.testing.assert_allclose(pred.probs, head.probs(layer, recorded.states[:, layer]), atol=1e-4)
    exits = np.array([0, 5, 3, 1, 4, 5, 2, 3])
    with count_rows(model) as (enc, dec):
        seq2seq.predict(SENTENCES, MULTI, exits, head=head)
    assert enc == [int((exits > i).sum()) for i in range(N_ENC)]
    assert dec == [int((exits > N_ENC + j).sum()) for j in range(N_DEC)]


def test_t5_loads_from_a_local_folder(tmp_path):
    backbone = tiny_backbone("t5")
    backbone.model.save_pretrained(tmp_path)
    backbone.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), device="cpu")
    assert loaded.family.name == "encoder-decoder" and loaded.n_layers == 5
    np.testing.assert_allclose(loaded.layer_probs(SENTENCES[:3], SST2), backbone.layer_probs(SENTENCES[:3], SST2),
                               atol=1e-6)


def test_t5_keys_come_from_the_encoder():
    backbone = tiny_backbone("t5")
    encoder = BackboneStateEncoder(backbone, layer_idx=2, normalize=False)
    keys = encoder.encode(SENTENCES[:2])
    batch = backbone.tokenizer(SENTENCES[0], return_tensors="pt")
    with torch.no_grad():
        states = backbone.model.get_encoder()(**batch, output_hidden_states=True).hidden_states[2][0]  # (T, H)
    np.testing.assert_allclose(keys[0], states.mean(0).numpy(), atol=1e-5)
    assert BackboneStateEncoder(backbone).layer_idx == 1  # middle of the encoder's 3 blocks
    with pytest.raises(ValueError, match="encoder"):
        BackboneStateEncoder(backbone, layer_idx=4)


def test_t5_block_subsets_are_a_clear_error():
    with pytest.raises(BackboneError, match="decoder-only"):
        tiny_backbone("t5").predict_blocks(SENTENCES[:2], SST2, [0, 1])


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny T5 saved as a local folder: what `--model path/to/t5` loads."""
    folder = tmp_path_factory.mktemp("tiny-t5")
    backbone = tiny_backbone("t5")
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return str(folder)


def test_t5_by_local_folder_builds_explains_evaluates_and_serves(t5_folder, tmp_path, data_dir, serve_url_reused):
    """The pipelines take a T5 by folder: build (Alg. 3.1), explain, eval's engine check and Serve over HTTP."""
    import requests

    from collectors.build import build_database
    from inference_workers.deployment import build_app, delete_app, run_app
    from orchestration.evaluate import EvalConfig, evaluate_task
    from orchestration.pipelines import choose_build, explain
    from raee.spec import ModelSpec
    from raee.tasks import Dataset
    from tests.fixtures_ray import ACTOR_CPUS, serve_config

    model = ModelSpec(t5_folder, "backbone", device="cpu", batch_size=8)  # keys from the T5 encoder
    texts = tuple(f"{a} {b}" for a in SENTENCES for b in SENTENCES if a != b)
    labels = np.random.default_rng(0).integers(0, 2, size=len(texts))
    db = str(tmp_path / "t5.db")
    backbone, encoder = model.load()
    summary = build_database(backbone, encoder, SST2, db_uri=db, dataset=Dataset(SST2, "train", texts, labels),
                             show_progress=False)
    assert summary.n_in_db == len(texts) and backbone.n_layers == N_ENC + N_DEC
    answers = explain(list(SENTENCES[:3]), SST2, model=model, db_uri=db, knobs={"k": 4})
    assert all(0 <= a.exit_layer <= N_ENC + N_DEC and len(a.neighbours) == 4 for a in answers)
    assert choose_build(db, SST2, model=model).collection == summary.collection

    config = EvalConfig(db_uri=str(tmp_path / "eval.db"), limit_train=36, limit_test=12, k=4, tau=0.6,
                        tune_examples=8, latency_examples=2, latency_repeats=1, latency_batch_sizes=(1,),
                        fused_betas=(1.0,), fused_slacks=(0.0,), curve_slacks=(0.0,))
    result = evaluate_task(SST2, backbone, encoder, config, data_dir=str(data_dir), quiet=True)
    assert set(result.engine_mismatches.values()) == {0} and result.n_layers == N_ENC + N_DEC

    run_app(build_app(model, serve_config(db, {SST2: summary.collection}, knobs={"k": 4}),
                      cpus_per_replica=ACTOR_CPUS), name="raee-t5", route_prefix="/t5")
    try:
        reply = requests.post(f"{serve_url_reused}/t5/v1/classify", json={"task": "sst2", "texts": list(SENTENCES[:3])},
                              timeout=60)
        assert reply.status_code == 200, reply.text
        assert [p["exit_layer"] for p in reply.json()["predictions"]] == [a.exit_layer for a in answers]
    finally:
        delete_app("raee-t5")
