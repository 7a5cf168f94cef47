"""Scale pieces that need no cluster: the streamed split equals the loaded one, paged id scans, index choice."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from collectors.build import BuildOptions, build_database, build_rows, data_digest
from collectors.stream import SplitSource, scan_split
from milvus.exit_db import BuildVariant, ExitDB
from milvus.index import FLAT_MAX_RECORDS, TUNED, IndexConfig, choose_index
from raee.records import record_ids
from raee.tasks import get_task, load_split
from tests.fixtures_milvus import TEST_META, make_exit_records
from tests.fixtures_ray import task_on_disk, tiny_llama_models


@pytest.fixture
def task_file(tmp_path):
    """sst2 reading 300 seeded texts from a jsonl file, two of them empty (skipped, positions kept)."""
    rng = np.random.default_rng(1)
    texts = [f"text {i} {'good' if i % 3 else 'bad'}" for i in range(300)]
    texts[5] = texts[77] = "  "
    return task_on_disk(get_task("sst2"), texts, rng.integers(0, 2, size=300), tmp_path)


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_the_streamed_split_is_the_loaded_one(task_file, fraction):
    """Count, digest and sample from two streaming passes equal what the in-process build takes from load_split."""
    variant = BuildVariant(fraction=fraction, seed=3)
    data = load_split(task_file, "train")
    ordered = data.take(build_rows(data, variant))
    scan = scan_split(task_file, variant, n_sample=50, data_dir=None, block_rows=64)
    assert (scan.n_split, scan.n_examples) == (298, len(ordered))
    assert scan.digest == data_digest(ordered)
    assert scan.sample.texts == ordered.texts[:50]
    np.testing.assert_array_equal(scan.sample.example_idx, ordered.example_idx[:50])
    np.testing.assert_array_equal(scan.sample.labels, ordered.labels[:50])


def test_the_source_leaves_out_rows_outside_the_subset_and_rows_already_stored(task_file):
    data = load_split(task_file, "train")
    subset = np.sort(np.random.default_rng(0).permutation(len(data))[:120])  # split positions
    stored = record_ids("sst2", "train", data.example_idx[subset[::2]])  # half of them were written before
    source = SplitSource(task_file, data_dir=None, subset=subset, stored=np.sort(stored), block_rows=64)
    table = pa.concat_tables(list(source._blocks()))
    np.testing.assert_array_equal(table["pos"].to_numpy(), subset[1::2])
    np.testing.assert_array_equal(table["example_idx"].to_numpy(), data.example_idx[subset[1::2]])
    assert table["text"].to_pylist() == [data.texts[i] for i in subset[1::2]]


def test_scan_pages_through_every_stored_id_and_exit_set(tmp_path):
    ids = np.arange(0, 2500, 1, dtype=np.int64) * 7
    with ExitDB(str(tmp_path / "scan.db"), collection="scan", meta=TEST_META) as db:
        db.upsert(make_exit_records(ids))
        pages = list(db.scan(batch_rows=1000))
    assert len(pages) >= 3  # paged, not one request per id
    got = np.concatenate([p for p, _ in pages])
    order = np.argsort(got)
    np.testing.assert_array_equal(got[order], ids)
    np.testing.assert_allclose(np.concatenate([e for _, e in pages])[order], make_exit_records(ids).exit_probs)


def test_auto_is_flat_while_small_and_hnsw_above(tmp_path):
    assert choose_index("auto", FLAT_MAX_RECORDS).kind == "FLAT"
    assert choose_index("auto", FLAT_MAX_RECORDS + 1) == TUNED["hnsw"]
    assert choose_index("ivf_flat", 10) == TUNED["ivf_flat"] and choose_index("flat", 10**7).kind == "FLAT"
    given = IndexConfig(kind="HNSW", ef=300)
    assert choose_index(given, 5) is given and choose_index(None, 5) is None
    with pytest.raises(ValueError, match="index must be one of"):
        choose_index("ivf_pq", 5)
    assert TUNED["hnsw"].describe() == "HNSW (M=16, efConstruction=128; ef=256)"


def test_a_build_says_which_index_it_chose_and_records_its_parameters(tmp_path, data_dir):
    backbone, encoder = tiny_llama_models()
    data = load_split(get_task("sst2"), "train", data_dir).head(24)
    uri = str(tmp_path / "index.db")
    summary = build_database(backbone, encoder, data.task, db_uri=uri, dataset=data, show_progress=False,
                             options=BuildOptions(batch_size=8, calibration_examples=8, index="hnsw"))
    assert summary.index == TUNED["hnsw"].describe()
    with ExitDB(uri, collection=summary.collection, meta=None, create=False) as db:
        assert db.index == TUNED["hnsw"]  # read back from the collection's properties
    auto = build_database(backbone, encoder, data.task, db_uri=str(tmp_path / "auto.db"), dataset=data,
                          show_progress=False, options=BuildOptions(batch_size=8, calibration_examples=8))
    assert auto.index == "FLAT (exact)"


def test_reindex_switches_the_index_and_keeps_the_records(tmp_path):
    ids = np.arange(300, dtype=np.int64)
    records = make_exit_records(ids)
    with ExitDB(str(tmp_path / "re.db"), collection="re", meta=TEST_META) as db:
        db.insert(records)
        exact = db.search(records.vectors[:5], k=3).ids
        assert db.reindex(IndexConfig(kind="HNSW", ef=64), timeout_s=120) >= 0
        assert db.index.kind == "HNSW" and db.index_state()["kind"] == "HNSW"
        assert db.count() == 300
        np.testing.assert_array_equal(db.search(records.vectors[:5], k=3).ids, exact)
