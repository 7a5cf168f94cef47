"""`raee serve --policy fused`: the HTTP answers equal the in-process engine's over the same build, for the default
policy and for a policy a request picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from collectors.build import BuildOptions, build_database
from inference_workers.deployment import build_app, delete_app, run_app
from inference_workers.engine import BatchEngine, ServedTask
from milvus.exit_db import ExitDB, setup_meta
from raee.exit_policy import FusedPolicy, all_policies
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, serve_config, tiny_llama_models

pytestmark = pytest.mark.serve

SST2 = get_task("sst2")
TRAIN_TEXTS = tuple(f"{a} {b}" for a in SENTENCES for b in SENTENCES if a != b)


def test_fused_policy_over_http_equals_the_engine(tmp_path: Path, serve_url_reused: str):
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path / "exit.db")
    labels = np.random.default_rng(0).integers(0, 2, size=len(TRAIN_TEXTS))
    summary = build_database(backbone, encoder, SST2, db_uri=uri, dataset=Dataset(SST2, "train", TRAIN_TEXTS, labels),
                             options=BuildOptions(batch_size=16), show_progress=False)
    knobs = {"k": 5, "beta": 0.5, "slack": 0.1, "tau": 0.6}
    with ExitDB(uri, collection=summary.collection, meta=setup_meta(backbone, encoder, SST2)) as db:
        engine = BatchEngine(backbone, encoder, {"sst2": ServedTask(SST2, db)}, all_policies(**knobs), "fused")
        expected = {name: engine.classify(list(SENTENCES), SST2, policy=name) for name in ("fused", "raee")}
    assert isinstance(engine.policies["fused"], FusedPolicy)
    config = serve_config(uri, {SST2: summary.collection}, policy="fused", knobs=knobs)
    run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS),
            name="raee-fused", route_prefix="/fused")
    try:
        for name, body in (("fused", {}), ("raee", {"policy": "raee"})):  # the default, and one picked per request
            got = requests.post(f"{serve_url_reused}/fused/v1/classify",
                                json={"task": "sst2", "texts": list(SENTENCES), **body}, timeout=60)
            assert got.status_code == 200, got.text
            answers = got.json()["predictions"]
            assert [a["exit_layer"] for a in answers] == [r.exit_layer for r in expected[name]]
            assert [a["label"] for a in answers] == [r.label for r in expected[name]]
            assert {a["policy"] for a in answers} == {name}
            np.testing.assert_allclose([a["probs"] for a in answers], [r.probs for r in expected[name]], atol=1e-5)
    finally:
        delete_app("raee-fused")
