"""`raee eval` pipeline end to end on a tiny model, real SST-2 rows and a real Milvus Lite database."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestration.evaluate import METHODS, EvalConfig, evaluate_task
from orchestration.report import markdown
from raee.keys import BackboneStateEncoder
from raee.tasks import get_task

SST2 = get_task("sst2")


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_backbone):
    return tiny_llama_backbone, BackboneStateEncoder(tiny_llama_backbone, layer_idx=2)


def test_every_method_is_scored_and_raee_matches_the_recorded_layers(tiny_setup, tmp_path, data_dir):
    backbone, encoder = tiny_setup
    config = EvalConfig(db_uri=str(tmp_path / "eval.db"), limit_train=48, limit_test=24, latency_examples=4,
                        latency_repeats=1, k_sweep=(1, 4), fraction_sweep=(0.5,))
    result = evaluate_task(SST2, backbone, encoder, config, data_dir=str(data_dir), quiet=True,
                           figure_dir=str(tmp_path / "figures"))
    assert set(result.scores) == set(METHODS) and set(result.mean_exit) == set(METHODS)
    assert result.raee_engine_mismatches == 0  # the engine's truncated runs equal the recorded layers
    assert result.mean_exit["full"] == backbone.n_layers
    # the oracle is right wherever any layer is right: an upper bound for every layer-based method
    for method in ("full", "raee", "raee_wo", "fixed_trunc", "confidence"):
        assert result.scores["oracle"] >= result.scores[method]
    assert result.scores["full"] == pytest.approx(result.layer_scores[-1])
    assert sum(result.exit_histogram) == 24
    assert set(result.k_sweep) == {"1", "4"} and set(result.fraction_sweep) == {"0.5"}
    assert set(result.latency_ms) == {"1", "32"} and all(v["speedup"] > 0 for v in result.latency_ms.values())
    assert (tmp_path / "figures" / "sst2_figure2.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "sst2_exit_hist.png").stat().st_size > 1000

    # a second run reuses the complete database instead of rebuilding it, with the same results
    again = evaluate_task(SST2, backbone, encoder, config, data_dir=str(data_dir), quiet=True)
    assert again.scores == result.scores and again.mean_exit == result.mean_exit

    text = markdown([result.to_dict()], header={"model": "tiny", "encoder": encoder.name, "command": "test",
                                                "k": 12, "tau": 0.9, "confidence_threshold": 0.9})
    assert "| RAEE |" in text and "| Oracle (earliest correct layer) |" in text
    json.dumps(result.to_dict())  # plain data all the way down
    assert np.isfinite(list(result.scores.values())).all()
