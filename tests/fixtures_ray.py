"""Ray fixtures: ONE local Ray cluster (and at most one Serve instance) per test session, all on 127.0.0.1.

Starting Ray costs ~6 s and Serve ~3 s more on a busy 2-core machine, so both are session-scoped and every
Ray test shares them. The cluster is always a new local one (`address="local"`): never another user's
cluster from /tmp/ray. Teardown stops only what this session started (serve.shutdown, ray.shutdown).
Actors and replicas ask for fractional CPUs so a collector pool and a Serve replica fit in num_cpus=2.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from milvus.server import free_port  # below the ephemeral range: no outgoing connection takes it first
from tests.fixtures_models import tiny_model

RAY_NUM_CPUS = 2
ACTOR_CPUS = 0.5  # per collector actor / Serve replica: a pool of 2 plus one replica fit in 2 CPUs


def tiny_llama_models():
    """(tiny llama Backbone, BackboneStateEncoder at layer 2): the factory a ModelSpec ships to Ray workers.

    Module-level so it pickles by reference; seeded, so every process builds identical weights."""
    from raee.backbones import Backbone
    from raee.keys import BackboneStateEncoder

    model, tokenizer = tiny_model("llama")
    backbone = Backbone(model, tokenizer, name="tiny-llama", device="cpu", batch_size=8)
    return backbone, BackboneStateEncoder(backbone, layer_idx=2)


def serve_config(uri: str, builds: dict, **kwargs):
    """A ServeConfig over {Task: collection name} on uri (what `raee serve` resolves with choose_build)."""
    from inference_workers.deployment import ServeConfig

    return ServeConfig(tasks=tuple(builds), collections={task.name: name for task, name in builds.items()},
                       db_uri=uri, **kwargs)


RAEE_KNOBS = {"k": 5, "tau": 0.6}  # the paper's policy with the tiny tests' neighbourhoods


@pytest.fixture(scope="session")
def ray_cluster_reused() -> Iterator[dict]:
    """A local Ray cluster for the whole session (num_cpus=2, no dashboard); yields ray.init's address info."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps the node on 127.0.0.1
    if ray.is_initialized():
        pytest.fail("Ray is already initialised in this process; the session fixture must own it")
    context = ray.init(address="local", num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=False,
                       configure_logging=False)
    try:
        yield context.address_info
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_url_reused(ray_cluster_reused: dict) -> Iterator[str]:
    """Ray Serve started once on the session cluster on a free port, the host left to `start_http`'s default
    (test_bind.py checks that it is 127.0.0.1); yields its base URL."""
    from ray import serve

    from inference_workers.deployment import start_http

    try:
        yield start_http(port=free_port())
    finally:
        serve.shutdown()


def task_on_disk(task, texts, labels, folder):
    """`task` reading its train split from a jsonl file written under folder: texts and class indices.

    The Ray engine streams a task's files, so tests hand it files, not in-memory Datasets."""
    import json
    from pathlib import Path

    from raee.tasks import with_data

    path = Path(folder) / f"{task.name}.train.jsonl"
    with path.open("w") as out:
        for text, label in zip(texts, labels, strict=True):
            out.write(json.dumps({"text": text, "label": task.label_values[int(label)]}) + "\n")
    return with_data(task, train=str(path), test=None, text="text", label="label", text_pair=None, columns=None,
                     quoting=True, format="jsonl")
