"""Live growth and the neighbour-text permission over real HTTP, on Milvus Lite (one replica owns the file).

The bound for an added example (docs/milvus.md): POST /v1/examples answers once an "Eventually" read returns the
new records, so the next classify request - on any replica - retrieves it. Here the very next request after the
200 finds the added text as its own nearest neighbour (distance 0) and exits where that neighbour's exit set
says (worked out in process, before serving); re-adding it changes nothing.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import requests

from collectors.build import BuildOptions, add_examples, build_database
from inference_workers.deployment import ServeConfig, ServeSetupError, build_app, delete_app, run_app
from inference_workers.engine import BatchEngine
from milvus.added import added_ids
from milvus.exit_db import ExitDB
from orchestration.pipelines import BuildSelector, ExitDatabaseError
from orchestration.pipelines import add_examples as add_pipeline
from raee.exit_policy import ExitPolicy, exit_sets
from raee.records import Neighbours, record_ids
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, RAEE_KNOBS, serve_config, tiny_llama_models

pytestmark = pytest.mark.serve

SST2 = get_task("sst2")
TRAIN_TEXTS = tuple(f"{a} {b}" for a, b in itertools.permutations(SENTENCES, 2))  # 56 distinct texts
POLICY = ExitPolicy(**RAEE_KNOBS)
WRITE_KEY, TEXT_KEY = "w-key-for-tests", "t-key-for-tests"
APP, ROUTE = "raee-grow", "/grow"
TIMEOUT_S = 60


def train_set(flip: bool = False) -> Dataset:
    labels = np.random.default_rng(0).integers(0, 2, size=len(TRAIN_TEXTS))
    return Dataset(SST2, "train", TRAIN_TEXTS, 1 - labels if flip else labels)


def changing_example(backbone, encoder, db: ExitDB, candidates: list[str]) -> tuple[str, int, int, int]:
    """(text, label, exit now, exit once the text is stored with that label): the first candidate whose exit
    moves when it becomes its own nearest neighbour (distance 0 outweighs every other neighbour, Eq. 5)."""
    engine = BatchEngine.single(backbone, encoder, SST2, db, POLICY, name="raee")
    now = [r.exit_layer for r in engine.classify(candidates, SST2)]
    probs = backbone.layer_probs(candidates, SST2)  # (N, L+1, C): the records a build would store
    for i, label in itertools.product(range(len(candidates)), (0, 1)):
        own = exit_sets(probs[i : i + 1], np.array([label]))  # (1, L+1)
        alone = Neighbours(ids=np.array([[7]]), distances=np.zeros((1, 1), np.float32), exit_probs=own[None],
                           labels=np.array([[label]]))
        after = int(POLICY.exit_layers(alone)[0])
        if after != now[i]:
            return candidates[i], label, now[i], after
    raise AssertionError("no candidate changes its exit; add candidates")


@pytest.fixture(scope="module")
def grown_reused(tmp_path_factory, serve_url_reused):
    """(base URL, lite uri, build summary, (text, label, exit before, exit after))."""
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path_factory.mktemp("grow") / "exit.db")
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=train_set(),
                             options=BuildOptions(batch_size=16), show_progress=False)
    with ExitDB(uri, collection=summary.collection, meta=None, create=False) as db:
        chosen = changing_example(backbone, encoder, db, [*SENTENCES, "the acting is great", "a mess ."])
    config = serve_config(uri, {SST2: summary.collection}, policy="raee", knobs=RAEE_KNOBS, neighbour_texts="key",
                          text_key=TEXT_KEY, write_key=WRITE_KEY, recorder=add_examples)
    run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS), name=APP,
            route_prefix=ROUTE)
    yield f"{serve_url_reused}{ROUTE}", uri, summary, chosen
    delete_app(APP)


def post(url: str, route: str, body: dict, **headers: str) -> requests.Response:
    return requests.post(f"{url}{route}", json=body, headers=headers, timeout=TIMEOUT_S)


def test_an_added_example_is_its_own_nearest_neighbour_in_the_next_request(grown_reused):
    url, _, summary, (text, label, before, after) = grown_reused
    body = {"task": "sst2", "texts": [text], "labels": [SST2.label_values[label]]}
    for headers in ({}, {"x-write-key": "wrong"}):
        refused = post(url, "/v1/examples", body, **headers)
        assert refused.status_code == 401 and "x-write-key" in refused.json()["detail"]
    first = post(url, "/v1/classify", {"task": "sst2", "texts": [text], "explain": True})
    assert first.status_code == 200 and first.json()["predictions"][0]["exit_layer"] == before

    added = post(url, "/v1/examples", body, **{"x-write-key": WRITE_KEY})
    assert added.status_code == 200, added.text
    reply = added.json()
    assert (reply["added"], reply["existing"], reply["skipped"]) == (1, 0, 0)
    assert reply["collection"] == summary.version and len(reply["ids"]) == 1
    got = post(url, "/v1/classify", {"task": "sst2", "texts": [text], "explain": True}).json()["predictions"][0]
    nearest = got["neighbours"][0]
    assert nearest["id"] == reply["ids"][0] and nearest["label"] == label and nearest["distance"] < 1e-4
    assert got["exit_layer"] == after != before and got["collection"] == summary.version

    again = post(url, "/v1/examples", body, **{"x-write-key": WRITE_KEY}).json()
    assert (again["added"], again["existing"], again["ids"]) == (0, 1, reply["ids"])
    tasks = requests.get(f"{url}/v1/tasks", timeout=TIMEOUT_S).json()
    assert tasks[0]["n_records"] == len(TRAIN_TEXTS) + 1 and tasks[0]["version"] == summary.version


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"task": "sst2", "texts": ["fine"], "labels": ["7"]}, 422, "label 0 '7' is not one of task sst2's label values"),
    ({"task": "sst2", "texts": ["fine", "ok"], "labels": ["1"]}, 422, "1 labels for 2 texts"),
    ({"task": "trec", "texts": ["fine"], "labels": ["1"]}, 404, "'trec' is not served here"),
    ({"task": "sst2", "texts": ["  "], "labels": ["1"]}, 422, "text 0 is empty"),
])
def test_bad_examples_get_4xx_and_nothing_is_written(grown_reused, body, status, message):
    url = grown_reused[0]
    before = requests.get(f"{url}/v1/tasks", timeout=TIMEOUT_S).json()[0]["n_records"]
    reply = post(url, "/v1/examples", body, **{"x-write-key": WRITE_KEY})
    assert reply.status_code == status and message in reply.json()["detail"], reply.text
    assert requests.get(f"{url}/v1/tasks", timeout=TIMEOUT_S).json()[0]["n_records"] == before


def test_neighbour_texts_need_the_text_key(grown_reused):
    url, _, _, (added_text, label, _, _) = grown_reused
    body = {"task": "sst2", "texts": [*SENTENCES[:2], added_text], "explain": True}
    keyed = post(url, "/v1/classify", body, **{"x-text-key": TEXT_KEY}).json()["predictions"]
    stored = dict(zip(record_ids("sst2", "train", np.arange(len(TRAIN_TEXTS))).tolist(), TRAIN_TEXTS, strict=True))
    stored[int(added_ids("sst2", [added_text], None, [SST2.label_values[label]])[0])] = added_text
    for prediction in keyed:  # with the key: each neighbour's own training text (or the added one)
        assert [n["text"] for n in prediction["neighbours"]] == [stored[n["id"]] for n in prediction["neighbours"]]
    for headers in ({}, {"x-text-key": "wrong"}):
        got = post(url, "/v1/classify", body, **headers).json()["predictions"]
        for without, withkey in zip(got, keyed, strict=True):
            assert [n["text"] for n in without["neighbours"]] == [None] * len(withkey["neighbours"])
            for field in ("id", "label", "label_word", "distance", "exit_layers"):  # everything else stays
                assert [n[field] for n in without["neighbours"]] == [n[field] for n in withkey["neighbours"]]
            assert all(n["exit_layers"] == sorted(n["exit_layers"]) for n in without["neighbours"])
    health = requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()
    assert health["neighbour_texts"] == "key" and health["adds_examples"] is True


def test_texts_are_off_by_default_and_key_mode_needs_a_key(monkeypatch):
    config = serve_config("./x.db", {SST2: "x"})
    assert config.neighbour_texts == "off" and config.write_key is None
    assert "key" not in repr(ServeConfig(tasks=(SST2,), collections={"sst2": "x"}, text_key="sekret", write_key="w"))
    monkeypatch.delenv("RAEE_TEXT_KEY", raising=False)
    with pytest.raises(ServeSetupError, match=r"neighbour_texts='key' needs a text key: set \$RAEE_TEXT_KEY"):
        build_app(ModelSpec(factory=tiny_llama_models), serve_config("./x.db", {SST2: "x"}, neighbour_texts="key"))


def test_raee_add_in_process_is_idempotent_and_refuses_a_file_raee_serve_holds(grown_reused, tmp_path):
    _, served_uri, _, _ = grown_reused
    spec = ModelSpec(factory=tiny_llama_models)
    examples = Path(tmp_path / "new.tsv")
    examples.write_text("sentence\tlabel\nan added line\t1\nanother added line\t0\n")
    with pytest.raises(ExitDatabaseError, match=r"held by another process .* POST /v1/examples"):
        add_pipeline(SST2, examples, model=spec, db_uri=served_uri)
    uri = str(tmp_path / "own.db")
    backbone, encoder = tiny_llama_models()
    build_database(backbone, encoder, SST2, db_uri=uri, dataset=train_set(), show_progress=False,
                   options=BuildOptions(batch_size=16))
    first = add_pipeline(SST2, examples, model=spec, db_uri=uri, selector=BuildSelector())
    again = add_pipeline(SST2, examples, model=spec, db_uri=uri)
    assert (first.n_new, first.n_existing, again.n_new, again.n_existing) == (2, 0, 0, 2)
    assert first.ids == again.ids
    with ExitDB(uri, collection=first.collection, meta=None, create=False) as db:
        assert db.count() == len(TRAIN_TEXTS) + 2
        assert db.get(np.array(first.ids)).texts == ("an added line", "another added line")
