"""BatchEngine end to end: tiny llama backbone, backbone-state keys, real Milvus Lite exit databases."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from collectors.build import BuildOptions, build_database
from inference_workers.engine import BatchEngine, EngineSetupError, Request, ServedTask
from milvus.exit_db import ExitDB, ExitDBMeta, setup_meta
from raee.backbones import Backbone
from raee.exit_policy import ExitPolicy, all_policies
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
        summary = build_database(backbone, encoder, task, db_uri=uri, dataset=data,
                                 options=BuildOptions(batch_size=16, calibration_examples=30), show_progress=False)
        dbs[task.name] = ExitDB(uri, collection=summary.collection, meta=setup_meta(backbone, encoder, task))
    yield backbone, encoder, dbs
    for db in dbs.values():
        db.close()


def engine_for(backbone, encoder, dbs, policy, tasks=("sst2", "trec")) -> BatchEngine:
    """An engine serving the given tasks with one policy (named "policy")."""
    served = {name: ServedTask({"sst2": SST2, "trec": TREC}[name], dbs[name]) for name in tasks}
    return BatchEngine(backbone, encoder, served, {"policy": policy}, "policy")


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
    engine = engine_for(backbone, encoder, dbs, policy)
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
    engine = engine_for(backbone, encoder, dbs, ExitPolicy(tau=0.6, k=5))
    alone = {task: engine.classify(QUERIES, task) for task in ("sst2", "trec")}
    calls = {name: count_searches(monkeypatch, db) for name, db in dbs.items()}
    order = np.random.default_rng(1).permutation(2 * len(QUERIES))
    pairs = [(task, i) for task in ("sst2", "trec") for i in range(len(QUERIES))]
    requests = [Request(QUERIES[pairs[j][1]], pairs[j][0]) for j in order]
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
    engine = engine_for(backbone, encoder, dbs, ExitPolicy(k=4))
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
    engine = engine_for(backbone, encoder, dbs, ExitPolicy(tau=0.6, k=5))
    long_text = " ".join(["great"] * 200)  # > 64 tokens, the tiny tokenizer's context
    answers = engine.classify([QUERIES[0], long_text, QUERIES[1]], SST2)
    assert [a.truncated for a in answers] == [False, True, False]


def test_bad_input_and_mismatched_database_are_clear_errors(setup_reused, tmp_path):
    backbone, encoder, dbs = setup_reused
    engine = engine_for(backbone, encoder, dbs, ExitPolicy())
    with pytest.raises(ValueError, match="text 2 is empty"):
        engine.classify(["fine", "also fine", "  "], "sst2")
    with pytest.raises(ValueError, match="request 0: task 'nope' is not served here; served: sst2, trec"):
        engine.run([Request("fine", "nope")])
    with pytest.raises(ValueError, match="request 1: unknown exit policy 'fast'"):
        engine.run([Request("fine", "sst2"), Request("fine", "sst2", policy="fast")])
    with pytest.raises(ValueError, match="takes no text_pair"):
        engine.run([Request("fine", "sst2", text_pair="more")])
    other = BackboneStateEncoder(backbone, layer_idx=1)  # same dim, different keys
    with pytest.raises(EngineSetupError, match=r"built for another setup.*encoder"):
        engine_for(backbone, other, dbs, ExitPolicy())
    meta = ExitDBMeta(**{**setup_meta(backbone, encoder, SST2).__dict__, "task": "trec"})
    with ExitDB(str(tmp_path / "other.db"), collection="wrong_task", meta=meta) as wrong:
        with pytest.raises(EngineSetupError, match="task: stored 'trec' != given 'sst2'"):
            engine_for(backbone, encoder, {"sst2": wrong}, ExitPolicy(), tasks=("sst2",))
    edited = dataclasses.replace(SST2, words=("bad", "good"))  # a spec edited after the build
    with pytest.raises(EngineSetupError, match=r"task_digest.*the task spec changed since the build"):
        BatchEngine(backbone, encoder, {"sst2": ServedTask(edited, dbs["sst2"])}, {"p": ExitPolicy()}, "p")


def test_one_build_serves_every_policy_and_each_request_may_pick_one(setup_reused):
    """raee reads the stored raw exit sets; raee-cal and fused the same records through the stored calibration."""
    from raee.exit_policy import FusedPolicy, calibrated_view

    backbone, encoder, dbs = setup_reused
    db = dbs["sst2"]
    cal = db.calibration
    assert cal is not None and cal.n_examples == 30
    policies = all_policies(k=5, tau=0.6, slack=0.1, threshold=0.6)
    engine = BatchEngine(backbone, encoder, {"sst2": ServedTask(SST2, db)}, policies, "fused")
    found = db.search(encoder.encode(QUERIES), k=5)  # independent reference, from recorded layers
    all_layers = backbone.layer_probs(QUERIES, SST2)
    for name, policy in policies.items():
        view = calibrated_view(found, cal) if policy.calibrated else found
        if name == "confident":  # decided during the forward: the same rule on the recorded layers
            exits = policy.exit_layers_recorded(cal.apply(all_layers), policy.prior(view, SST2.n_classes))
        else:
            exits = policy.exit_layers(view)
        at_exit = all_layers[np.arange(len(QUERIES)), exits]
        expected = policy.final_probs(cal.apply_at(at_exit, exits) if policy.calibrated else at_exit, view)
        responses = engine.classify(QUERIES, "sst2", policy=name)
        assert [r.exit_layer for r in responses] == exits.tolist(), name
        assert {r.policy for r in responses} == {name}
        np.testing.assert_allclose([r.probs for r in responses], expected, atol=1e-5)
    assert isinstance(policies["fused"], FusedPolicy) and set(policies) == {"raee", "raee-cal", "fused", "confident"}
    assert [r.policy for r in engine.classify(QUERIES[:1], "sst2")] == ["fused"]  # the default
    mixed = engine.run([Request(QUERIES[0], "sst2", policy="raee"), Request(QUERIES[0], "sst2"),
                        Request(QUERIES[0], "sst2", policy="full")])
    assert [r.policy for r in mixed] == ["raee", "fused", "full"]
    assert mixed[2].exit_layer == backbone.n_layers
    np.testing.assert_allclose(mixed[2].probs, all_layers[0, -1], atol=1e-5)  # the full model's own answer


def test_the_engine_reads_an_offramp_build_through_its_head_exactly(setup_reused, tmp_path):
    """Exactness and real savings hold for the off-ramp head: each text's answer is the stored off-ramp at its
    exit layer applied to the state the full recorded pass saw there."""
    from inference_workers.engine import stored_head
    from raee.exit_policy import calibrated_view

    backbone, encoder, _ = setup_reused
    labels = np.random.default_rng(1).integers(0, 2, size=len(TRAIN_TEXTS))
    uri = str(tmp_path / "offramp.db")
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=Dataset(SST2, "train", TRAIN_TEXTS, labels),
                             options=BuildOptions(head="offramp", offramp_folds=3, batch_size=16),
                             show_progress=False)
    with ExitDB(uri, collection=summary.collection, meta=None, create=False) as db:
        head = stored_head(db)
        engine = BatchEngine(backbone, encoder, {"sst2": ServedTask.of(SST2, db)}, all_policies(k=5, slack=0.1),
                             "fused")
        states = backbone.layer_pass(QUERIES, SST2).states  # (B, L+1, H)
        found = db.search(encoder.encode(QUERIES), k=5)
        for name in ("raee", "fused"):
            policy = engine.policies[name]
            view = calibrated_view(found, db.calibration) if policy.calibrated else found
            exits = policy.exit_layers(view)
            at_exit = np.stack([head.probs(int(layer), states[i : i + 1, layer])[0] for i, layer in enumerate(exits)])
            expected = policy.final_probs(db.calibration.apply_at(at_exit, exits) if policy.calibrated else at_exit,
                                          view)
            responses = engine.classify(QUERIES, "sst2", policy=name)
            assert [r.exit_layer for r in responses] == exits.tolist()
            np.testing.assert_allclose([r.probs for r in responses], expected, atol=1e-5)
        with pytest.raises(EngineSetupError, match="head"):  # read through the LM head instead: refused
            BatchEngine(backbone, encoder, {"sst2": ServedTask(SST2, db)}, {"p": ExitPolicy()}, "p")
