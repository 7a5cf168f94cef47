"""The in-process collector (Alg. 3.1) on a tiny llama backbone and a real Milvus Lite database."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from collectors.build import BuildOptions, build_database, build_rows, record_batches, subset_indices
from milvus.exit_db import BuildVariant, ExitDB, collection_name, setup_meta
from raee.backbones import Backbone
from raee.calibration import fit_calibration
from raee.exit_policy import exit_sets
from raee.keys import BackboneStateEncoder
from raee.records import record_ids
from raee.tasks import Dataset, get_task
from tests.fixtures_models import SENTENCES, tiny_model

SST2 = get_task("sst2")


def pair_dataset(n: int = 30, seed: int = 0) -> Dataset:
    """n distinct texts ("sentence_i sentence_j") the word-level tokenizer knows, with seeded labels."""
    texts = tuple(f"{a} {b}" for a, b in itertools.permutations(SENTENCES, 2))[:n]
    labels = np.random.default_rng(seed).integers(0, 2, size=len(texts))
    return Dataset(SST2, "train", texts, labels)


def test_builds_refuse_the_test_split():
    data = pair_dataset(5)
    with pytest.raises(ValueError, match="training split only"):
        build_rows(Dataset(SST2, "test", data.texts, data.labels), BuildVariant())


@pytest.fixture(scope="module")
def tiny_llama_reused():
    model, tokenizer = tiny_model("llama")
    return Backbone(model, tokenizer, name="tiny-llama", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def state_encoder_reused(tiny_llama_reused):
    return BackboneStateEncoder(tiny_llama_reused, layer_idx=2)


def test_exit_sets_by_hand():
    probs = np.array([[[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]], dtype=np.float32)  # (1, 3 layers, 2 classes)
    np.testing.assert_allclose(exit_sets(probs, np.array([1])), [[0.0, 0.7, 0.0]])  # a 0.5 tie goes to class 0
    np.testing.assert_allclose(exit_sets(probs, np.array([0])), [[0.6, 0.0, 0.5]])
    padded = exit_sets(np.stack([probs[0], probs[0]])[None], np.array([[1, -1]]))  # (1, 2 neighbours, 3)
    np.testing.assert_allclose(padded, [[[0.0, 0.7, 0.0], [0.0, 0.0, 0.0]]])  # padding (-1) is all 0


def test_records_match_layer_probs(tiny_llama_reused, state_encoder_reused, tmp_path):
    backbone, encoder, data = tiny_llama_reused, state_encoder_reused, pair_dataset(13)
    batches = [records for records, _ in record_batches(backbone, encoder, data, batch_size=5)]
    assert [len(b) for b in batches] == [5, 5, 3]
    probs = backbone.layer_probs(list(data.texts), SST2)  # (N, L+1, C)
    correct = probs.argmax(2) == data.labels[:, None]  # (N, L+1)
    expected = np.where(correct, probs[np.arange(len(data)), :, data.labels], 0.0)  # (N, L+1), loop-free reference
    got = np.concatenate([b.exit_probs for b in batches])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(got > 0, correct)
    np.testing.assert_array_equal(np.concatenate([b.ids for b in batches]), record_ids("sst2", "train", np.arange(13)))
    np.testing.assert_allclose(np.concatenate([b.vectors for b in batches]), encoder.encode(list(data.texts)),
                               atol=1e-5)

    options = BuildOptions(batch_size=5, calibration_examples=6)
    summary = build_database(backbone, encoder, SST2, db_uri=str(tmp_path / "exit.db"), dataset=data,
                             options=options, show_progress=False)
    assert (summary.n_examples, summary.n_records, summary.n_in_db) == (13, 13, 13)
    assert summary.share_no_correct_layer == pytest.approx(np.mean(~correct.any(1)))
    assert summary.full_model_accuracy == pytest.approx(np.mean(correct[:, -1]))
    meta = setup_meta(backbone, encoder, SST2)
    assert summary.collection == collection_name(meta) and summary.variant == "full training split"
    with ExitDB(str(tmp_path / "exit.db"), collection=summary.collection, meta=meta) as db:
        stored = db.get(record_ids("sst2", "train", np.arange(13)))
        calibration = db.calibration
    np.testing.assert_allclose(stored.exit_probs, expected, atol=1e-5)
    np.testing.assert_allclose(stored.layer_probs, probs, atol=1e-6)  # raw: one build serves every policy
    np.testing.assert_array_equal(stored.labels, data.labels)
    assert stored.texts == data.texts
    # The calibration is fitted on the first calibration_examples of the build's seeded order, train split only.
    sample = build_rows(data, BuildVariant())[:6]
    np.testing.assert_allclose(calibration.bias, fit_calibration(probs[sample]).bias, atol=1e-6)
    assert calibration.n_examples == 6


def test_rebuild_is_idempotent_and_only_correct_keeps_full_model_hits(tiny_llama_reused, state_encoder_reused,
                                                                     tmp_path):
    backbone, encoder, data = tiny_llama_reused, state_encoder_reused, pair_dataset(20)
    uri = str(tmp_path / "exit.db")
    options = BuildOptions(batch_size=8)
    first = build_database(backbone, encoder, SST2, db_uri=uri, dataset=data, options=options, show_progress=False)
    again = build_database(backbone, encoder, SST2, db_uri=uri, dataset=data, options=options, show_progress=False)
    assert first.n_in_db == again.n_in_db == 20 and again.collection == first.collection

    only = build_database(backbone, encoder, SST2, db_uri=uri, dataset=data,
                          options=BuildOptions(batch_size=8, only_correct=True), show_progress=False)
    last_right = np.flatnonzero(backbone.layer_probs(list(data.texts), SST2)[:, -1].argmax(1) == data.labels)
    assert 0 < len(last_right) < 20, "the seeded labels should leave both kinds of example"
    assert only.collection != first.collection and only.variant == "full training split, only-correct"
    assert only.n_examples == 20 and only.n_records == only.n_in_db == len(last_right)
    assert only.share_no_correct_layer == first.share_no_correct_layer  # counted over processed examples
    with ExitDB(uri, collection=only.collection, meta=setup_meta(backbone, encoder, SST2)) as db:
        assert db.variant.only_correct
        everything = db.get(record_ids("sst2", "train", np.arange(20)))
        assert db.count() == len(last_right)
    np.testing.assert_array_equal(everything.ids, record_ids("sst2", "train", last_right))
    assert (everything.exit_probs[:, -1] > 0).all()


def test_fraction_is_a_seeded_deterministic_subset(tiny_llama_reused, state_encoder_reused, tmp_path):
    a, b, c = subset_indices(50, 0.2, seed=0), subset_indices(50, 0.2, seed=0), subset_indices(50, 0.2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 10 and not np.array_equal(a, c) and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(subset_indices(7, 1.0), np.arange(7))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            subset_indices(10, bad)
        with pytest.raises(ValueError, match="fraction"):
            BuildOptions(fraction=bad)

    backbone, encoder, data = tiny_llama_reused, state_encoder_reused, pair_dataset(20)
    uri = str(tmp_path / "exit.db")
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=data,
                             options=BuildOptions(fraction=0.25, seed=3), show_progress=False)
    assert summary.variant == "fraction 0.25 (seed 3)" and summary.n_in_db == 5
    with ExitDB(uri, collection=summary.collection, meta=setup_meta(backbone, encoder, SST2)) as db:
        assert db.variant == BuildVariant(0.25, 3)
        stored = db.get(record_ids("sst2", "train", np.arange(20)))
    picked = subset_indices(20, 0.25, seed=3)
    np.testing.assert_array_equal(stored.ids, record_ids("sst2", "train", picked))  # ids keep original indices
    assert stored.texts == tuple(data.texts[i] for i in picked)


def test_an_offramp_build_stores_cross_fitted_records_and_its_head(tiny_llama_reused, state_encoder_reused,
                                                                   tmp_path):
    """--head offramp: the sample's records come from off-ramps that never saw them, the rest from the final
    off-ramps (fitted on the sample only), and the head is stored with the collection under its name."""
    from inference_workers.engine import stored_head
    from raee.offramps import cross_fit

    backbone, encoder, data = tiny_llama_reused, state_encoder_reused, pair_dataset(30)
    uri = str(tmp_path / "offramp.db")
    options = BuildOptions(head="offramp", offramp_examples=20, offramp_folds=4, calibration_examples=10,
                           batch_size=8)
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=data, options=options, show_progress=False)
    assert summary.n_in_db == 30
    ordered = data.take(build_rows(data, BuildVariant()))
    states = backbone.layer_pass(list(ordered.texts), SST2).states  # (30, L+1, H)
    fitted = cross_fit(states[:20], ordered.labels[:20], 2, n_folds=4, seed=0)
    with ExitDB(uri, collection=summary.collection, meta=None, create=False) as db:
        head = stored_head(db)  # the build's off-ramps (its states came in other batches: equal up to rounding)
        assert head.name == db.meta.head and db.meta.head.startswith("offramp:")
        np.testing.assert_allclose(head.layer_probs(states), fitted.final.layer_probs(states), atol=1e-5)
        stored = db.get(record_ids("sst2", "train", ordered.example_idx))
        np.testing.assert_allclose(stored.layer_probs[:20], fitted.layer_probs, atol=1e-5)  # cross-fitted
        np.testing.assert_allclose(stored.layer_probs[20:], fitted.final.layer_probs(states[20:]), atol=1e-5)
        np.testing.assert_allclose(stored.exit_probs, exit_sets(stored.layer_probs, ordered.labels), atol=1e-6)
        np.testing.assert_allclose(db.calibration.bias, fit_calibration(fitted.layer_probs[:10]).bias, atol=1e-6)
    lm = build_database(backbone, encoder, SST2, db_uri=uri, dataset=data, show_progress=False)
    assert lm.collection != summary.collection  # the head is part of the setup: both builds live side by side
