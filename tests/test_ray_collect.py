"""Distributed collection on Ray Data with a real local Ray cluster: same records as in process, resumable,
survives a kill -9 of an actor."""

from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest

from collectors.build import BuildOptions, build_database
from collectors.ray_collect import CollectionError, PoolShape, build_on_ray, pool_shape
from milvus.exit_db import ExitDB, setup_meta
from orchestration.pipelines import RayOptions
from raee.records import record_ids
from raee.spec import ModelSpec
from raee.tasks import get_task
from tests.figures import report
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, task_on_disk, tiny_llama_models

TEXTS = tuple(f"{a} {b}" for a, b in itertools.permutations(SENTENCES, 2))[:40]
BATCH = 4  # 10 batches per task
OPTIONS = BuildOptions(batch_size=BATCH, calibration_examples=20)
TWO = PoolShape(n_actors=2, cpus=ACTOR_CPUS, gpus=0)


def slow_tiny_llama_models():
    """tiny_llama_models whose build-time forward sleeps 0.25 s, so a batch is still running when a test kills."""
    backbone, encoder = tiny_llama_models()
    layer_probs = backbone.layer_probs

    def slowed(*args, **kwargs):
        time.sleep(0.25)
        return layer_probs(*args, **kwargs)

    backbone.layer_probs = slowed
    return backbone, encoder


SLOW = ModelSpec(factory=slow_tiny_llama_models)


@pytest.fixture(scope="module")
def tasks_reused(tmp_path_factory):
    """sst2 and trec reading 40 texts each from jsonl files (seeded labels)."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    return [task_on_disk(get_task(name), TEXTS, rng.integers(0, get_task(name).n_classes, size=len(TEXTS)), folder)
            for name in ("sst2", "trec")]


@pytest.fixture(scope="module")
def reference_reused(tasks_reused, tmp_path_factory):
    """The in-process collector's records for both tasks: {task name: (ExitRecords, calibration)}, summaries."""
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path_factory.mktemp("reference") / "exit.db")
    stored, summaries = {}, {}
    for task in tasks_reused:
        summaries[task.name] = build_database(backbone, encoder, task, db_uri=uri, options=OPTIONS,
                                              show_progress=False)
        with ExitDB(uri, collection=summaries[task.name].collection, meta=setup_meta(backbone, encoder, task)) as db:
            stored[task.name] = (db.get(record_ids(task.name, "train", np.arange(len(TEXTS)))), db.calibration)
    return stored, summaries


def assert_same_records(uri: str, reference, token: str | None = None) -> None:
    stored_ref, summaries_ref = reference
    backbone, encoder = tiny_llama_models()
    for name, (want, calibration) in stored_ref.items():
        task = get_task(name)
        with ExitDB(uri, collection=summaries_ref[name].collection, meta=setup_meta(backbone, encoder, task),
                    token=token, consistency="Strong") as db:
            got = db.get(record_ids(name, "train", np.arange(len(TEXTS))))
            assert db.count() == len(TEXTS)
            np.testing.assert_allclose(db.calibration.bias, calibration.bias, atol=1e-6)  # same sample, same fit
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-5)
        np.testing.assert_allclose(got.exit_probs, want.exit_probs, atol=1e-5)
        np.testing.assert_allclose(got.layer_probs, want.layer_probs, atol=1e-5)
        np.testing.assert_array_equal(got.labels, want.labels)
        assert got.texts == want.texts


def test_node_is_on_loopback(ray_cluster_reused):
    import ray

    assert ray_cluster_reused["node_ip_address"] == "127.0.0.1"
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    assert ray_cluster_reused["gcs_address"].startswith("127.0.0.1:")


def test_two_actors_write_the_in_process_records_and_a_rerun_recomputes_nothing(ray_cluster_reused, tasks_reused,
                                                                                 reference_reused, tmp_path):
    uri = str(tmp_path / "ray.db")
    first = build_on_ray(tasks_reused, spec=SLOW, db_uri=uri, options=OPTIONS, shape=TWO, show_progress=False)
    assert (first.n_actors, first.n_batches, first.n_resumed) == (2, 20, 0)
    for summary, name in zip(first.summaries, ("sst2", "trec"), strict=True):
        want = reference_reused[1][name]
        assert summary.collection == want.collection and summary.version == want.version
        assert (summary.n_examples, summary.n_records, summary.n_in_db) == (len(TEXTS),) * 3
        assert summary.share_no_correct_layer == pytest.approx(want.share_no_correct_layer)
        assert summary.full_model_accuracy == pytest.approx(want.full_model_accuracy)
    assert_same_records(uri, reference_reused)

    again = build_on_ray(tasks_reused, spec=SLOW, db_uri=uri, options=OPTIONS, shape=TWO, show_progress=False)
    assert (again.n_batches, again.n_resumed) == (0, 2 * len(TEXTS))  # one paged scan found every record
    assert [s.n_in_db for s in again.summaries] == [len(TEXTS)] * 2
    assert [s.full_model_accuracy for s in again.summaries] == [s.full_model_accuracy for s in first.summaries]
    assert_same_records(uri, reference_reused)


