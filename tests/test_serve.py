"""Ray Serve over real HTTP on 127.0.0.1: same answers as the in-process engine, 4xx for bad input, still serving."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from collectors.build import BuildOptions, build_database
from inference_workers.deployment import (
    API_KEY_ENV,
    Limits,
    ServeSetupError,
    build_app,
    delete_app,
    run_app,
)
from inference_workers.engine import BatchEngine
from milvus.exit_db import ExitDB, setup_meta
from raee.exit_policy import ExitPolicy
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, RAEE_KNOBS, serve_config, tiny_llama_models

pytestmark = pytest.mark.serve

SST2, TREC = get_task("sst2"), get_task("trec")
TRAIN_TEXTS = tuple(f"{a} {b}" for a, b in itertools.permutations(SENTENCES, 2))  # 56 distinct texts
QUERIES = [*SENTENCES, "the acting is great", "What is the plot ?"]
POLICY = ExitPolicy(tau=0.6, k=5)
LIMITS = Limits(max_batch_size=16, batch_wait_timeout_s=0.02, max_texts=10, max_text_chars=200)
APP = "raee-test"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def served_reused(tmp_path_factory, serve_url_reused):
    """(base URL, in-process answers {task: [Response]}, explain answers for sst2) with the app deployed on Lite."""
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path_factory.mktemp("serve") / "exit.db")
    rng = np.random.default_rng(0)
    expected, explained, builds = {}, None, {}
    for task in (SST2, TREC):
        data = Dataset(task, "train", TRAIN_TEXTS, rng.integers(0, task.n_classes, size=len(TRAIN_TEXTS)))
        summary = build_database(backbone, encoder, task, db_uri=uri, dataset=data,
                                 options=BuildOptions(batch_size=16), show_progress=False)
        builds[task] = summary.collection
        with ExitDB(uri, collection=summary.collection, meta=setup_meta(backbone, encoder, task)) as db:
            engine = BatchEngine.single(backbone, encoder, task, db, POLICY, name="raee")
            expected[task.name] = engine.classify(QUERIES, task)
            if task is SST2:
                explained = engine.classify(QUERIES[:2], task, explain=True)
    # The driver has closed the Lite file: the replica becomes its one owner.
    config = serve_config(uri, builds, policy="raee", knobs=RAEE_KNOBS, neighbour_texts="on")  # texts: every caller
    run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS, limits=LIMITS),
            name=APP)
    yield serve_url_reused, expected, explained
    delete_app(APP)


def classify(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/classify", json=body, timeout=TIMEOUT_S)


def assert_matches(predictions: list[dict], expected) -> None:
    assert len(predictions) == len(expected)
    for got, want in zip(predictions, expected, strict=True):
        assert (got["label"], got["label_word"], got["exit_layer"]) == (want.label, want.label_word, want.exit_layer)
        np.testing.assert_allclose(got["probs"], want.probs, atol=1e-5)


def test_http_answers_equal_the_in_process_engine(served_reused):
    url, expected, explained = served_reused
    for task in ("sst2", "trec"):
        reply = classify(url, task=task, texts=QUERIES)
        assert reply.status_code == 200, reply.text
        assert reply.json()["task"] == task
        assert_matches(reply.json()["predictions"], expected[task])
        assert all(p["neighbours"] is None for p in reply.json()["predictions"])

    reply = classify(url, task="SST-2", texts=QUERIES[:2], explain=True)  # task names are forgiving
    assert reply.status_code == 200, reply.text
    for got, want in zip(reply.json()["predictions"], explained, strict=True):
        assert [n["id"] for n in got["neighbours"]] == [n.id for n in want.neighbours]
        assert [n["text"] for n in got["neighbours"]] == [n.text for n in want.neighbours]
        assert [n["label"] for n in got["neighbours"]] == [n.label for n in want.neighbours]
        np.testing.assert_allclose([n["distance"] for n in got["neighbours"]],
                                   [n.distance for n in want.neighbours], rtol=1e-4, atol=1e-6)


def test_concurrent_clients_are_batched_and_each_gets_its_own_answers(served_reused):
    url, expected, _ = served_reused
    jobs = [("sst2" if i % 2 else "trec", QUERIES[i % 5 : i % 5 + 3]) for i in range(8)]
    before = requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()["batches"]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: classify(url, task=job[0], texts=job[1]), jobs))
    after = requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()["batches"]
    assert after["texts"] - before["texts"] == 24
    assert after["n"] - before["n"] < 8, after  # texts of different requests shared engine calls
    for (task, texts), reply in zip(jobs, replies, strict=True):
        assert reply.status_code == 200, reply.text
        start = QUERIES.index(texts[0])
        assert_matches(reply.json()["predictions"], expected[task][start : start + len(texts)])


@pytest.mark.parametrize("policy", ["raee", "full"])
def test_truncated_texts_are_flagged_in_the_response(served_reused, policy):
    url, _, _ = served_reused
    long_text = " ".join(["a"] * 99)  # 199 characters (under max_text_chars) but > 64 tokens of context
    reply = classify(url, task="sst2", texts=[QUERIES[0], long_text], policy=policy)
    assert reply.status_code == 200, reply.text
    assert [p["truncated"] for p in reply.json()["predictions"]] == [False, True]


def test_full_policy_runs_every_layer(served_reused):
    url, _, _ = served_reused
    backbone, _ = tiny_llama_models()
    reply = classify(url, task="sst2", texts=QUERIES, policy="full")
    assert reply.status_code == 200, reply.text
    preds = backbone.predict(QUERIES, SST2, backbone.n_layers)
    got = reply.json()["predictions"]
    assert [p["exit_layer"] for p in got] == [backbone.n_layers] * len(QUERIES)
    assert [p["label"] for p in got] == preds.labels.tolist()
    np.testing.assert_allclose([p["probs"] for p in got], preds.probs, atol=1e-5)


def test_health_tasks_and_openapi(served_reused):
    url, _, _ = served_reused
    health = requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()
    assert health["status"] == "ok" and health["tasks"] == ["sst2", "trec"] and health["n_layers"] == 4
    assert health["limits"]["max_texts"] == LIMITS.max_texts  # user_config reached reconfigure
    assert health["limits"]["max_text_chars"] == 200 and isinstance(health["limits"]["max_text_chars"], int)
    assert health["default_policy"] == "raee"
    assert health["policies"] == ["raee", "raee-cal", "fused", "confident", "full"]
    tasks = requests.get(f"{url}/v1/tasks", timeout=TIMEOUT_S).json()
    assert [(t["name"], t["n_records"]) for t in tasks] == [("sst2", len(TRAIN_TEXTS)), ("trec", len(TRAIN_TEXTS))]
    assert tasks[0]["label_words"] == list(SST2.words) and tasks[0]["build"] == "full training split"
    assert "/v1/classify" in requests.get(f"{url}/openapi.json", timeout=TIMEOUT_S).json()["paths"]
    assert requests.get(f"{url}/docs", timeout=TIMEOUT_S).status_code == 404  # no CDN page that is blank offline


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"task": "nope", "texts": ["fine"]}, 404, "task 'nope' is not served here"),
    ({"task": "MR", "texts": ["fine"]}, 404, "'MR' is not served here; this server serves: sst2, trec"),
    ({"task": "sst2", "texts": []}, 422, "texts is empty"),
    ({"task": "sst2", "texts": ["fine", "   "]}, 422, "text 1 is empty or whitespace only"),
    ({"task": "sst2", "texts": ["fine"] * 11}, 413, "too many texts: 11 > 10"),
    ({"task": "sst2", "texts": ["x" * 201]}, 413, "text 0 has 201 characters"),
    ({"task": "sst2", "texts": "not a list"}, 422, "list"),
    ({"texts": ["fine"]}, 422, "task"),
    ({"task": "sst2", "texts": ["fine"], "policy": "fastest"}, 422, "unknown policy 'fastest'; use one of raee"),
    ({"task": "sst2", "texts": ["fine"], "text_pairs": ["x"]}, 422, "takes no text_pairs"),
    ({"task": "sst2", "texts": ["fine", "bad \ud800"]}, 422, "text 1 is not valid Unicode: a lone surrogate at"),
    ({"task": "\udfff", "texts": ["fine"]}, 422, "task is not valid Unicode"),
    ({"task": "sst2", "texts": "\ud800"}, 422, "\\ud800"),  # the 422 body echoes it escaped, not as a 500
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served_reused, body, status, message):
    url, expected, _ = served_reused
    reply = classify(url, **body)
    assert reply.status_code == status, reply.text
    assert message in str(reply.json()["detail"])
    good = classify(url, task="sst2", texts=QUERIES[:3])
    assert good.status_code == 200, good.text
    assert_matches(good.json()["predictions"], expected["sst2"][:3])


def test_lite_refuses_several_replicas():
    config = serve_config("./some.db", {SST2: "some"})
    with pytest.raises(ServeSetupError, match=r"one process only.*Milvus server"):
        build_app(ModelSpec(factory=tiny_llama_models), config, replicas=2)


def test_a_task_without_exit_database_is_a_clear_setup_error(served_reused, tmp_path):
    config = serve_config(str(tmp_path / "empty.db"), {SST2: "never_built"})
    app = build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS)
    try:
        with pytest.raises(ServeSetupError, match=r"no exit database for task sst2 in .*empty\.db.*raee build"):
            run_app(app, name="raee-empty", route_prefix="/empty")
    finally:
        delete_app("raee-empty")
    url, expected, _ = served_reused
    assert_matches(classify(url, task="trec", texts=QUERIES[:2]).json()["predictions"], expected["trec"][:2])


def test_api_key_from_the_environment_is_required_on_v1_routes(serve_url_reused, tmp_path, monkeypatch):
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path / "keyed.db")
    labels = np.random.default_rng(0).integers(0, 2, size=len(SENTENCES))
    summary = build_database(backbone, encoder, SST2, db_uri=uri,
                             dataset=Dataset(SST2, "train", tuple(SENTENCES), labels), show_progress=False)
    monkeypatch.setenv(API_KEY_ENV, "s3cret-key")
    app = build_app(ModelSpec(factory=tiny_llama_models), serve_config(uri, {SST2: summary.collection},
                                                                       knobs={"k": 4}), cpus_per_replica=ACTOR_CPUS)
    assert "s3cret" not in repr(app)  # not echoed in logs
    run_app(app, name="raee-keyed", route_prefix="/keyed")
    try:
        url, body = f"{serve_url_reused}/keyed", {"task": "sst2", "texts": ["fine"]}
        for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": ""}):
            reply = requests.post(f"{url}/v1/classify", json=body, headers=headers, timeout=TIMEOUT_S)
            assert reply.status_code == 401, reply.text
            assert "x-api-key" in reply.json()["detail"]
        assert requests.get(f"{url}/v1/tasks", timeout=TIMEOUT_S).status_code == 401
        key = {"x-api-key": "s3cret-key"}
        assert requests.post(f"{url}/v1/classify", json=body, headers=key, timeout=TIMEOUT_S).status_code == 200
        assert requests.get(f"{url}/v1/tasks", headers=key, timeout=TIMEOUT_S).status_code == 200
        assert requests.get(f"{url}/healthz", timeout=TIMEOUT_S).status_code == 200  # liveness stays open
    finally:
        delete_app("raee-keyed")
