"""BatchEngine end to end: tiny llama backbone, backbone-state keys, real Milvus Lite exit databases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from collectors.build import build_database, exit_db_meta
from inference_workers.engine import BatchEngine, Request
from milvus.exit_db import ExitDB, ExitDBMeta
from raee.backbones import Backbone
from raee.exit_policy import ExitPolicy
from raee.keys import BackboneStateEncoder
from raee.tasks import Dataset, get_task
from tests.fixtures_models import SENTENCES, tiny_model

SST2, TREC = get_task("sst2"), get_task("trec")
TRAIN_TEXTS = tuple(f"{a} {b}" for a, b in itertools.permutations(SENTENCES, 2))  # 56 distinct texts
QUERIES = [*SENTENCES, "the acting is great", "What is the plot ?"]


@pytest.fixture(scope="module")
def setup_reused(tmp_path_factory):
    """(backbone, encoder, {task: ExitDB}): SST-2 and TREC databases built from the tiny training texts."""
    model, tokenizer = tiny_model("llama")
    backbone = Backbone(model, tokenizer, name="tiny-llama", device="cpu", batch_size=8)
    encoder = BackboneStateEncoder(backbone, layer_idx=2)
    uri = str(tmp_path_factory.mktemp("engine") / "exit.db")
    rng = np.random.default_rng(0)
    dbs = {}
    for task in (SST2, TREC):
        data = Dataset(task, "train", TRAIN_TEXTS, rng.integers(0, task.n_classes, size=len(TRAIN_TEXTS)))
        summary = build_database(backbone, encoder, task, db_uri=uri, dataset=data, batch_size=16,
                                 show_progress=False)
        dbs[task.name] = ExitDB(uri, collection=summary.collection, meta=exit_db_meta(backbone, encoder, task))
    yield backbone, encoder, dbs
    for db in dbs.values():
        db.close()


def count_searches(monkeypatch, db: ExitDB) -> list[int]:
    """Wrap the real db.search of this instance; returns a list that grows by the batch size per call."""
    calls: list[int] = []
    real = db.search

    def counted(vectors, **kwargs):
        calls.append(len(vectors))
        return real(vectors, **kwargs)

    monkeypatch.setattr(db, "search", counted)
    return calls


def test_predictions_equal_backbone_at_the_chosen_exits(setup_reused, monkeypatch):
    backbone, encoder, dbs = setup_reused
    policy = ExitPolicy(tau=0.6, k=5)
    engine = BatchEngine(backbone, encoder, dbs, policy)
    calls = count_searches(monkeypatch, dbs["sst2"])
    responses = engine.classify(QUERIES, "sst2")
    assert calls == [len(QUERIES)]  # ONE search for the whole batch

    exits = policy.exit_layers(dbs["sst2"].search(encoder.encode(QUERIES), k=5))  # independent reference
    preds = backbone.predict(QUERIES, SST2, exits)
    assert [r.exit_layer for r in responses] == exits.tolist()
    assert [r.label for r in responses] == preds.labels.tolist()
    np.testing.assert_allclose([r.probs for r in responses], preds.probs, atol=1e-6)
    assert [r.label_word for r in responses] == [SST2.words[label] for label in preds.labels]
    assert all(r.neighbours is None for r in responses)
    times = engine.last_times
    assert times.n_requests == len(QUERIES) and times.n_searches == 1
    assert times.total_s >= times.encode_s + times.search_s + times.predict_s > 0


def test_order_is_kept_across_tasks_with_one_search_per_task(setup_reused, monkeypatch):
    backbone, encoder, dbs = setup_reused
    engine = BatchEngine(backbone, encoder, lambda task: dbs[task.name], ExitPolicy(tau=0.6, k=5))
    alone = {task: engine.classify(QUERIES, task) for task in ("sst2", "trec")}
    calls = {name: count_searches(monkeypatch, db) for name, db in dbs.items()}
    order = np.random.default_rng(1).permutation(2 * len(QUERIES))
    pairs = [(task, i) for task in ("sst2", "trec") for i in range(len(QUERIES))]
    requests = [Request(QUERIES[pairs[j][1]], "TREC" if pairs[j][0] == "trec" else "SST-2") for j in order]
    responses, times = engine.run_timed(requests)
    assert len(responses) == len(requests)
    for j, response in zip(order, responses, strict=True):
        task, i = pairs[j]
        expected = alone[task][i]  # same exits and labels; batch-mates may move probs by rounding only
        assert (response.label, response.label_word, response.exit_layer) == (
            expected.label, expected.label_word, expected.exit_layer)
        np.testing.assert_allclose(response.probs, expected.probs, atol=1e-5)
    assert calls == {"sst2": [len(QUERIES)], "trec": [len(QUERIES)]}
    assert times.n_searches == 2
    assert engine.run([]) == [] and engine.last_times.n_requests == engine.last_times.n_searches == 0


def test_explain_returns_k_neighbours_with_texts(setup_reused):
    backbone, encoder, dbs = setup_reused
    engine = BatchEngine(backbone, encoder, dbs, ExitPolicy(k=4))
    responses = engine.run([Request(QUERIES[0], "sst2", explain=True), Request(QUERIES[1], "sst2")])
    first, second = responses
    assert second.neighbours is None and len(first.neighbours) == 4
    distances = [n.distance for n in first.neighbours]
    assert distances == sorted(distances)
    stored = dbs["sst2"].get(np.array([n.id for n in first.neighbours]))
    assert tuple(n.text for n in first.neighbours) == stored.texts
    assert all(n.text in TRAIN_TEXTS and n.label_word == SST2.words[n.label] for n in first.neighbours)
    np.testing.assert_allclose([n.exit_probs for n in first.neighbours], stored.exit_probs)
    alone = engine.classify([QUERIES[0]], SST2, explain=True)[0]  # batch-mates change keys only by rounding
    assert [n.id for n in alone.neighbours] == [n.id for n in first.neighbours]
    np.testing.assert_allclose([n.distance for n in alone.neighbours], distances, rtol=1e-4, atol=1e-6)


def test_responses_say_when_a_text_was_truncated(setup_reused):
    backbone, encoder, dbs = setup_reused
    engine = BatchEngine(backbone, encoder, dbs, ExitPolicy(tau=0.6, k=5))
    long_text = " ".join(["great"] * 200)  # > 64 tokens, the tiny tokenizer's context
    answers = engine.classify([QUERIES[0], long_text, QUERIES[1]], SST2)
    assert [a.truncated for a in answers] == [False, True, False]


def test_bad_input_and_mismatched_database_are_clear_errors(setup_reused, tmp_path):
    backbone, encoder, dbs = setup_reused
    engine = BatchEngine(backbone, encoder, dbs, ExitPolicy())
    with pytest.raises(ValueError, match="text 2 is empty"):
        engine.classify(["fine", "also fine", "  "], "sst2")
    with pytest.raises(ValueError, match="unknown task"):
        engine.run([Request("fine", "nope")])
    other = BackboneStateEncoder(backbone, layer_idx=1)  # same dim, different keys
    with pytest.raises(ValueError, match=r"built for another setup.*encoder"):
        BatchEngine(backbone, other, dbs, ExitPolicy()).classify(["fine"], "sst2")
    meta = ExitDBMeta(**{**exit_db_meta(backbone, encoder, SST2).__dict__, "task": "trec"})
    with ExitDB(str(tmp_path / "other.db"), collection="wrong_task", meta=meta) as wrong:
        with pytest.raises(ValueError, match="task: database 'trec' != engine 'sst2'"):
            BatchEngine(backbone, encoder, {"sst2": wrong}, ExitPolicy()).classify(["fine"], "sst2")


def test_fused_policy_on_a_calibrated_build(setup_reused, tmp_path):
    """`build --policy fused` then the engine: calibrated exit sets, stored calibration, fused answers."""
    from raee.calibration import fit_calibration
    from raee.exit_policy import FusedPolicy

    backbone, encoder, _ = setup_reused
    labels = np.random.default_rng(1).integers(0, 2, size=len(TRAIN_TEXTS))
    data = Dataset(SST2, "train", TRAIN_TEXTS, labels)
    uri = str(tmp_path / "cal.db")
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=data, batch_size=16, calibrate=True,
                             calibration_examples=20, show_progress=False)
    meta = exit_db_meta(backbone, encoder, SST2, calibrated=True)
    with ExitDB(uri, collection=summary.collection, meta=meta) as db:
        cal = db.calibration
        assert cal.n_examples == 20  # fitted on the first 20 of a seeded shuffle of the training examples
        order = np.random.default_rng(0).permutation(len(TRAIN_TEXTS))[:20]
        raw = backbone.layer_probs([TRAIN_TEXTS[i] for i in order], SST2)
        np.testing.assert_allclose(cal.bias, fit_calibration(raw).bias, atol=1e-6)
        stored = db.get(np.sort(db.search(encoder.encode(TRAIN_TEXTS[:1]), k=1).ids[0]))
        np.testing.assert_allclose(stored.layer_probs[0], cal.apply(backbone.layer_probs(TRAIN_TEXTS[:1], SST2))[0],
                                   atol=1e-5)  # stored distributions are the calibrated ones

        policy = FusedPolicy(k=5, beta=1.0, slack=0.1)
        responses = BatchEngine(backbone, encoder, {"sst2": db}, policy).classify(QUERIES, "sst2")
        found = db.search(encoder.encode(QUERIES), k=5)  # independent reference, from recorded layers
        exits = policy.exit_layers(found)
        all_layers = backbone.layer_probs(QUERIES, SST2)[np.arange(len(QUERIES)), exits]
        expected = policy.final_probs(cal.apply_at(all_layers, exits), found)
        assert [r.exit_layer for r in responses] == exits.tolist()
        np.testing.assert_allclose([r.probs for r in responses], expected, atol=1e-5)

        # the paper's policy on a calibrated database (and the reverse) is refused, not silently mixed
        with pytest.raises(ValueError, match="needs an uncalibrated database"):
            BatchEngine(backbone, encoder, {"sst2": db}, ExitPolicy()).classify(["fine"], "sst2")

    with pytest.raises(ValueError, match="training split only"):
        build_database(backbone, encoder, SST2, db_uri=uri, dataset=Dataset(SST2, "test", TRAIN_TEXTS, labels),
                       calibrate=True, show_progress=False)