def test_a_stopped_build_resumes_without_recomputing_stored_rows(ray_cluster_reused, tasks_reused, reference_reused,
                                                                  tmp_path):
    uri = str(tmp_path / "ray.db")
    seen: list[int] = []

    def stop_after_three(batch: dict) -> None:
        seen.append(int(batch["n_examples"].sum()))
        if len(seen) == 3:
            raise KeyboardInterrupt  # what Ctrl-C in the driver does

    with pytest.raises(KeyboardInterrupt):
        build_on_ray(tasks_reused[:1], spec=SLOW, db_uri=uri, options=OPTIONS, shape=TWO, show_progress=False,
                     on_batch=stop_after_three)
    stored = sum(seen)
    later: list[int] = []
    resumed = build_on_ray(tasks_reused, spec=SLOW, db_uri=uri, options=OPTIONS, shape=TWO, show_progress=False,
                           on_batch=lambda batch: later.append(int(batch["n_examples"].sum())))
    assert resumed.n_resumed >= stored > 0
    assert sum(later) == 2 * len(TEXTS) - resumed.n_resumed  # stored rows were not computed again
    assert [s.n_in_db for s in resumed.summaries] == [len(TEXTS)] * 2
    assert_same_records(uri, reference_reused)


def test_an_offramp_build_on_ray_equals_the_in_process_one(ray_cluster_reused, tasks_reused, tmp_path):
    """A Ray task fits the off-ramps on the sample; actors read its cross-fitted rows and the rest through them."""
    from inference_workers.engine import stored_head

    backbone, encoder = tiny_llama_models()
    options = BuildOptions(head="offramp", offramp_examples=20, offramp_folds=4, batch_size=BATCH,
                           calibration_examples=12)
    task = tasks_reused[0]
    want = build_database(backbone, encoder, task, db_uri=str(tmp_path / "ref.db"), options=options,
                          show_progress=False)
    got = build_on_ray([task], spec=SLOW, db_uri=str(tmp_path / "ray.db"), options=options, shape=TWO,
                       show_progress=False)
    assert got.summaries[0].n_in_db == len(TEXTS)
    ids = record_ids("sst2", "train", np.arange(len(TEXTS)))
    with ExitDB(str(tmp_path / "ref.db"), collection=want.collection, meta=None, create=False) as ref, \
         ExitDB(str(tmp_path / "ray.db"), collection=got.summaries[0].collection, meta=None, create=False) as db:
        np.testing.assert_allclose(db.get(ids).layer_probs, ref.get(ids).layer_probs, atol=1e-5)
        np.testing.assert_allclose(db.calibration.bias, ref.calibration.bias, atol=1e-5)
        states = backbone.layer_pass(list(TEXTS), task).states
        np.testing.assert_allclose(stored_head(db).layer_probs(states), stored_head(ref).layer_probs(states),
                                   atol=1e-5)


@pytest.mark.reliability
def test_killed_actor_is_restarted_and_nothing_is_lost_or_duplicated(ray_cluster_reused, tasks_reused,
                                                                     reference_reused, tmp_path):
    uri = str(tmp_path / "ray.db")
    pids: list[int] = []
    killed: list[int] = []

    def kill_the_actor(batch: dict) -> None:  # one actor: the rest of the stream must run on its restart
        pids.extend(batch["pid"].tolist())
        if not killed:
            killed.append(int(batch["pid"][0]))
            os.kill(killed[0], signal.SIGKILL)

    build = build_on_ray(tasks_reused, spec=SLOW, db_uri=uri, options=OPTIONS, show_progress=False,
                         shape=PoolShape(n_actors=1, cpus=ACTOR_CPUS, gpus=0), on_batch=kill_the_actor)
    assert set(pids) - set(killed), "no batch ran on a restarted actor: the kill came too late"
    assert [s.n_examples for s in build.summaries] == [len(TEXTS)] * 2  # every example came back once
    assert [s.n_in_db for s in build.summaries] == [len(TEXTS)] * 2
    assert_same_records(uri, reference_reused)
    report(f"fault collector actor kill -9 mid-build (Ray Data actor pool): 1 injected, survived; "
           f"{2 * len(TEXTS)} records expected, {sum(s.n_in_db for s in build.summaries)} in the database, "
           "0 lost, 0 duplicated, every record equal to the in-process build")


def test_an_unschedulable_pool_is_a_clear_error(ray_cluster_reused):
    with pytest.raises(CollectionError, match="exceed the cluster's 2 CPUs"):
        pool_shape(8, 0.5)
    assert pool_shape(2) == PoolShape(2, 0.5, 0)  # 2 actors x 0.5 CPU: the read task keeps a CPU


