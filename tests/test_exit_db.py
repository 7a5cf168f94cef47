"""The exit database store suite: every `exit_db` test runs on Milvus Lite and on a real Milvus server."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from milvus.exit_db import (
    TIE_TOLERANCE,
    BuildVariant,
    ExitDB,
    ExitDBError,
    ExitDBMeta,
    MetadataMismatchError,
    collection_name,
    list_exit_dbs,
)
from milvus.index import IndexConfig
from raee.records import ExitRecords, record_ids
from tests.figures import report
from tests.fixtures_milvus import TEST_META, make_exit_records

REPO_ROOT = Path(__file__).resolve().parent.parent


def _hand_made(meta: ExitDBMeta = TEST_META) -> ExitRecords:
    """Four records on the first axis / second axis, so squared distances can be worked out by hand."""
    vectors = np.zeros((4, meta.dim), dtype=np.float32)
    vectors[1, 0], vectors[2, 1], vectors[3, 0] = 1.0, 2.0, 3.0  # 0, e1, 2*e2, 3*e1
    probs = np.arange(4 * (meta.n_layers + 1), dtype=np.float32).reshape(4, -1) / 100
    return ExitRecords(ids=np.array([10, 11, 12, 13]), vectors=vectors, exit_probs=probs,
                       labels=np.array([0, 1, 0, 1]), texts=("zero", "one", "two", "three"))


def _query(x0: float, x1: float = 0.0, dim: int = TEST_META.dim) -> np.ndarray:
    q = np.zeros((1, dim), dtype=np.float32)
    q[0, 0], q[0, 1] = x0, x1
    return q


# ---- store suite (Lite and server) ----------------------------------------------------------------------


def test_upsert_is_idempotent(exit_db: ExitDB) -> None:
    ids = record_ids("sst-2", "train", np.arange(50))
    assert exit_db.upsert(make_exit_records(ids)) == 50
    assert exit_db.count() == 50
    exit_db.upsert(make_exit_records(ids))  # a repeated build
    assert exit_db.count() == 50
    exit_db.upsert(make_exit_records(record_ids("sst-2", "train", np.arange(25, 75))))  # a retried shard
    assert exit_db.count() == 75


def test_search_returns_nearest_ids_and_squared_l2(exit_db: ExitDB) -> None:
    exit_db.upsert(_hand_made())
    nb = exit_db.search(np.concatenate([_query(0.9), _query(0.0, 1.9)]), k=4)
    # query 0.9*e1: to e1 0.01, to 0 0.81, to 3*e1 4.41, to 2*e2 0.81+4 = 4.81 (squared Euclidean)
    np.testing.assert_array_equal(nb.ids[0], [11, 10, 13, 12])
    np.testing.assert_allclose(nb.distances[0], [0.01, 0.81, 4.41, 4.81], rtol=1e-4)
    # query 1.9*e2: to 2*e2 0.01, to 0 3.61, to e1 1+3.61 = 4.61, to 3*e1 9+3.61 = 12.61
    np.testing.assert_array_equal(nb.ids[1], [12, 10, 11, 13])
    np.testing.assert_allclose(nb.distances[1], [0.01, 3.61, 4.61, 12.61], rtol=1e-4)
    records = _hand_made()
    np.testing.assert_allclose(nb.exit_probs[0, 0], records.exit_probs[1])
    np.testing.assert_array_equal(nb.labels[0], [1, 0, 1, 0])
    assert nb.texts is None


def test_search_pads_when_fewer_than_k(exit_db: ExitDB) -> None:
    exit_db.upsert(_hand_made())
    nb = exit_db.search(_query(0.0), k=6, with_texts=True)
    assert nb.ids.shape == (1, 6) and nb.exit_probs.shape == (1, 6, TEST_META.n_layers + 1)
    assert nb.valid.sum() == 4
    np.testing.assert_array_equal(nb.ids[0, 4:], [-1, -1])
    assert np.isinf(nb.distances[0, 4:]).all() and np.isfinite(nb.distances[0, :4]).all()
    np.testing.assert_array_equal(nb.labels[0, 4:], [-1, -1])
    assert not nb.exit_probs[0, 4:].any()
    assert nb.texts is not None and nb.texts[0][:2] == ("zero", "one") and nb.texts[0][4:] == ("", "")


def test_search_is_one_round_trip_for_a_batch(exit_db: ExitDB, monkeypatch: pytest.MonkeyPatch) -> None:
    exit_db.upsert(make_exit_records(np.arange(100)))
    calls = []
    real_search = exit_db._client.search
    monkeypatch.setattr(exit_db._client, "search", lambda *a, **kw: calls.append(kw) or real_search(*a, **kw))
    queries = make_exit_records(np.arange(32)).vectors
    nb = exit_db.search(queries, k=12)
    assert len(calls) == 1
    np.testing.assert_array_equal(nb.ids[:, 0], np.arange(32))  # each record is its own nearest neighbour
    np.testing.assert_allclose(nb.distances[:, 0], 0.0, atol=1e-5)
    assert (np.diff(nb.distances, axis=1) >= -1e-6).all()


def test_ties_at_the_kth_place_go_to_the_smallest_ids_whatever_the_batch(exit_db: ExitDB) -> None:
    """20 exact duplicates (a one-word phrase repeated in a training split) tie for a top 12: Milvus returns
    tied records in no defined order, so the engine (one query) and an evaluation (one batch) could disagree."""
    records = make_exit_records(np.arange(80))
    vectors = records.vectors.copy()
    dup_ids = np.arange(5, 65, 3)  # 20 ids, not the first ones
    vectors[dup_ids] = vectors[0] + 0.5
    vectors[dup_ids[0], 3] += 3e-4  # a duplicate whose key differs by float noise: distance 9e-8, still a tie
    exit_db.upsert(ExitRecords(ids=records.ids, vectors=vectors, exit_probs=records.exit_probs,
                               labels=records.labels, texts=records.texts))
    others = make_exit_records(np.arange(100, 131)).vectors
    batch = exit_db.search(np.concatenate([others, vectors[dup_ids[1:2]]]), k=12)
    alone = exit_db.search(vectors[dup_ids[1:2]], k=12)
    np.testing.assert_array_equal(alone.ids[0], np.sort(dup_ids)[:12])  # the tie goes to the smallest ids
    np.testing.assert_array_equal(batch.ids[-1], alone.ids[0])
    np.testing.assert_allclose(alone.distances[0], 0.0, atol=TIE_TOLERANCE)
    np.testing.assert_array_equal(exit_db.search(others[:1], k=12).ids[0], batch.ids[0])


def test_search_on_empty_batch_and_empty_collection(exit_db: ExitDB) -> None:
    nb = exit_db.search(np.zeros((0, TEST_META.dim), dtype=np.float32), k=3)
    assert nb.ids.shape == (0, 3) and nb.exit_probs.shape == (0, 3, TEST_META.n_layers + 1)
    nb = exit_db.search(_query(1.0), k=3)
    assert (nb.ids == -1).all() and np.isinf(nb.distances).all()
    assert exit_db.upsert(make_exit_records(np.arange(0))) == 0


def test_wrong_dimension_is_a_clear_error(exit_db: ExitDB) -> None:
    with pytest.raises(ValueError, match=r"dim 5 but collection .* holds dim 8"):
        exit_db.search(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 8\) numpy array"):
        exit_db.search(np.zeros(8, dtype=np.float32))
    bad = dataclasses.replace(make_exit_records(np.arange(3)), vectors=np.zeros((3, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="dim 7 but collection"):
        exit_db.upsert(bad)
    bad = dataclasses.replace(make_exit_records(np.arange(3)), exit_probs=np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 4\) for 3 layers"):
        exit_db.upsert(bad)
    assert exit_db.count() == 0


def test_get_round_trips_records(exit_db: ExitDB) -> None:
    records = make_exit_records(np.arange(20))
    exit_db.upsert(records)
    got = exit_db.get(np.array([7, 3, 999, 12]))  # 999 is not stored and is left out
    np.testing.assert_array_equal(got.ids, [7, 3, 12])
    np.testing.assert_allclose(got.exit_probs, records.exit_probs[[7, 3, 12]])
    np.testing.assert_allclose(got.vectors, records.vectors[[7, 3, 12]])
    np.testing.assert_array_equal(got.labels, records.labels[[7, 3, 12]])
    assert got.texts == ("text 7", "text 3", "text 12")


def test_layer_distributions_round_trip_in_search_and_get(exit_db: ExitDB) -> None:
    records = make_exit_records(np.arange(6))
    dists = np.random.default_rng(0).dirichlet(np.ones(2), size=(6, TEST_META.n_layers + 1)).astype(np.float32)
    exit_db.upsert(dataclasses.replace(records, layer_probs=dists))
    found = exit_db.search(records.vectors[:2], k=8)  # 6 hits and 2 padding slots per query
    assert found.layer_probs.shape == (2, 8, TEST_META.n_layers + 1, 2)
    np.testing.assert_allclose(found.layer_probs[0, 0], dists[found.ids[0, 0]], atol=1e-6)
    assert (found.layer_probs[~found.valid] == 0).all()
    np.testing.assert_allclose(exit_db.get(np.array([4, 1])).layer_probs, dists[[4, 1]], atol=1e-6)
    with pytest.raises(ValueError, match=r"layer_probs must be \(N, L\+1, C\)"):
        exit_db.upsert(dataclasses.replace(records, layer_probs=dists[:, :2]))


def test_a_collection_keeps_its_calibration_and_build_variant(exit_db_uri: str, exit_db_collection: str,
                                                              exit_db_token: str | None) -> None:
    from raee.calibration import fit_calibration

    cal = fit_calibration(np.random.default_rng(1).dirichlet(np.ones(2), size=(5, TEST_META.n_layers + 1)))
    variant = BuildVariant(fraction=0.25, seed=3, only_correct=True)
    assert collection_name(TEST_META, variant) != collection_name(TEST_META)
    name = exit_db_collection + "_cal"
    with pytest.raises(ValueError, match=r"calibration is \(4, 3\)"):
        ExitDB(exit_db_uri, collection=name, meta=TEST_META, token=exit_db_token,
               calibration=fit_calibration(np.full((2, 4, 3), 1 / 3)))
    with ExitDB(exit_db_uri, collection=name, meta=TEST_META, variant=variant, token=exit_db_token, calibration=cal):
        pass
    with ExitDB(exit_db_uri, collection=name, meta=None, create=False, token=exit_db_token) as again:
        try:
            np.testing.assert_allclose(again.calibration.bias, cal.bias)
            assert again.calibration.n_examples == 5
            assert again.variant == variant and again.meta == TEST_META  # adopted as stored
            with pytest.raises(ExitDBError, match=r"holds the build 'fraction 0.25 \(seed 3\), only-correct'"):
                ExitDB(exit_db_uri, collection=name, meta=TEST_META, variant=BuildVariant(), token=exit_db_token)
            listed = {b.collection: b for b in list_exit_dbs(exit_db_uri, token=exit_db_token)}
            assert listed[name].variant == variant and listed[name].calibrated and listed[name].meta == TEST_META
        finally:
            again.drop()
    with pytest.raises(ExitDBError, match="no such collection"):
        ExitDB(exit_db_uri, collection=name, meta=TEST_META, create=False, token=exit_db_token)


def test_blobs_round_trip_beside_the_records(exit_db: ExitDB) -> None:
    """A trained head's weights (hundreds of KB) stored in chunks beside the collection, replaced, dropped with it."""
    data = np.random.default_rng(0).bytes(150_000)
    assert exit_db.get_blob("head") is None
    exit_db.put_blob("head", data)
    assert exit_db.get_blob("head") == data
    exit_db.put_blob("head", b"short")  # replacing leaves no chunk of the longer blob behind
    assert exit_db.get_blob("head") == b"short"
    assert exit_db.get_blob("other") is None


