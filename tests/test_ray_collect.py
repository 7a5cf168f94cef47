"""Distributed collection on a real local Ray cluster: same records as in process, resumable, survives a kill."""

from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest

from collectors.build import BuildOptions, build_database
from collectors.ray_collect import CollectionError, CollectorPool, ShardResult
from milvus.exit_db import ExitDB, setup_meta
from orchestration.pipelines import RayOptions
from raee.records import record_ids
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.figures import report
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, tiny_llama_models

SST2, TREC = get_task("sst2"), get_task("trec")
TEXTS = tuple(f"{a} {b}" for a, b in itertools.permutations(SENTENCES, 2))[:40]
BATCH, SHARD = 4, 8  # 5 shards per task
OPTIONS = BuildOptions(batch_size=BATCH, calibration_examples=20)


def datasets() -> dict[str, Dataset]:
    rng = np.random.default_rng(0)
    return {task.name: Dataset(task, "train", TEXTS, rng.integers(0, task.n_classes, size=len(TEXTS)))
            for task in (SST2, TREC)}


def slow_tiny_llama_models():
    """tiny_llama_models whose build-time forward sleeps 0.25 s, so a shard is still running when a test kills."""
    backbone, encoder = tiny_llama_models()
    layer_probs = backbone.layer_probs

    def slowed(*args, **kwargs):
        time.sleep(0.25)
        return layer_probs(*args, **kwargs)

    backbone.layer_probs = slowed
    return backbone, encoder


@pytest.fixture(scope="module")
def reference_reused(tmp_path_factory):
    """The in-process collector's records for both tasks: {task name: ExitRecords}, plus the summaries."""
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path_factory.mktemp("reference") / "exit.db")
    stored, summaries = {}, {}
    for name, data in datasets().items():
        task = get_task(name)
        summaries[name] = build_database(backbone, encoder, task, db_uri=uri, dataset=data, options=OPTIONS,
                                         show_progress=False)
        with ExitDB(uri, collection=summaries[name].collection, meta=setup_meta(backbone, encoder, task)) as db:
            stored[name] = (db.get(record_ids(name, "train", np.arange(len(TEXTS)))), db.calibration)
    return stored, summaries


@pytest.fixture(scope="module")
def pool_reused(ray_cluster_reused):
    """Two CPU collector actors (0.5 CPU, one torch thread each) for the whole module."""
    with CollectorPool(ModelSpec(factory=slow_tiny_llama_models), n_actors=2, cpus_per_actor=ACTOR_CPUS,
                       ready_timeout_s=120) as pool:
        yield pool


def assert_same_records(uri: str, reference) -> None:
    stored_ref, summaries_ref = reference
    backbone, encoder = tiny_llama_models()
    for name, (want, calibration) in stored_ref.items():
        task = get_task(name)
        with ExitDB(uri, collection=summaries_ref[name].collection, meta=setup_meta(backbone, encoder, task)) as db:
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


def test_two_actors_write_the_in_process_records_and_a_rerun_skips_every_shard(pool_reused, reference_reused,
                                                                               tmp_path):
    uri = str(tmp_path / "ray.db")
    first = pool_reused.build([SST2, TREC], db_uri=uri, datasets=datasets(), shard_size=SHARD, options=OPTIONS,
                              show_progress=False)
    assert (first.n_actors, first.n_shards, first.n_shards_skipped) == (2, 10, 0)
    for summary, name in zip(first.summaries, ("sst2", "trec"), strict=True):
        want = reference_reused[1][name]
        assert summary.collection == want.collection
        assert (summary.n_examples, summary.n_records, summary.n_in_db) == (len(TEXTS),) * 3
        assert summary.share_no_correct_layer == pytest.approx(want.share_no_correct_layer)
        assert summary.full_model_accuracy == pytest.approx(want.full_model_accuracy)
    assert_same_records(uri, reference_reused)

    again = pool_reused.build([SST2, TREC], db_uri=uri, datasets=datasets(), shard_size=SHARD,
                              options=OPTIONS, show_progress=False)
    assert again.n_shards_skipped == again.n_shards == 10
    assert [s.n_in_db for s in again.summaries] == [len(TEXTS)] * 2
    assert [s.full_model_accuracy for s in again.summaries] == [s.full_model_accuracy for s in first.summaries]
    assert_same_records(uri, reference_reused)


