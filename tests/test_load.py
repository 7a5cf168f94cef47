"""Bounded load test of the real Serve deployment (tiny llama, Milvus Lite, loopback): no errors, no leak.

CLIENTS threads post back to back for SECONDS; the test prints requests served, throughput, p50/p99 latency,
errors and the replica's resident memory before and after (`pytest -s`). Bigger runs: benchmarks/load.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from benchmarks.load import rotating_body, run_load, summarize
from collectors.build import BuildOptions, build_database
from inference_workers.deployment import Limits, build_app, delete_app, run_app
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.figures import report
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, RAEE_KNOBS, serve_config, tiny_llama_models

pytestmark = [pytest.mark.serve, pytest.mark.reliability]

APP, ROUTE = "raee-load", "/load"
CLIENTS, SECONDS, TEXTS_PER_REQUEST = 4, 8.0, 2
MAX_RSS_GROWTH_MIB = 200.0  # a leak of ~1 KiB per text would pass unnoticed in 8 s; a per-request model copy not
LIMITS = Limits(max_batch_size=16, batch_wait_timeout_s=0.005, max_texts=4, max_text_chars=200)
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def load_app_reused(tmp_path_factory, serve_url_reused):
    """(base URL, deployment handle) of an sst2 app under /load on the session's Serve (tiny llama, Lite)."""
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path_factory.mktemp("load") / "exit.db")
    task = get_task("sst2")
    texts = tuple(f"{a} {b}" for a in SENTENCES for b in SENTENCES if a != b)
    labels = np.random.default_rng(0).integers(0, 2, size=len(texts))
    summary = build_database(backbone, encoder, task, db_uri=uri, dataset=Dataset(task, "train", texts, labels),
                             options=BuildOptions(batch_size=16), show_progress=False)
    config = serve_config(uri, {task: summary.collection}, policy="raee", knobs=RAEE_KNOBS)
    handle = run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS,
                               limits=LIMITS), name=APP, route_prefix=ROUTE)
    yield serve_url_reused + ROUTE, handle
    delete_app(APP)


def test_concurrent_load_has_no_errors_and_bounded_memory(load_app_reused):
    url, handle = load_app_reused
    body = rotating_body("sst2", list(SENTENCES), TEXTS_PER_REQUEST)
    warm = run_load(url, body, clients=CLIENTS, seconds=2.0, timeout_s=TIMEOUT_S)  # first batches, allocator
    assert warm and all(o.ok for o in warm), [o.error for o in warm if not o.ok][:3]

    before = handle.process_info.remote().result(timeout_s=TIMEOUT_S)
    texts_before = requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()["batches"]["texts"]
    outcomes = run_load(url, body, clients=CLIENTS, seconds=SECONDS, timeout_s=TIMEOUT_S)
    after = handle.process_info.remote().result(timeout_s=TIMEOUT_S)
    texts_after = requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()["batches"]["texts"]
    stats = summarize(outcomes, CLIENTS, rss_before=before["rss_bytes"], rss_after=after["rss_bytes"])
    report(f"{stats.lines()} [bound {MAX_RSS_GROWTH_MIB:.0f} MiB]")

    assert after["pid"] == before["pid"], "the replica restarted under load"
    assert stats.errors == 0, stats.error_kinds
    assert stats.requests >= CLIENTS * 2, stats  # every client got answers, not one request each
    assert texts_after - texts_before == stats.texts  # the replica ran every text it answered, exactly once
    assert before["rss_bytes"] > 50 * 2**20  # a real measurement (torch alone is more), not a 0 fallback
    assert stats.rss_growth_mib is not None and stats.rss_growth_mib < MAX_RSS_GROWTH_MIB, stats.lines()
    assert stats.p99_ms < TIMEOUT_S * 1000


def test_answers_under_load_match_a_quiet_request(load_app_reused):
    """Batching texts of concurrent clients must not mix up whose answer is whose."""
    url, _ = load_app_reused
    quiet = {text: requests.post(f"{url}/v1/classify", json={"task": "sst2", "texts": [text]},
                                 timeout=TIMEOUT_S).json()["predictions"][0] for text in SENTENCES}

    def body(client: int, i: int) -> dict:  # 1 to 3 texts per request, so batches mix request sizes
        return rotating_body("sst2", list(SENTENCES), 1 + (client + i) % 3)(client, i)

    outcomes = run_load(url, body, clients=CLIENTS, seconds=3.0, timeout_s=TIMEOUT_S, keep_replies=True)
    assert outcomes and all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok][:3]
    checked = 0
    for outcome in outcomes:
        texts, predictions = outcome.payload["texts"], outcome.reply["predictions"]
        assert len(predictions) == len(texts)
        for text, got in zip(texts, predictions, strict=True):
            assert (got["label"], got["exit_layer"]) == (quiet[text]["label"], quiet[text]["exit_layer"]), text
            np.testing.assert_allclose(got["probs"], quiet[text]["probs"], atol=1e-5)
            checked += 1
    report(f"load: {checked} answers from {len(outcomes)} concurrent requests equal the quiet answers")
