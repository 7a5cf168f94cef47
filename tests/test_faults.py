"""Fault injection on the real stack: kill -9 a Serve replica under load, restart the Milvus server mid-serve.

Each test deploys its own app under its own route on the session's Serve and deletes it afterwards, so the
shared apps of other modules never see the faults. Figures print with `pytest -s`. Killing a collector actor
and the database writer mid-build is covered in test_ray_collect.py and test_exit_db.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from benchmarks.load import Outcome, rotating_body, run_load, summarize
from collectors.build import BuildOptions, build_database
from inference_workers.deployment import Limits, ServeConfig, build_app, delete_app, run_app
from milvus.server import EmbeddedMilvusServer, MilvusServerUnavailable
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.figures import report
from tests.fixtures_milvus import EMBEDDED_ROOT_TOKEN
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, RAEE_KNOBS, serve_config, tiny_llama_models

pytestmark = [pytest.mark.serve, pytest.mark.reliability]

SST2 = get_task("sst2")
TRAIN_TEXTS = tuple(f"{a} {b}" for a in SENTENCES for b in SENTENCES if a != b)
LIMITS = Limits(max_batch_size=16, batch_wait_timeout_s=0.005, max_texts=4, max_text_chars=200)
CLIENTS = 3
TIMEOUT_S = 60
RECOVERY_TIMEOUT_S = 90  # replica restart: new actor + tiny model + Lite reopen, on a busy 2-core machine


def _build(uri: str, token: str | None = None, **kwargs) -> ServeConfig:
    """Build the sst2 exit database at uri; the ServeConfig that serves it with the paper's policy."""
    backbone, encoder = tiny_llama_models()
    labels = np.random.default_rng(0).integers(0, 2, size=len(TRAIN_TEXTS))
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=Dataset(SST2, "train", TRAIN_TEXTS, labels),
                             token=token, options=BuildOptions(batch_size=16), show_progress=False)
    return serve_config(uri, {SST2: summary.collection}, token=token, policy="raee", knobs=RAEE_KNOBS, **kwargs)


def _deploy(config: ServeConfig, name: str, route: str):
    return run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS,
                             limits=LIMITS), name=name, route_prefix=route)


def _classify(url: str, texts: list[str]) -> requests.Response:
    return requests.post(f"{url}/v1/classify", json={"task": "sst2", "texts": texts}, timeout=TIMEOUT_S)


class BackgroundLoad:
    """run_load in a thread until stop(): the clients keep sending while the test injects a fault."""

    def __init__(self, url: str, clients: int) -> None:
        self.stop_event = threading.Event()
        self.outcomes: list[Outcome] = []  # complete once the block has exited
        self._live: list[Outcome] = []  # grows while the load runs (list.append is atomic)
        body = rotating_body("sst2", list(SENTENCES), 2)
        self.thread = threading.Thread(target=lambda: self.outcomes.extend(
            run_load(url, body, clients=clients, seconds=600, timeout_s=TIMEOUT_S, stop=self.stop_event,
                     on_outcome=self._live.append)), daemon=True)

    def outcomes_so_far(self) -> list[Outcome]:
        return list(self._live)

    def __enter__(self) -> BackgroundLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(TIMEOUT_S + 30)


# ---- kill -9 a Serve replica under load ---------------------------------------------------------------------


@pytest.fixture
def fault_app(tmp_path: Path, serve_url_reused: str) -> Iterator[tuple[str, object]]:
    """(URL, handle) of a one-replica sst2 app on Lite under /fault; deleted afterwards."""
    uri = str(tmp_path / "exit.db")
    handle = _deploy(_build(uri), "raee-fault", "/fault")
    try:
        yield serve_url_reused + "/fault", handle
    finally:
        delete_app("raee-fault")