def test_an_offramp_build_on_actors_equals_the_in_process_one(pool_reused, tmp_path):
    """One actor fits the off-ramps on the sample; shards read the sample's cross-fitted rows, the rest through them."""
    from inference_workers.engine import stored_head

    backbone, encoder = tiny_llama_models()
    options = BuildOptions(head="offramp", offramp_examples=20, offramp_folds=4, batch_size=BATCH,
                           calibration_examples=12)
    data = datasets()["sst2"]
    want = build_database(backbone, encoder, SST2, db_uri=str(tmp_path / "ref.db"), dataset=data, options=options,
                          show_progress=False)
    got = pool_reused.build([SST2], db_uri=str(tmp_path / "ray.db"), datasets={"sst2": data}, shard_size=SHARD,
                            options=options, show_progress=False)
    assert got.summaries[0].n_in_db == len(TEXTS)
    ids = record_ids("sst2", "train", np.arange(len(TEXTS)))
    with ExitDB(str(tmp_path / "ref.db"), collection=want.collection, meta=None, create=False) as ref, \
         ExitDB(str(tmp_path / "ray.db"), collection=got.summaries[0].collection, meta=None, create=False) as db:
        np.testing.assert_allclose(db.get(ids).layer_probs, ref.get(ids).layer_probs, atol=1e-5)
        np.testing.assert_allclose(db.calibration.bias, ref.calibration.bias, atol=1e-5)
        states = backbone.layer_pass(list(TEXTS), SST2).states
        np.testing.assert_allclose(stored_head(db).layer_probs(states), stored_head(ref).layer_probs(states),
                                   atol=1e-5)


@pytest.mark.reliability
def test_killed_actor_is_restarted_and_nothing_is_lost_or_duplicated(pool_reused, reference_reused, tmp_path):
    uri = str(tmp_path / "ray.db")
    before = pool_reused.pids(timeout_s=60)
    seen: list[ShardResult] = []

    def kill_first_worker(result: ShardResult) -> None:  # its next shards are queued or running
        if not seen:
            os.kill(result.pid, signal.SIGKILL)
        seen.append(result)

    build = pool_reused.build([SST2, TREC], db_uri=uri, datasets=datasets(), shard_size=SHARD,
                              options=OPTIONS, show_progress=False, on_shard=kill_first_worker)
    killed = seen[0].pid
    assert sorted(str(r.shard) for r in seen) == sorted({str(r.shard) for r in seen})  # each shard stored once
    assert len(seen) == build.n_shards == 10
    assert any(r.pid not in before for r in seen), "no shard ran on a restarted actor: the kill came too late"
    after = pool_reused.pids(timeout_s=60)
    assert killed not in after and len(after) == 2
    assert [s.n_in_db for s in build.summaries] == [len(TEXTS)] * 2
    assert_same_records(uri, reference_reused)
    report(f"fault collector actor kill -9 mid-build: 1 injected, survived; {build.n_shards} shards stored once each, "
           f"{2 * len(TEXTS)} records expected, {sum(s.n_in_db for s in build.summaries)} in the database, "
           "0 lost, 0 duplicated, every record equal to the in-process build")


def test_an_unschedulable_pool_is_a_clear_error(ray_cluster_reused):
    with pytest.raises(CollectionError, match="exceed the cluster's 2 CPUs"):
        CollectorPool(ModelSpec(factory=tiny_llama_models), n_actors=8, cpus_per_actor=0.5)