@pytest.mark.milvus_server
def test_actors_write_directly_to_a_milvus_server(ray_cluster_reused, tasks_reused, reference_reused,
                                                  milvus_server_uri, request):
    try:  # the session server may run with authorization (tests/fixtures_milvus.py)
        token = request.getfixturevalue("milvus_server_token")
    except pytest.FixtureLookupError:
        token = os.environ.get("RAEE_MILVUS_TOKEN")
    backbone, encoder = tiny_llama_models()
    for name in ("sst2", "trec"):  # the server outlives tests: start from empty collections
        with ExitDB(milvus_server_uri, collection=reference_reused[1][name].collection,
                    meta=setup_meta(backbone, encoder, get_task(name)), token=token) as db:
            db.drop()
    pids: set[int] = set()
    build = build_on_ray(tasks_reused, spec=SLOW, db_uri=milvus_server_uri, token=token, options=OPTIONS, shape=TWO,
                         show_progress=False, on_batch=lambda batch: pids.update(batch["pid"].tolist()))
    assert [s.n_in_db for s in build.summaries] == [len(TEXTS)] * 2
    assert os.getpid() not in pids  # the actors wrote; the driver only counted
    assert_same_records(milvus_server_uri, reference_reused, token=token)


def test_build_with_ray_entry_point_checks_and_describes_the_count(ray_cluster_reused, data_dir, tmp_path):
    """A real LM-BFF file (SST-2's tsv) read by Ray Data through the spec's reader; a 0.5% subset."""
    from orchestration.distributed import build_with_ray, describe_build

    uri = str(tmp_path / "entry.db")
    result = build_with_ray([get_task("sst2")], model=ModelSpec(factory=tiny_llama_models), db_uri=uri,
                            options=BuildOptions(fraction=0.005, batch_size=8), data_dir=str(data_dir),
                            ray_options=RayOptions(num_actors=2, cpus_per_actor=ACTOR_CPUS), quiet=True)
    (summary,) = result.summaries
    assert summary.n_examples == summary.n_in_db == round(0.005 * 6920)
    assert summary.variant == "fraction 0.005 (seed 0)"
    lines = describe_build(result)
    assert lines[0].startswith(f"{summary.collection}: {summary.n_in_db} records == {summary.n_in_db} written")
    assert "(checked)" in lines[0] and "on 2 actors" in lines[1]


def test_eval_with_ray_runs_tasks_in_parallel_with_a_lite_file_each(ray_cluster_reused, data_dir, tmp_path):
    evaluate = pytest.importorskip("orchestration.evaluate")
    import json

    from orchestration.distributed import eval_with_ray

    config = evaluate.EvalConfig(k=4, tau=0.6, db_uri=str(tmp_path / "eval.db"), limit_train=32, limit_test=8,
                                 latency_examples=4, latency_batch_sizes=(1,), latency_repeats=1, tune_examples=8)
    results, text = eval_with_ray([get_task("sst2"), get_task("trec")], config=config, out_dir=str(tmp_path / "out"),
                                  command="test",
                                  model=ModelSpec(factory=tiny_llama_models), data_dir=str(data_dir),
                                  cpus_per_task=ACTOR_CPUS, quiet=True)
    assert [(r["task"], r["n_train"], r["n_test"]) for r in results] == [("sst2", 24, 8), ("trec", 24, 8)]
    assert all(set(r["engine_mismatches"].values()) == {0} for r in results)
    assert (tmp_path / "eval.sst2.db").exists() and (tmp_path / "eval.trec.db").exists()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["header"]["encoder"] == "backbone:tiny-llama:layer-2:mean:sentence"
    assert (tmp_path / "out" / "results.md").read_text() == text


def two_node_build(db_uri: str, tasks: list) -> dict:
    """In a fresh process: a 2-node local cluster (1 CPU each), a 2-actor build into db_uri; what ran where."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        raylets: set[int] = set()  # an actor's parent process is the raylet of its node

        def parents(batch: dict) -> None:
            raylets.update(psutil.Process(pid).ppid() for pid in set(batch["pid"].tolist()) if psutil.pid_exists(pid))

        result = build_on_ray(tasks, spec=SLOW, db_uri=db_uri, options=OPTIONS, show_progress=False,
                              shape=PoolShape(2, 0.75, 0), on_batch=parents)  # 0.75 + 0.75 > 1: one per node
        return {"node_ips": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]),
                "n_raylets": len(raylets), "n_in_db": [s.n_in_db for s in result.summaries]}
    finally:
        ray.shutdown()
        cluster.shutdown()  # stops only the nodes this cluster started


@pytest.mark.slow
def test_two_node_local_cluster_runs_an_actor_on_each_node(tasks_reused, reference_reused, tmp_path):
    import json
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    uri = str(tmp_path / "two_nodes.db")
    tasks = tmp_path / "tasks.pkl"
    tasks.write_bytes(pickle.dumps(tasks_reused))
    code = ("import json, pickle; from tests.test_ray_collect import two_node_build; "
            f"print(json.dumps(two_node_build({uri!r}, pickle.loads(open({str(tasks)!r}, 'rb').read()))))")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["node_ips"] == ["127.0.0.1", "127.0.0.1"]
    assert report["n_raylets"] == 2, report  # 0.75 CPU each on 1-CPU nodes: the actors ran on both nodes
    assert report["n_in_db"] == [len(TEXTS)] * 2
    assert_same_records(uri, reference_reused)