def test_metadata_mismatch_names_both_values(exit_db: ExitDB, exit_db_uri: str,
                                             exit_db_token: str | None) -> None:
    other = dataclasses.replace(TEST_META, backbone="smollm2-135m", n_layers=30)
    with pytest.raises(MetadataMismatchError) as info:
        ExitDB(exit_db_uri, collection=exit_db.collection, meta=other, token=exit_db_token)
    message = str(info.value)
    assert "backbone: stored 'tiny-llama' != given 'smollm2-135m'" in message
    assert "n_layers: stored 3 != given 30" in message and exit_db.collection in message
    with ExitDB(exit_db_uri, collection=exit_db.collection, meta=TEST_META, token=exit_db_token) as same:
        assert same.count() == 0  # the same setup opens fine


def test_text_is_capped_at_a_character_boundary(exit_db_uri: str, exit_db_collection: str,
                                                exit_db_token: str | None) -> None:
    long = "é" * 20 + "tail"  # 2 bytes per é
    records = dataclasses.replace(make_exit_records(np.arange(2)), texts=("short", long))
    with ExitDB(exit_db_uri, collection=exit_db_collection, meta=TEST_META, token=exit_db_token,
                text_max_bytes=15) as db:
        try:
            db.upsert(records)
            assert db.get(np.arange(2)).texts == ("short", "é" * 7)  # 14 bytes: the 8th é would not fit
        finally:
            db.drop()


