"""`raee serve --policy fused`: the HTTP answers equal the in-process engine's with the same calibrated database."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from collectors.build import build_database, exit_db_meta
from inference_workers.deployment import ServeConfig, build_app, delete_app, run_app
from inference_workers.engine import BatchEngine
from milvus.exit_db import ExitDB
from raee.exit_policy import FusedPolicy
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, tiny_llama_models

pytestmark = pytest.mark.serve

SST2 = get_task("sst2")
TRAIN_TEXTS = tuple(f"{a} {b}" for a in SENTENCES for b in SENTENCES if a != b)


def test_fused_policy_over_http_equals_the_engine(tmp_path: Path, serve_url_reused: str):
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path / "exit.db")
    labels = np.random.default_rng(0).integers(0, 2, size=len(TRAIN_TEXTS))
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=Dataset(SST2, "train", TRAIN_TEXTS, labels),
                             calibrate=True, batch_size=16, show_progress=False)
    policy = FusedPolicy(k=5, beta=0.5, slack=0.1)
    with ExitDB(uri, collection=summary.collection, meta=exit_db_meta(backbone, encoder, SST2, calibrated=True)) as db:
        expected = BatchEngine(backbone, encoder, {"sst2": db}, policy).classify(list(SENTENCES), SST2)
    config = ServeConfig(tasks=("sst2",), db_uri=uri, k=5, exit_policy="fused",
                         policy_params={"beta": 0.5, "slack": 0.1})
    run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS),
            name="raee-fused", route_prefix="/fused")
    try:
        got = requests.post(f"{serve_url_reused}/fused/v1/classify", json={"task": "sst2", "texts": list(SENTENCES)},
                            timeout=60)
        assert got.status_code == 200, got.text
        answers = got.json()["predictions"]
        assert [a["exit_layer"] for a in answers] == [r.exit_layer for r in expected]
        assert [a["label"] for a in answers] == [r.label for r in expected]
        np.testing.assert_allclose([a["probs"] for a in answers], [r.probs for r in expected], atol=1e-5)
    finally:
        delete_app("raee-fused")
