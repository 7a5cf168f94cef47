"""`raee eval` pipeline end to end on a tiny model, real SST-2 rows and a real Milvus Lite database."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestration.evaluate import METHODS, EvalConfig, evaluate_task
from orchestration.methods import PEERS
from orchestration.report import markdown
from raee.keys import BackboneStateEncoder
from raee.tasks import get_task

SST2 = get_task("sst2")


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_backbone):
    return tiny_llama_backbone, BackboneStateEncoder(tiny_llama_backbone, layer_idx=2)


def test_every_method_is_scored_and_the_engine_matches_the_recorded_layers(tiny_setup, tmp_path, data_dir):
    backbone, encoder = tiny_setup
    config = EvalConfig(db_uri=str(tmp_path / "eval.db"), limit_train=64, limit_test=24, latency_examples=4,
                        latency_repeats=1, k_sweep=(1, 4), fraction_sweep=(0.5,), tune_examples=16,
                        fused_betas=(0.5, 2.0), fused_slacks=(0.0, 0.2), cache_dir=str(tmp_path / "cache"))
    result = evaluate_task(SST2, backbone, encoder, config, data_dir=str(data_dir), quiet=True,
                           figure_dir=str(tmp_path / "figures"))
    lm_methods = [m for m in METHODS if m not in PEERS and not m.endswith("_or")]  # the default: LM head, no peers
    assert set(result.scores) == set(lm_methods) and set(result.mean_exit) == set(lm_methods)
    # every retrieval policy's engine run (truncated forwards) equals the recorded-layer reading
    assert result.engine_mismatches == {"raee": 0, "raee_cal": 0, "fused": 0, "confident": 0}
    assert result.engine_checked == 24
    assert result.mean_exit["full"] == backbone.n_layers
    # the oracle is right wherever any layer is right: an upper bound for every raw-layer method
    for method in ("full", "raee", "raee_wo", "fixed_trunc", "confidence"):
        assert result.scores["oracle"] >= result.scores[method]
    assert result.scores["full"] == pytest.approx(result.layer_scores[-1])
    assert result.scores["full_cal"] == pytest.approx(result.layer_scores_calibrated[-1])
    assert sum(result.exit_histogram) == 24 and sum(result.fused_exit_histogram) == 24
    assert set(result.k_sweep) == {"1", "4"} and set(result.fraction_sweep) == {"0.5"}
    assert set(result.latency_ms) == {"1", "32"}
    assert all(v["raee_speedup"] > 0 and v["fused_speedup"] > 0 for v in result.latency_ms.values())
    # the knobs come from the tuning grid (2 x 2), the curve sweeps the slack at the chosen beta
    assert len(result.tune_grid) == 4 and result.fused_params["beta"] in (0.5, 2.0)
    assert [p["slack"] for p in result.depth_curve] == list(config.curve_slacks)
    assert (tmp_path / "figures" / "sst2_figure2.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "sst2_exit_hist.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "sst2_depth_accuracy.png").stat().st_size > 1000
    assert len(result.layer_scores_calibrated) == len(result.constant_share) == backbone.n_layers + 1

    # a second run reuses the databases and the cached forward passes, with the same results
    again = evaluate_task(SST2, backbone, encoder, config, data_dir=str(data_dir), quiet=True)
    assert again.scores == result.scores and again.mean_exit == result.mean_exit

    text = markdown([result.to_dict()], header={"model": "tiny", "encoder": encoder.name, "command": "test",
                                                "k": 12, "tau": 0.9, "confidence_threshold": 0.9})
    assert "| RAEE (paper) |" in text and "| Oracle (earliest correct layer) |" in text
    assert "Fused policy: knobs chosen on the held-out training slice" in text
    json.dumps(result.to_dict())  # plain data all the way down
    assert np.isfinite(list(result.scores.values())).all()


def test_calibration_and_tuning_use_the_training_split_only(tiny_setup, tmp_path, data_dir):
    """The stored calibration is the mean over the database's training examples; tuning and database are disjoint
    training examples; no test example is among either."""
    from milvus.exit_db import ExitDB, collection_name, setup_meta
    from orchestration.evaluate import split_train
    from raee.calibration import fit_calibration
    from raee.tasks import load_split

    backbone, encoder = tiny_setup
    config = EvalConfig(db_uri=str(tmp_path / "eval.db"), limit_train=56, limit_test=12, latency_examples=2,
                        latency_repeats=1, latency_batch_sizes=(1,), tune_examples=16, fused_betas=(1.0,),
                        fused_slacks=(0.0,), curve_slacks=(0.0,), engine_check_examples=4)
    evaluate_task(SST2, backbone, encoder, config, data_dir=str(data_dir), quiet=True)
    train, tune = split_train(load_split(SST2, "train", data_dir), 56, 16, 0)  # --limit-train caps both
    test = load_split(SST2, "test", data_dir).sample(12, 0)
    assert not set(train.example_idx) & set(tune.example_idx) and len(train) == 40 and len(tune) == 16
    assert not set(train.texts) & set(test.texts)
    meta = setup_meta(backbone, encoder, SST2)
    with ExitDB(config.db_uri, collection=collection_name(meta) + "_n40_tune16_seed0", meta=meta) as db:
        stored = db.calibration
    assert stored.n_examples == 40
    np.testing.assert_allclose(stored.bias, fit_calibration(backbone.layer_probs(train.texts, SST2)).bias, atol=1e-6)
    for other in (tune, test):  # the calibration from any other examples would differ
        assert not np.allclose(stored.bias, fit_calibration(backbone.layer_probs(other.texts, SST2)).bias, atol=1e-6)


def test_limit_train_caps_everything_taken_from_the_training_split(data_dir):
    from orchestration.evaluate import split_train, tune_size
    from raee.tasks import load_split

    assert tune_size(None, 500) == 500 and tune_size(1500, 500) == 500 and tune_size(300, 500) == 100
    train, tune = split_train(load_split(SST2, "train", data_dir), 300, tune_size(300, 500), 0)
    assert len(train) + len(tune) == 300
    with pytest.raises(ValueError, match="leaves no database examples"):
        split_train(load_split(SST2, "train", data_dir), 10, 10, 0)


def test_offramp_head_and_peers_are_scored_from_the_training_split_only(tiny_setup, tmp_path, data_dir):
    """--heads lm,offramp --peers on a tiny model: every peer is scored, the off-ramp head's engine answers as its
    recorded reading, thresholds are chosen on the tuning slice, SLEB keeps L - int(0.6 L) blocks."""
    backbone, encoder = tiny_setup
    config = EvalConfig(db_uri=str(tmp_path / "eval.db"), limit_train=64, limit_test=24, latency_examples=4,
                        latency_repeats=1, latency_batch_sizes=(4,), tune_examples=16, fused_betas=(1.0,),
                        fused_slacks=(0.0, 0.2), curve_slacks=(0.0,), heads=("lm", "offramp"), peers=True,
                        offramp_folds=3, sleb_prompts=8, cache_dir=str(tmp_path / "cache"))
    result = evaluate_task(SST2, backbone, encoder, config, data_dir=str(data_dir), quiet=True)
    for method in (*PEERS, "full_or", "raee_or", "raee_cal_or", "fused_or", "confident_or", "oracle_or"):
        assert method in result.scores and 0 <= result.mean_exit[method] <= backbone.n_layers, method
    assert result.engine_mismatches["raee_or"] == result.engine_mismatches["fused_or"] == 0
    assert result.engine_mismatches["confident"] == result.engine_mismatches["confident_or"] == 0
    assert result.offramp["head"].startswith("offramp:") and len(result.offramp["layer_scores"]) == 5
    assert result.mean_exit["sleb"] == backbone.n_layers - int(0.6 * backbone.n_layers)
    assert len(result.peer_params["sleb_kept_blocks"]) == 2 and "deebert_entropy" in result.peer_params
    assert result.scores["oracle_or"] >= result.scores["full_or"]
    assert {"deebert_ms", "sleb_ms", "fused_or_ms", "full_ms"} <= set(result.latency_ms["4"])
    text = markdown([result.to_dict()], header={"model": "tiny", "encoder": encoder.name, "command": "test",
                                                "k": 12, "tau": 0.9, "confidence_threshold": 0.9})
    assert "Table 1 shape" in text and "| DeeBERT (off-ramps, entropy exit) |" in text
    assert "Per-layer score of the off-ramps" in text
