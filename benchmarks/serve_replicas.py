"""Serving with several replicas: throughput and latency of 1 vs 2 Ray Serve replicas under the same load.

    nice -n 10 python benchmarks/serve_replicas.py --clients 8 --seconds 30 --repeats 2
    python benchmarks/serve_replicas.py --model gemma-3-270m --n-train 256 --clients 8 --seconds 60

Several replicas need a Milvus server (a Lite file has one owner), so this starts the embedded Milvus 2.3.5
server (milvus/server.py) and a new local Ray cluster on 127.0.0.1, builds the exit database of the first
--n-train training examples on the server, and starts Serve's HTTP proxy once. Then, alternating 1 and 2
replicas --repeats times (the same application redeployed with `num_replicas`, each replica with
--cpus-per-replica and one torch thread), it runs benchmarks/load.py's `run_load` (--clients threads posting
`/v1/classify` back to back for --seconds, after a 3 s warm-up) and reports requests/s, texts/s and p50/p99
latency per replica count (medians over the repeats), the ratio 2/1, and errors. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps the node on 127.0.0.1
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.load import rotating_body, run_load, summarize


def tiny_models():
    """The tests' tiny llama and its layer-2 state encoder (module-level: Ray pickles it by reference)."""
    from tests.fixtures_ray import tiny_llama_models

    return tiny_llama_models()


def build(args: argparse.Namespace, uri: str):
    """(model spec, task, collection, query texts): the exit database of --n-train examples on the server."""
    from collectors.build import BuildOptions, build_database
    from raee.spec import ModelSpec
    from raee.tasks import Dataset, get_task, load_split

    task = get_task(args.task)
    if args.model == "tiny":
        from tests.fixtures_models import SENTENCES

        pairs = [f"{a} {b}" for a in SENTENCES for b in SENTENCES]
        n = min(args.n_train, len(pairs))
        train = Dataset(task, "train", tuple(pairs[:n]), np.random.default_rng(0).integers(0, task.n_classes, n))
        queries, spec = list(SENTENCES), ModelSpec(factory=tiny_models)
    else:
        train = load_split(task, "train", args.data_dir).head(args.n_train)
        queries = list(load_split(task, "test", args.data_dir).head(64).texts)
        spec = ModelSpec(args.model, args.encoder, cache_dir=args.cache_dir, batch_size=args.batch_size)
    backbone, encoder = spec.load(n_threads=1)
    summary = build_database(backbone, encoder, task, db_uri=uri, dataset=train,
                             options=BuildOptions(batch_size=args.batch_size), show_progress=False)
    return spec, task, summary.collection, queries


def measure(args: argparse.Namespace, uri: str) -> dict:
    from inference_workers.deployment import Limits, ServeConfig, build_app, delete_app, run_app, start_http
    from milvus.server import free_port

    spec, task, collection, queries = build(args, uri)
    url = start_http(port=free_port())
    config = ServeConfig(tasks=(task,), collections={task.name: collection}, db_uri=uri, policy=args.policy)
    body = rotating_body(task.name, queries, args.texts_per_request)
    runs: dict[int, list] = {1: [], 2: []}
    for _ in range(args.repeats):
        for replicas in (1, 2):
            run_app(build_app(spec, config, replicas=replicas, cpus_per_replica=args.cpus_per_replica,
                              limits=Limits(max_batch_size=args.max_batch_size)), name="replicas-bench")
            run_load(url, body, clients=args.clients, seconds=3)  # warm-up: every replica sees requests
            runs[replicas].append(summarize(run_load(url, body, clients=args.clients, seconds=args.seconds),
                                            args.clients))
            delete_app("replicas-bench")
    figures = {}
    for replicas, stats in runs.items():
        figures[f"replicas_{replicas}"] = {
            "requests_per_s": round(float(np.median([s.requests_per_s for s in stats])), 2),
            "texts_per_s": round(float(np.median([s.texts_per_s for s in stats])), 2),
            "p50_ms": round(float(np.median([s.p50_ms for s in stats])), 1),
            "p99_ms": round(float(np.median([s.p99_ms for s in stats])), 1),
            "errors": int(sum(s.errors for s in stats)),
            "runs": [{"requests_per_s": round(s.requests_per_s, 2), "p99_ms": round(s.p99_ms, 1)} for s in stats]}
    one, two = figures["replicas_1"], figures["replicas_2"]
    figures["throughput_2_over_1"] = round(two["requests_per_s"] / one["requests_per_s"], 3)
    figures["p99_2_over_1"] = round(two["p99_ms"] / one["p99_ms"], 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--model", default="tiny", help="'tiny' (the tests' 4-layer llama) or a backbone name")
    parser.add_argument("--encoder", default="all-minilm-l6-v2")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--policy", default="raee")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--cpus-per-replica", type=float, default=0.5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--data-dir", default=None, help="LM-BFF data (default: $RAEE_DATA_DIR)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from benchmarks._common import emit, provenance
    from milvus.server import EmbeddedMilvusServer

    load_1m = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="raee-replicas-") as tmp, EmbeddedMilvusServer(tmp) as server:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            figures = measure(args, server.uri)
        finally:
            serve.shutdown()
            ray.shutdown()
    for key in ("replicas_1", "replicas_2"):
        print(f"{key}: {figures[key]}", flush=True)
    emit({"benchmark": "serve_replicas", **provenance(model=args.model, task=args.task, clients=args.clients,
                                                       seconds=args.seconds, repeats=args.repeats,
                                                       texts_per_request=args.texts_per_request, n_train=args.n_train,
                                                       num_cpus=args.num_cpus, cpus_per_replica=args.cpus_per_replica,
                                                       policy=args.policy, backend="embedded milvus 2.3.5",
                                                       loadavg_1m_at_start=load_1m), "figures": figures})


if __name__ == "__main__":
    main()