def test_cosine_similarity_becomes_distance(exit_db_uri: str, exit_db_collection: str,
                                            exit_db_token: str | None) -> None:
    meta = dataclasses.replace(TEST_META, metric="COSINE")
    with ExitDB(exit_db_uri, collection=exit_db_collection, meta=meta, token=exit_db_token) as db:
        try:
            records = _hand_made(meta)
            vectors = records.vectors.copy()
            vectors[0, 0], vectors[0, 1] = 1.0, 1.0  # record 10 at 45 degrees, cos = 1/sqrt(2)
            db.upsert(dataclasses.replace(records, vectors=vectors))
            nb = db.search(_query(2.0), k=4)
            np.testing.assert_array_equal(nb.ids[0, :3], [11, 13, 10])
            np.testing.assert_allclose(nb.distances[0], [0.0, 0.0, 1 - 2**-0.5, 1.0], atol=1e-5)
        finally:
            db.drop()


def test_hnsw_index_applies_ef_and_reopens(exit_db_uri: str, exit_db_collection: str,
                                           exit_db_token: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    index = IndexConfig(kind="HNSW", m=8, ef_construction=64, ef=8)
    with ExitDB(exit_db_uri, collection=exit_db_collection, meta=TEST_META, token=exit_db_token,
                index=index) as db:
        db.upsert(make_exit_records(np.arange(300)))
        db.flush(timeout_s=60)
        assert db.index_state()["kind"] == "HNSW"
        calls = []
        real_search = db._client.search
        monkeypatch.setattr(db._client, "search", lambda *a, **kw: calls.append(kw) or real_search(*a, **kw))
        nb = db.search(make_exit_records(np.arange(5)).vectors, k=12)
        assert calls[0]["search_params"]["params"] == {"ef": 13}  # ef raised to k + 1 (the hit that shows ties)
        np.testing.assert_array_equal(nb.ids[:, 0], np.arange(5))
    with ExitDB(exit_db_uri, collection=exit_db_collection, meta=TEST_META, token=exit_db_token) as db:
        assert db.index.kind == "HNSW" and db.index.m == 8  # index=None adopts what was built
        assert db.count() == 300
        with pytest.raises(ExitDBError, match="built with a HNSW index, opened with FLAT"):
            ExitDB(exit_db_uri, collection=exit_db_collection, meta=TEST_META, token=exit_db_token,
                   index=IndexConfig())
        db.drop()


def test_lite_flat_search_splits_big_batches_to_bound_memory(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import milvus.exit_db

    with ExitDB(str(tmp_path / "raee.db"), collection="chunked", meta=TEST_META) as db:
        db.upsert(make_exit_records(np.arange(100)))
        queries = make_exit_records(np.arange(30)).vectors
        whole = db.search(queries, k=5)
        monkeypatch.setattr(milvus.exit_db, "_LITE_SEARCH_BYTES", 100 * TEST_META.dim * 4 * 8)  # 8 queries
        calls = []
        real_search = db._client.search
        monkeypatch.setattr(db._client, "search", lambda *a, **kw: calls.append(kw) or real_search(*a, **kw))
        split = db.search(queries, k=5)
        assert [len(c["data"]) for c in calls] == [8, 8, 8, 6]
        np.testing.assert_array_equal(split.ids, whole.ids)
        np.testing.assert_allclose(split.distances, whole.distances)


# ---- backend-independent checks -------------------------------------------------------------------------


def test_unbuilt_index_kinds_are_refused() -> None:
    for kind in ("IVF_PQ", "DISKANN", "SCANN", "HNSW_SQ"):
        with pytest.raises(ValueError, match="not supported"):
            IndexConfig(kind=kind)  # type: ignore[arg-type]


def test_meta_validation_and_collection_name() -> None:
    with pytest.raises(ValueError, match="metric must be one of"):
        dataclasses.replace(TEST_META, metric="HAMMING")
    assert collection_name(dataclasses.replace(TEST_META, task="sst-2")).startswith("raee_sst_2_")
    name = collection_name(TEST_META)
    assert name == collection_name(dataclasses.replace(TEST_META))  # stable
    assert collection_name(dataclasses.replace(TEST_META, task_digest="t1")) != name
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        BuildVariant(fraction=0.0)


# ---- processes: Lite ownership, kill -9, several writers on a server ------------------------------------


def _worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.exit_db_worker", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_lite_second_process_gets_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    uri = str(tmp_path / "raee.db")
    db = ExitDB(uri, collection="owned", meta=TEST_META)
    try:
        db.upsert(make_exit_records(np.arange(10)))
        proc = _worker("write", uri, "owned", "0", "10")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "owned by another process" in err and "Milvus Lite allows one process" in err
    finally:
        db.close()
    proc = _worker("write", uri, "owned", "10", "20")  # close() released the lock
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with ExitDB(uri, collection="owned", meta=TEST_META) as db:
        assert db.count() == 20


@pytest.mark.reliability
def test_lite_writer_killed_mid_build_then_rerun_is_exact(tmp_path: Path) -> None:
    uri, n = str(tmp_path / "raee.db"), 3000
    proc = _worker("write", uri, "crash", "0", str(n), "--batch", "100", "--sleep-s", "0.02")
    acked = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("ok "):
            acked = int(line.split()[1])
            if acked >= 500:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 0 < acked < n
    with ExitDB(uri, collection="crash", meta=TEST_META) as db:
        assert acked <= db.count() <= n  # nothing acknowledged is lost
        db.upsert(make_exit_records(np.arange(n)))  # the re-run
        assert db.count() == n
        got = db.get(np.arange(n))
        np.testing.assert_array_equal(got.ids, np.arange(n))  # each id once, none missing
        np.testing.assert_allclose(got.exit_probs, make_exit_records(np.arange(n)).exit_probs)
        survived = db.count()
    report(f"fault database writer kill -9 mid-build: 1 injected, {acked} records acknowledged before the kill, "
           f"re-run -> {survived} of {n} in the database, each id once: 0 lost, 0 duplicated")


@pytest.mark.milvus_server
def test_server_two_writers_and_a_reader_at_once(milvus_server_uri: str, milvus_server_token: str | None) -> None:
    collection, token = "concurrent_writers", ["--token", milvus_server_token] if milvus_server_token else []
    with ExitDB(milvus_server_uri, collection=collection, meta=TEST_META, token=milvus_server_token) as db:
        db.upsert(make_exit_records(np.arange(4)))  # created before the race
        procs = [
            _worker("write", milvus_server_uri, collection, "0", "1200", "--batch", "100", *token),
            _worker("write", milvus_server_uri, collection, "800", "2000", "--batch", "100", *token),  # overlap
            _worker("read", milvus_server_uri, collection, "--seconds", "3", *token),
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-2000:]
            assert out.strip().endswith("done")
        assert any(line.startswith("read 20") for line in outs[2][0].splitlines())  # 4 queries x k=5
        assert db.count() == 2000
        got = db.get(np.arange(2000))
        np.testing.assert_array_equal(got.ids, np.arange(2000))
        db.drop()


@pytest.mark.milvus_server
def test_server_refuses_a_wrong_token(milvus_server_uri: str, milvus_server_token: str | None) -> None:
    if milvus_server_token is None:
        pytest.skip("the server under test has no authorization")
    with pytest.raises(ExitDBError, match=r"exit db open on collection 'auth' failed"):
        ExitDB(milvus_server_uri, collection="auth", meta=TEST_META, token="root:wrong-password")