def test_killed_replica_is_restarted_and_only_in_flight_requests_fail(fault_app):
    url, handle = fault_app
    expected = _classify(url, list(SENTENCES[:2])).json()["predictions"]
    old_pid = handle.process_info.remote().result(timeout_s=TIMEOUT_S)["pid"]
    with BackgroundLoad(url, CLIENTS) as load:
        time.sleep(2.0)  # load is flowing
        killed_at = time.perf_counter()
        os.kill(old_pid, signal.SIGKILL)
        # The handle waits for a live replica: this returns once Ray has started and initialised a new one.
        new_pid = handle.process_info.remote().result(timeout_s=RECOVERY_TIMEOUT_S)["pid"]
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while not any(o.ok and o.start > killed_at for o in load.outcomes_so_far()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # and keeps serving
    outcomes = load.outcomes
    assert new_pid != old_pid
    failed = [o for o in outcomes if not o.ok]
    after_kill = [o for o in outcomes if o.ok and o.start > killed_at]
    assert after_kill, "no request succeeded after the kill"
    recovered_at = min(o.end for o in after_kill)
    # Only requests already in flight at the kill may fail (each client has at most one); anything sent after it
    # waits for the new replica and succeeds.
    in_flight = sum(o.start <= killed_at <= o.end for o in outcomes)
    assert in_flight >= 1  # the kill did hit requests in progress (else this test proves little)
    assert len(failed) <= in_flight <= CLIENTS, [o.error for o in failed]
    assert all(o.start <= killed_at for o in failed), [(o.start - killed_at, o.error) for o in failed]
    reply = _classify(url, list(SENTENCES[:2]))
    assert reply.status_code == 200 and reply.json()["predictions"] == expected  # same answers as before
    stats = summarize(outcomes, CLIENTS)
    report(f"fault replica kill -9: 1 injected, survived; {in_flight} requests in flight at the kill, {len(failed)} "
           f"of them failed (HTTP {sorted({o.status for o in failed})}), none sent after it; {stats.requests} served, "
           f"first answer {recovered_at - killed_at:.1f} s after the kill (new replica pid {new_pid} != {old_pid})")


# ---- Milvus server restart mid-serve ------------------------------------------------------------------------

# 2.3.5 waits for the killed server's sessions to expire before it serves again (ttl 30 s by default).
MILVUS_SETTINGS = {"common.session.ttl": "10"}


@pytest.mark.milvus_server
def test_milvus_restart_gives_clear_503_then_serving_resumes_without_redeploy(tmp_path: Path, serve_url_reused):
    server = EmbeddedMilvusServer(tmp_path / "milvus", authorization=True, settings=MILVUS_SETTINGS)
    try:
        server.start()
    except MilvusServerUnavailable as exc:
        pytest.skip(f"real Milvus server unavailable: {exc}")
    restarted = None
    try:
        config = _build(server.uri, EMBEDDED_ROOT_TOKEN)
        handle = _deploy(config, "raee-milvus-fault", "/mfault")
        url = serve_url_reused + "/mfault"
        try:
            pid = handle.process_info.remote().result(timeout_s=TIMEOUT_S)["pid"]
            expected = _classify(url, list(SENTENCES[:3]))
            assert expected.status_code == 200, expected.text
            with BackgroundLoad(url, 2) as load:
                time.sleep(1.0)
                stopped_at = time.perf_counter()
                server.stop()
                t0 = time.perf_counter()
                down = _classify(url, list(SENTENCES[:3]))
                down_s = time.perf_counter() - t0
                restarted = EmbeddedMilvusServer(server.data_dir, port=server.port, authorization=True,
                                                 settings=MILVUS_SETTINGS).start()
                started_at = time.perf_counter()
                deadline = time.monotonic() + RECOVERY_TIMEOUT_S
                while time.monotonic() < deadline:
                    reply = _classify(url, list(SENTENCES[:3]))
                    if reply.status_code == 200:
                        break
                    assert reply.status_code == 503, reply.text
                    time.sleep(0.5)
                resumed_at = time.perf_counter()
                time.sleep(1.0)
            assert down.status_code == 503, down.text
            detail = down.json()["detail"]
            assert f"exit database {server.uri} is unavailable" in detail and "retry later" in detail, detail
            assert down.headers.get("retry-after") == "5"
            assert down_s < 15, f"a request took {down_s:.1f} s while Milvus was down: it must fail fast"
            assert reply.status_code == 200, reply.text
            assert reply.json() == expected.json()  # same answers from the same records
            assert handle.process_info.remote().result(timeout_s=TIMEOUT_S)["pid"] == pid  # no replica restart
            failed = [o for o in load.outcomes if not o.ok]
            assert failed and {o.status for o in failed} == {503}, {o.error for o in failed}
            assert all(stopped_at - 1.0 <= o.start <= resumed_at for o in failed)
            assert all(o.ok for o in load.outcomes if o.start > resumed_at + 0.5)
            slowest = max(load.outcomes, key=lambda o: o.end - o.start)
            slowest_s = slowest.end - slowest.start
            slowest_text = (f"{slowest_s:.1f} s (status {slowest.status}, sent {slowest.start - stopped_at:+.1f} s "
                            "from the stop)")
            # Nothing hung while Milvus was down: a call fails within about two db_timeout_s (5 s; pymilvus may
            # start a last retry just before its deadline), and batches that queued behind a failing one fail with it.
            assert slowest_s < 15, f"a request took {slowest_text}"
            report(f"fault milvus restart: 1 injected, survived without redeploying; {len(failed)} requests got "
                  f"503 while it was down (first in {down_s * 1000:.0f} ms), served again "
                  f"{resumed_at - started_at:.1f} s after the server was back "
                  f"({resumed_at - stopped_at:.1f} s after the stop); {sum(o.ok for o in load.outcomes)} served; "
                  f"slowest request {slowest_text}")
        finally:
            delete_app("raee-milvus-fault")
    finally:
        if restarted is not None:
            restarted.stop()
        server.cleanup()
