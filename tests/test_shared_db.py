"""A served build on the real Milvus 2.3.5 server (authentication on): zero-downtime rebuilds, rollback, and
examples added by another process.

Clients query continuously while the build is rebuilt into a new version, switched in, and rolled back: not
one request fails, and every prediction equals the in-process answer of the one version it names. Then
`raee add` (another process than the replica) writes an example and returns; the very next request finds it;
a rebuild carries it into the new version. The replica holds a read-only role's token, so POST /v1/examples
is refused by Milvus and answers 403 naming the missing writer token.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests

from collectors.build import BuildOptions, add_examples, build_database
from inference_workers.deployment import build_app, delete_app, run_app
from inference_workers.engine import BatchEngine
from milvus.admin import drop_build
from milvus.exit_db import ExitDB, ExitDBError
from milvus.roles import create_roles, drop_roles
from milvus.versions import rollback
from orchestration.pipelines import BuildSelector
from orchestration.pipelines import add_examples as add_pipeline
from raee.spec import ModelSpec
from raee.tasks import Dataset
from tests.figures import report
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, RAEE_KNOBS, serve_config, tiny_llama_models
from tests.test_live_growth import POLICY, SST2, changing_example, train_set

pytestmark = [pytest.mark.serve, pytest.mark.milvus_server, pytest.mark.reliability]

NAME, APP, ROUTE = "shared_sst2", "raee-shared", "/shared"
ROLES = {"reader_user": "s_reader", "writer_user": "s_writer", "reader_role": "s_reader_role",
         "writer_role": "s_writer_role"}  # not the default names: leave a shared server's real roles alone
WRITE_KEY = "w-key-shared"
QUERIES = SENTENCES[:4]
TIMEOUT_S = 60


def build(uri: str, token: str, *, flip: bool) -> str:
    """Build NAME from the training set (labels flipped or not); the version it switched in."""
    backbone, encoder = tiny_llama_models()
    return build_database(backbone, encoder, SST2, db_uri=uri, dataset=train_set(flip), token=token,
                          options=BuildOptions(batch_size=16, collection=NAME), show_progress=False).version


def answers(uri: str, token: str, collection: str) -> list[tuple[int, int, tuple[float, ...]]]:
    """(label, exit layer, probs) of QUERIES from one version, in process."""
    backbone, encoder = tiny_llama_models()
    with ExitDB(uri, collection=collection, meta=None, create=False, token=token) as db:
        engine = BatchEngine.single(backbone, encoder, SST2, db, POLICY, name="raee")
        return [(r.label, r.exit_layer, r.probs) for r in engine.classify(QUERIES, SST2)]


@pytest.fixture(scope="module")
def shared_reused(milvus_server_uri, milvus_server_token, serve_url_reused):
    """(base URL, server uri, root token, first version): NAME built once with root, served through its alias by a
    replica holding a read-only role's token (and the write key, but no writer token)."""
    uri, token = milvus_server_uri, milvus_server_token
    if token is None:
        pytest.skip("the server under test has no authentication")
    try:
        drop_build(uri, NAME, token=token)
    except ExitDBError:
        pass
    drop_roles(uri, token, **ROLES)
    reader = create_roles(uri, token, reader_password="s-reader-1", writer_password="s-writer-1", **ROLES)["reader"]
    first = build(uri, token, flip=False)
    config = serve_config(uri, {SST2: NAME}, token=reader, policy="raee", knobs=RAEE_KNOBS, recorder=add_examples,
                          write_key=WRITE_KEY, version_check_s=0.5)
    run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS), name=APP,
            route_prefix=ROUTE)
    try:
        yield f"{serve_url_reused}{ROUTE}", uri, token, first
    finally:
        delete_app(APP)
        drop_build(uri, NAME, token=token)
        drop_roles(uri, token, **ROLES)