@pytest.mark.milvus_server
def test_actors_write_directly_to_a_milvus_server(pool_reused, reference_reused, milvus_server_uri, request):
    try:  # the session server may run with authorization (tests/fixtures_milvus.py)
        token = request.getfixturevalue("milvus_server_token")
    except pytest.FixtureLookupError:
        token = os.environ.get("RAEE_MILVUS_TOKEN")
    backbone, encoder = tiny_llama_models()
    for name in ("sst2", "trec"):  # the server outlives tests: start from empty collections
        with ExitDB(milvus_server_uri, collection=reference_reused[1][name].collection,
                    meta=setup_meta(backbone, encoder, get_task(name)), token=token) as db:
            db.drop()
    build = pool_reused.build([SST2, TREC], db_uri=milvus_server_uri, token=token, datasets=datasets(),
                              shard_size=SHARD, options=OPTIONS, show_progress=False)
    assert [s.n_in_db for s in build.summaries] == [len(TEXTS)] * 2
    stored_ref, summaries_ref = reference_reused
    for name, (want, _) in stored_ref.items():
        with ExitDB(milvus_server_uri, collection=summaries_ref[name].collection, token=token,
                    meta=setup_meta(backbone, encoder, get_task(name)), consistency="Strong") as db:
            got = db.get(want.ids)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.exit_probs, want.exit_probs, atol=1e-5)
        np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-5)


def test_build_with_ray_entry_point_checks_and_describes_the_count(ray_cluster_reused, data_dir, tmp_path):
    from orchestration.distributed import build_with_ray, describe_build

    uri = str(tmp_path / "entry.db")
    result = build_with_ray([SST2], model=ModelSpec(factory=tiny_llama_models), db_uri=uri,
                            options=BuildOptions(fraction=0.005, batch_size=8), data_dir=str(data_dir),
                            ray_options=RayOptions(num_actors=2, shard_size=16, cpus_per_actor=ACTOR_CPUS), quiet=True)
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
    results, text = eval_with_ray([SST2, TREC], config=config, out_dir=str(tmp_path / "out"), command="test",
                                  model=ModelSpec(factory=tiny_llama_models), data_dir=str(data_dir),
                                  cpus_per_task=ACTOR_CPUS, quiet=True)
    assert [(r["task"], r["n_train"], r["n_test"]) for r in results] == [("sst2", 24, 8), ("trec", 24, 8)]
    assert all(set(r["engine_mismatches"].values()) == {0} for r in results)
    assert (tmp_path / "eval.sst2.db").exists() and (tmp_path / "eval.trec.db").exists()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["header"]["encoder"] == "backbone:tiny-llama:layer-2:mean:sentence"
    assert (tmp_path / "out" / "results.md").read_text() == text


def two_node_build(db_uri: str) -> dict:
    """In a fresh process: a 2-node local cluster (1 CPU each), a 2-actor build into db_uri; what ran where."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        with CollectorPool(ModelSpec(factory=tiny_llama_models), n_actors=2, ready_timeout_s=180) as pool:
            result = pool.build([SST2, TREC], db_uri=db_uri, datasets=datasets(), shard_size=SHARD,
                                options=OPTIONS, show_progress=False)
            locations = pool.locations(timeout_s=60)
        return {"node_ips": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]),
                "actor_nodes": sorted({node for node, _, _ in locations}),
                "actor_ips": sorted({ip for _, ip, _ in locations}),
                "n_in_db": [s.n_in_db for s in result.summaries]}
    finally:
        ray.shutdown()
        cluster.shutdown()  # stops only the nodes this cluster started


@pytest.mark.slow
def test_two_node_local_cluster_puts_one_actor_on_each_node(reference_reused, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    uri = str(tmp_path / "two_nodes.db")
    code = f"import json; from tests.test_ray_collect import two_node_build; print(json.dumps(two_node_build({uri!r})))"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["node_ips"] == ["127.0.0.1", "127.0.0.1"] and report["actor_ips"] == ["127.0.0.1"]
    assert len(report["actor_nodes"]) == 2, report  # 1 CPU per node: each node hosts one actor
    assert report["n_in_db"] == [len(TEXTS)] * 2
    assert_same_records(uri, reference_reused)
