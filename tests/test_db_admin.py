"""Versioned builds behind an alias, added-example ids, admin listing and drop, export/import and `raee db`.

Version tests run on Milvus Lite and on the embedded 2.3.5 server with authentication (`exit_db_backend`);
both support aliases. Export -> import goes Lite -> server -> Lite with a real tiny-model build and compares
records and engine answers.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from collectors.build import BuildOptions, build_database
from inference_workers.engine import BatchEngine, stored_head
from milvus.added import added_ids, carry_added, is_added, stored_ids
from milvus.admin import describe_build, drop_build, list_collections
from milvus.exit_db import BuildVariant, ExitDB, ExitDBError, list_exit_dbs, split_uri
from milvus.transfer import TransferError, export_build, import_build
from milvus.versions import VersionError, activate, begin_version, finish_version, list_versions, rollback
from raee.exit_policy import ExitPolicy
from raee.records import record_ids
from raee.tasks import Dataset, get_task
from tests.fixtures_milvus import TEST_META, make_exit_records
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import tiny_llama_models

SST2 = get_task("sst2")


def _build(uri: str, name: str, ids: np.ndarray, digest: str, *, token: str | None = None, carry: bool = True,
           shift: float = 0.0) -> tuple[str, object]:
    """A versioned build of TEST_META records by hand: (the collection written, the switch or None)."""
    target = begin_version(uri, name, TEST_META, BuildVariant(), data_digest=digest, token=token)
    records = make_exit_records(ids)
    records = dataclasses.replace(records, vectors=records.vectors + np.float32(shift))
    with ExitDB(uri, collection=target.collection, meta=TEST_META, token=token, properties=target.properties) as db:
        n = db.upsert(records)
        if carry:
            n += carry_added(uri, target.active, db, token=token)
        db.flush()
        counted = db.count()
    return target.collection, finish_version(uri, target, expected=n, counted=counted, token=token)


@pytest.fixture
def build_name(exit_db_backend: str, exit_db_uri: str, exit_db_token: str | None,
               request: pytest.FixtureRequest) -> Iterator[str]:
    """A build name unique to the test; the build (alias, versions, blobs) is dropped afterwards."""
    name = f"v_{request.node.name.split('[')[0][-40:]}"
    for leftover in (name, f"{name}_copy"):
        try:
            drop_build(exit_db_uri, leftover, token=exit_db_token)
        except ExitDBError:
            pass
    yield name
    for leftover in (name, f"{name}_copy"):
        try:
            drop_build(exit_db_uri, leftover, token=exit_db_token)
        except ExitDBError:
            pass


def test_a_rebuild_is_switched_in_atomically_and_rolled_back(exit_db_uri, exit_db_token, build_name):
    uri, token, name = exit_db_uri, exit_db_token, build_name
    first, switch = _build(uri, name, np.arange(10), "data-1", token=token)
    assert first == f"{name}_v1" and (switch.before, switch.after) == (None, first)
    again, _ = _build(uri, name, np.arange(10), "data-1", token=token)
    assert again == first  # same setup, variant and data: the re-run rewrites its version (idempotent)
    second, switch = _build(uri, name, np.arange(20, 35), "data-2", token=token, shift=5.0)
    assert second == f"{name}_v2" and (switch.before, switch.after) == (first, second)

    listed = [b for b in list_exit_dbs(uri, token=token) if b.collection == name]
    assert len(listed) == 1, "a versioned build is one choice, under its alias"
    assert listed[0].version == second and listed[0].versions == (first, second)
    assert not any(b.collection in (first, second) for b in list_exit_dbs(uri, token=token))
    query = make_exit_records(np.array([22])).vectors + np.float32(5.0)
    with ExitDB(uri, collection=name, meta=None, create=False, token=token) as db:
        assert (db.alias, db.collection, db.count()) == (name, second, 15)
        assert db.search(query, k=1).ids[0, 0] == 22

    assert (rollback(uri, name, token=token).after, rollback.__name__) == (first, "rollback")
    with ExitDB(uri, collection=name, meta=None, create=False, token=token) as db:
        assert (db.collection, db.count()) == (first, 10)
    with pytest.raises(VersionError, match="first version switched in"):
        rollback(uri, name, token=token)
    assert activate(uri, name, 2, token=token).after == second
    assert activate(uri, name, first, token=token).after == first  # by collection name too
    assert rollback(uri, name, token=token).after == second  # back to where the last switch came from
    with pytest.raises(VersionError, match=r"no version 7; versions: 1 \(.*_v1\), 2 \(.*_v2, active\)"):
        activate(uri, name, 7, token=token)

    infos = {c.collection: c for c in list_collections(uri, token=token) if c.name == name}
    assert [(infos[c].version, infos[c].active, infos[c].complete) for c in (first, second)] == [(1, False, True),
                                                                                                (2, True, True)]
    assert describe_build(uri, name, token=token)["previous"] == first


def test_a_wrong_count_or_an_unfinished_build_is_never_switched_in(exit_db_uri, exit_db_token, build_name):
    uri, token, name = exit_db_uri, exit_db_token, build_name
    first, _ = _build(uri, name, np.arange(10), "data-1", token=token)
    target = begin_version(uri, name, TEST_META, BuildVariant(), data_digest="data-2", token=token)
    with ExitDB(uri, collection=target.collection, meta=TEST_META, token=token, properties=target.properties) as db:
        db.upsert(make_exit_records(np.arange(5)))  # a build that died half-way: 5 of its 12 records
    with pytest.raises(VersionError, match=rf"holds 5 records but the build wrote 12; the alias still points at "
                                           rf"{first}"):
        finish_version(uri, target, expected=12, counted=5, token=token)
    with pytest.raises(VersionError, match="incomplete"):
        activate(uri, name, 2, token=token)
    assert [(v.number, v.active, v.complete) for v in list_versions(uri, name, token=token)] == [(1, True, 10),
                                                                                                (2, False, None)]
    resumed, switch = _build(uri, name, np.arange(12), "data-2", token=token)
    assert resumed == target.collection and switch.after == resumed  # the re-run resumes the unfinished version

    with pytest.raises(VersionError, match="the one queries read"):
        drop_build(uri, name, version=2, token=token)
    assert drop_build(uri, name, version=1, token=token) == [first]
    with ExitDB(uri, collection=name, meta=None, create=False, token=token) as db:
        assert db.count() == 12
    assert drop_build(uri, name, token=token) == [resumed]
    assert not [c for c in list_collections(uri, token=token) if c.name == name]
    with pytest.raises(ExitDBError, match="no such collection"):
        ExitDB(uri, collection=name, meta=None, create=False, token=token)


def test_added_examples_have_content_ids_outside_the_row_ids_and_survive_a_rebuild(exit_db_uri, exit_db_token,
                                                                                    build_name):
    ids = added_ids("sst2", ["a fine film", "a fine film", "a dull film"], None, ["1", "1", "1"])
    assert ids[0] == ids[1] != ids[2] and (ids >= 0).all()
    assert ids[0] == added_ids("sst2", ["a fine film"], None, ["1"])[0]  # stable across calls and processes
    assert len({*added_ids("sst2", ["x"], None, ["0"]), *added_ids("sst2", ["x"], None, ["1"]),
                *added_ids("sst2", ["x"], ["y"], ["1"]), *added_ids("mr", ["x"], None, ["1"])}) == 4
    rows = np.concatenate([record_ids(task, split, np.array([0, 1, 2**28 - 1]))
                           for task, split in itertools.product(["sst2", "mr", "x" * 50], ["train", "test", "dev"])])
    many = added_ids("sst2", [f"text {i}" for i in range(2000)], None, ["1"] * 2000)
    assert is_added(many).all() and not is_added(rows).any() and not set(many) & set(rows)
    assert len(set(many.tolist())) == 2000

    uri, token, name = exit_db_uri, exit_db_token, build_name
    first, _ = _build(uri, name, np.arange(10), "data-1", token=token)
    with ExitDB(uri, collection=name, meta=None, create=False, token=token) as db:
        db.upsert(dataclasses.replace(make_exit_records(np.arange(2)), ids=many[:2]))
    second, _ = _build(uri, name, np.arange(30, 40), "data-2", token=token)
    assert second != first
    with ExitDB(uri, collection=name, meta=None, create=False, token=token) as db:
        assert db.count() == 12 and len(db.get(many[:2])) == 2  # carried into the new version, unchanged
    assert is_added(stored_ids(uri, second, token=token)).sum() == 2


def test_split_uri_names_a_database_only_on_a_server():
    assert split_uri("http://127.0.0.1:19530") == ("http://127.0.0.1:19530", None)
    assert split_uri("http://127.0.0.1:19530/team_a") == ("http://127.0.0.1:19530", "team_a")
    assert split_uri("https://milvus.example.org:443/team_b/") == ("https://milvus.example.org:443", "team_b")
    assert split_uri("./raee.db") == ("./raee.db", None)
    for bad in ("http://127.0.0.1:19530/team-a", "http://h:1/a/b", "ftp://x", "./raee.db/team_a"):
        with pytest.raises(ValueError, match=r"database name|Milvus server URI|one Lite file per team"):
            split_uri(bad)


# ---- export / import ---------------------------------------------------------------------------------------


def _answers(uri: str, name: str, token: str | None = None):
    backbone, encoder = tiny_llama_models()
    with ExitDB(uri, collection=name, meta=None, create=False, token=token) as db:
        engine = BatchEngine.single(backbone, encoder, SST2, db, ExitPolicy(tau=0.6, k=5), name="raee",
                                    head=stored_head(db))
        answers = engine.classify(SENTENCES, SST2, explain=True)
        records = db.get(stored_ids(uri, db.collection, token=token))
        return answers, records, db.calibration, db.get_blob("head")


@pytest.mark.milvus_server
def test_export_import_lite_to_server_and_back_gives_identical_records_and_answers(
        tmp_path, milvus_server_uri, milvus_server_token):
    backbone, encoder = tiny_llama_models()
    texts = tuple(f"{a} {b}" for a, b in itertools.permutations(SENTENCES[:6], 2))  # 30 texts
    data = Dataset(SST2, "train", texts, np.random.default_rng(0).integers(0, 2, size=len(texts)))
    lite = str(tmp_path / "source.db")
    options = BuildOptions(head="offramp", offramp_examples=20, offramp_folds=4, calibration_examples=10,
                           batch_size=16, collection="roundtrip")
    build_database(backbone, encoder, SST2, db_uri=lite, dataset=data, options=options, show_progress=False)
    server, token = milvus_server_uri, milvus_server_token
    for leftover in ("roundtrip", "roundtrip_other"):
        try:
            drop_build(server, leftover, token=token)
        except ExitDBError:
            pass
    want, want_records, want_calibration, want_head = _answers(lite, "roundtrip")
    assert want_head is not None and len(want_records) == 30

    exported = export_build(lite, "roundtrip", tmp_path / "a.parquet")
    assert (exported.name, exported.collection, exported.n_records) == ("roundtrip", "roundtrip_v1", 30)
    imported = import_build(tmp_path / "a.parquet", server, token=token)
    assert (imported.collection, imported.switched) == ("roundtrip_v1", True)
    again = import_build(tmp_path / "a.parquet", server, token=token)
    assert again.collection == "roundtrip_v1"  # the same file again: the same version, nothing doubled
    export_build(server, "roundtrip", tmp_path / "b.parquet", token=token)
    back = str(tmp_path / "back.db")
    import_build(tmp_path / "b.parquet", back)
    try:
        for uri, tok in ((server, token), (back, None)):
            got, records, calibration, head = _answers(uri, "roundtrip", tok)
            np.testing.assert_array_equal(records.ids, want_records.ids)
            np.testing.assert_array_equal(records.vectors, want_records.vectors)
            np.testing.assert_array_equal(records.exit_probs, want_records.exit_probs)
            np.testing.assert_array_equal(records.layer_probs, want_records.layer_probs)
            np.testing.assert_array_equal(records.labels, want_records.labels)
            assert records.texts == want_records.texts and head == want_head
            np.testing.assert_array_equal(calibration.bias, want_calibration.bias)
            assert [(a.label, a.exit_layer, a.probs) for a in got] == [(a.label, a.exit_layer, a.probs) for a in want]
            assert [[n.id for n in a.neighbours] for a in got] == [[n.id for n in a.neighbours] for a in want]
        other = dataclasses.replace(data, labels=1 - data.labels)
        build_database(backbone, encoder, SST2, db_uri=lite, dataset=other, show_progress=False,
                       options=BuildOptions(batch_size=16, collection="roundtrip_other", only_correct=True))
        export_build(lite, "roundtrip_other", tmp_path / "c.parquet")
        with pytest.raises(TransferError, match=r"holds a build of that name .* differs from the file's; import under "
                                                r"another name with --name NEW"):
            import_build(tmp_path / "c.parquet", server, name="roundtrip", token=token)
        assert import_build(tmp_path / "c.parquet", server, token=token).collection == "roundtrip_other_v1"
    finally:
        for leftover in ("roundtrip", "roundtrip_other"):
            drop_build(server, leftover, token=token)


# ---- the command line --------------------------------------------------------------------------------------


def raee(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, check=False, env={**os.environ, "RAEE_DEBUG": ""})


def test_raee_db_lists_switches_drops_and_explains_mistakes_in_one_line(tmp_path):
    helped = raee("db", "--help").stdout
    for verb in ("list", "describe", "activate", "rollback", "drop", "export", "import"):
        assert f"│ {verb} " in helped, verb
    uri = str(tmp_path / "cli.db")
    _build(uri, "cli_build", np.arange(10), "data-1")
    _build(uri, "cli_build", np.arange(12), "data-2")

    listed = raee("db", "list", "--db", uri)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert rows == [  # collection, alias, version (* = active), task, backbone, encoder, L, rows, index, calibrated
        ["cli_build_v1", "cli_build", "1", "sst2", "tiny-llama", "test-enc", "3", "10", "FLAT", "no"],
        ["cli_build_v2", "cli_build", "2*", "sst2", "tiny-llama", "test-enc", "3", "12", "FLAT", "no"]]
    assert raee("db", "rollback", "cli_build", "--db", uri).stdout.strip() == "cli_build: cli_build_v2 -> cli_build_v1"
    out = raee("db", "activate", "cli_build", "9", "--db", uri)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: exit db activate on collection 'cli_build' failed: no version 9; versions: ")

    refused = raee("db", "drop", "cli_build", "--db", uri, stdin="n\n")
    assert refused.returncode == 1 and "nothing dropped" in refused.stderr
    dropped = raee("db", "drop", "cli_build", "--version", "2", "--yes", "--db", uri)
    assert dropped.stdout.strip() == "dropped cli_build_v2", dropped.stderr
    assert "cli_build_v2" not in raee("db", "list", "--db", uri, "--json").stdout
    missing = raee("db", "describe", "cli_build", "--db", str(tmp_path / "nope.db"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: no exit database at ")