class Clients:
    """n threads POSTing QUERIES (policy raee) back to back; keeps every (status, predictions, sent at)."""

    def __init__(self, url: str, n: int = 2) -> None:
        self.url, self.stop, self.seen = url, threading.Event(), []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                reply = requests.post(f"{self.url}/v1/classify", json={"task": "sst2", "texts": QUERIES},
                                      timeout=TIMEOUT_S)
                got = (reply.status_code, reply.json().get("predictions") if reply.ok else reply.text, sent)
            except requests.RequestException as exc:
                got = (0, repr(exc), sent)
            with self.lock:
                self.seen.append(got)

    def versions_since(self, t: float) -> set[str]:
        with self.lock:
            return {p["collection"] for status, preds, sent in self.seen if status == 200 and sent >= t
                    for p in preds}

    def wait_for(self, version: str, since: float, timeout_s: float = 60.0) -> float:
        """Seconds from `since` until a request sent after it was answered by `version`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if version in self.versions_since(since):
                return time.monotonic() - since
            time.sleep(0.05)
        raise AssertionError(f"no answer from {version} within {timeout_s} s")

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=TIMEOUT_S)


def test_clients_see_no_error_and_one_version_per_answer_through_a_rebuild_a_switch_and_a_rollback(shared_reused):
    url, uri, token, first = shared_reused
    with Clients(url) as clients:
        clients.wait_for(first, time.monotonic())
        started = time.monotonic()
        second = build(uri, token, flip=True)  # written beside the served version, switched in when complete
        switched = time.monotonic()
        to_second = clients.wait_for(second, switched)
        assert rollback(uri, NAME, token=token).after == first
        rolled = time.monotonic()
        to_first = clients.wait_for(first, rolled)
        time.sleep(1.0)
    expected = {first: answers(uri, token, first), second: answers(uri, token, second)}
    assert expected[first] != expected[second], "the two versions should answer differently"
    statuses = Counter(status for status, _, _ in clients.seen)
    assert set(statuses) == {200}, f"failed requests: {[s for s in clients.seen if s[0] != 200][:3]}"
    per_version = Counter()
    for _, predictions, sent in clients.seen:
        for got, i in zip(predictions, range(len(QUERIES)), strict=True):
            label, exit_layer, probs = expected[got["collection"]][i]  # KeyError: an answer from no known version
            assert (got["label"], got["exit_layer"]) == (label, exit_layer)
            np.testing.assert_allclose(got["probs"], probs, atol=1e-5)
            per_version[got["collection"]] += 1
        if sent > rolled + to_first + 1.0:
            assert {p["collection"] for p in predictions} == {first}
    assert per_version[first] and per_version[second]
    report(f"shared database (server, auth on): {len(clients.seen)} requests ({sum(per_version.values())} "
           f"predictions) through a rebuild ({switched - started:.1f} s), a switch and a rollback: 0 errors, every "
           f"prediction equal to its version's in-process answer ({dict(per_version)}); switch seen by the replica "
           f"{to_second:.2f} s after the build returned, rollback after {to_first:.2f} s (version_check_s 0.5)")


def test_an_example_added_by_another_process_is_found_by_the_next_request_and_survives_a_rebuild(shared_reused):
    url, uri, token, _ = shared_reused
    backbone, encoder = tiny_llama_models()
    with ExitDB(uri, collection=NAME, meta=None, create=False, token=token) as db:
        text, label, before, after = changing_example(backbone, encoder, db, [*SENTENCES, "the acting is great"])
        served = db.collection
    body = {"task": "sst2", "texts": [text], "explain": True}
    assert requests.post(f"{url}/v1/classify", json=body, timeout=TIMEOUT_S).json()["predictions"][0][
        "exit_layer"] == before
    added = add_pipeline(SST2, Dataset(SST2, "train", (text,), np.array([label])), model=ModelSpec(
        factory=tiny_llama_models), db_uri=uri, token=token, selector=BuildSelector(collection=NAME))
    assert (added.n_new, added.collection) == (1, served)
    got = requests.post(f"{url}/v1/classify", json=body, timeout=TIMEOUT_S).json()["predictions"][0]  # no retry
    assert got["neighbours"][0]["id"] == added.ids[0] and got["neighbours"][0]["distance"] < 1e-4
    assert got["exit_layer"] == after != before
    assert got["neighbours"][0]["text"] is None  # neighbour texts are off by default
    example = {"task": "sst2", "texts": ["a new line"], "labels": ["1"]}
    no_key = requests.post(f"{url}/v1/examples", json=example, timeout=TIMEOUT_S)
    assert no_key.status_code == 401 and "x-write-key" in no_key.json()["detail"]
    refused = requests.post(f"{url}/v1/examples", json=example, headers={"x-write-key": WRITE_KEY}, timeout=TIMEOUT_S)
    detail = refused.json()["detail"]  # the replica holds a reader's token: Milvus refuses, the route says so
    assert refused.status_code == 403 and "the server's Milvus token may not write" in detail, detail
    assert "PrivilegeUpsert" in detail and "--write-token" in detail
    report(f"live growth (server): raee add returned {added.seconds_to_visible:.3f} s after its write, once an "
           "Eventually read saw it; the replica's next request retrieved it (no retry)")

    rebuilt = build(uri, token, flip=served.endswith("_v1"))  # the other training set: the other version
    assert rebuilt != served
    deadline = time.monotonic() + TIMEOUT_S
    while (got := requests.post(f"{url}/v1/classify", json=body, timeout=TIMEOUT_S).json()["predictions"][0])[
            "collection"] != rebuilt:
        assert time.monotonic() < deadline, "the replica never switched to the rebuilt version"
        time.sleep(0.2)
    assert got["neighbours"][0]["id"] == added.ids[0]  # carried into the new version
