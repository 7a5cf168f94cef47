"""Ray scale-out: collection throughput with 1 vs 2 actors, and Ray Serve latency/throughput, RAEE vs full model.

    python benchmarks/ray_scale.py --model gemma-3-270m --task sst2 --n-train 128 --n-queries 48
    python benchmarks/ray_scale.py --model tiny            # the tests' 4-layer random llama (plumbing only)

All on one new local Ray cluster (127.0.0.1, --num-cpus CPUs, one torch thread per actor/replica):
1. Collection: the same first --n-train training examples (written to a jsonl file) are built into a fresh
   Milvus Lite database by `build_on_ray` with 1 and with 2 actors, alternating, --repeats times each; each
   build starts its own actor pool (model loads are inside the timing, as in `raee build --ray`). Lite means the
   driver is the single writer, as on one machine. benchmarks/collect_scale.py measures the stream at scale.
2. Serving: one replica (Lite) serves the database from step 1 over HTTP on 127.0.0.1. --n-queries test
   sentences are sent one per request, sequentially and from 8 concurrent clients, with policy "raee" and
   "full" (every layer, no retrieval) alternating on the same replica. Latency is per HTTP request.
Prints human-readable lines and one JSON line (figures + provenance). Never compare numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray
import requests

from benchmarks._common import emit, provenance
from collectors.build import BuildOptions
from collectors.ray_collect import PoolShape, build_on_ray
from inference_workers.deployment import Limits, ServeConfig, build_app, delete_app, run_app, start_http
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task, load_split


def tiny_models():
    """The tests' tiny llama and layer-2 state encoder (module-level so Ray pickles it by reference)."""
    from tests.fixtures_ray import tiny_llama_models

    return tiny_llama_models()


def collection_throughput(spec: ModelSpec, task, data: Dataset, *, repeats: int, cpus: float, batch_size: int,
                          root: Path) -> dict:
    """Examples/s of 1-actor and 2-actor Ray Data builds of the same file into fresh Lite files, alternating.

    Each build starts its actor pool (models load inside the timing, as in `raee build --ray`)."""
    from tests.fixtures_ray import task_on_disk

    task = task_on_disk(task, data.texts, data.labels, root)
    rates: dict[int, list[float]] = {1: [], 2: []}
    last_db, collection = "", ""
    for rep in range(repeats + 1):  # repeat 0 warms both up and is dropped
        for n in (1, 2):
            last_db = str(root / f"collect_{n}_{rep}.db")
            t0 = time.perf_counter()
            result = build_on_ray([task], spec=spec, db_uri=last_db, options=BuildOptions(batch_size=batch_size),
                                  shape=PoolShape(n, cpus, 0), show_progress=False)
            seconds = time.perf_counter() - t0
            assert result.summaries[0].n_in_db == len(data), result
            collection = result.summaries[0].version or result.summaries[0].collection
            if rep:
                rates[n].append(len(data) / seconds)
    one, two = float(np.median(rates[1])), float(np.median(rates[2]))
    return {"examples": len(data), "repeats": repeats, "examples_per_s_1_actor": round(one, 2),
            "examples_per_s_2_actors": round(two, 2), "speedup_2_vs_1": round(two / one, 3), "db": last_db,
            "collection": collection}


def _post(url: str, task: str, text: str, policy: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    reply = requests.post(f"{url}/v1/classify", json={"task": task, "texts": [text], "policy": policy}, timeout=300)
    latency = time.perf_counter() - t0
    reply.raise_for_status()
    return latency, reply.json()["predictions"][0]


def _clients(url: str, task: str, texts: list[str], policy: str, n_clients: int) -> tuple[list[float], float, list]:
    """Per-request latencies, wall seconds and predictions with n_clients threads each sending its share."""
    shares = [list(range(i, len(texts), n_clients)) for i in range(n_clients)]
    out: list = [None] * len(texts)

    def client(idx: list[int]) -> list[float]:
        lat = []
        for i in idx:
            seconds, out[i] = _post(url, task, texts[i], policy)
            lat.append(seconds)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        latencies = [x for lat in pool.map(client, shares) for x in lat]
    return latencies, time.perf_counter() - t0, out


def serving(url: str, task, texts: list[str], labels: np.ndarray, *, repeats: int) -> dict:
    """p50/p99 latency and requests/s for raee and full, sequential and 8 clients; policies alternate."""
    _clients(url, task.name, texts[:8], "raee", 1)  # warm-up
    _clients(url, task.name, texts[:8], "full", 1)
    runs: dict[tuple[str, int], dict[str, list]] = {}
    for _ in range(repeats):
        for clients in (1, 8):
            for policy in ("raee", "full"):
                lat, wall, preds = _clients(url, task.name, texts, policy, clients)
                run = runs.setdefault((policy, clients), {"lat": [], "rps": [], "preds": preds})
                run["lat"] += lat
                run["rps"].append(len(texts) / wall)
    figures: dict[str, dict] = {}
    for (policy, clients), run in runs.items():
        lat_ms = np.array(run["lat"]) * 1000
        preds = run["preds"]
        figures[f"{policy}_{clients}_clients"] = {
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
            "requests_per_s": round(float(np.median(run["rps"])), 2),
            "mean_exit_layer": round(float(np.mean([p["exit_layer"] for p in preds])), 2),
            "accuracy": round(float(np.mean([p["label"] for p in preds] == labels)), 4),
        }
    for clients in (1, 8):
        raee, full = figures[f"raee_{clients}_clients"], figures[f"full_{clients}_clients"]
        figures[f"ratio_{clients}_clients"] = {
            "p50_full_over_raee": round(full["p50_ms"] / raee["p50_ms"], 3),
            "throughput_raee_over_full": round(raee["requests_per_s"] / full["requests_per_s"], 3),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="backbone, or 'tiny' for the tests' tiny llama")
    parser.add_argument("--encoder", default="all-minilm-l6-v2")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-queries", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--data-dir", default=None, help="LM-BFF data (default: $RAEE_DATA_DIR)")
    args = parser.parse_args()

    task = get_task(args.task)
    if args.model == "tiny":
        from tests.fixtures_models import SENTENCES

        texts = tuple(f"{a} {b}" for a in SENTENCES for b in SENTENCES)
        rng = np.random.default_rng(0)
        train = Dataset(task, "train", texts[: args.n_train], rng.integers(0, task.n_classes, args.n_train))
        queries, labels = list(SENTENCES * 8)[: args.n_queries], rng.integers(0, task.n_classes, args.n_queries)
        spec = ModelSpec(factory=tiny_models)
    else:
        train = load_split(task, "train", args.data_dir).head(args.n_train)
        test = load_split(task, "test", args.data_dir).head(args.n_queries)
        queries, labels = list(test.texts), np.asarray(test.labels)
        spec = ModelSpec(args.model, args.encoder, cache_dir=args.cache_dir, batch_size=args.batch_size)

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="raee-ray-bench-") as root:
            collect = collection_throughput(spec, task, train, repeats=args.repeats, cpus=args.num_cpus / 4,
                                            batch_size=args.batch_size, root=Path(root))
            print(f"collection of {collect['examples']} examples: {collect['examples_per_s_1_actor']} ex/s with 1 "
                  f"actor, {collect['examples_per_s_2_actors']} ex/s with 2 -> speedup {collect['speedup_2_vs_1']}x",
                  flush=True)
            from milvus.server import free_port

            url = start_http(port=free_port())
            config = ServeConfig(tasks=(task,), collections={task.name: collect.pop("collection")},
                                 db_uri=collect.pop("db"))
            run_app(build_app(spec, config, cpus_per_replica=1.0, limits=Limits(max_batch_size=16)), name="bench")
            try:
                serve_figures = serving(url, task, queries, labels, repeats=args.repeats)
            finally:
                delete_app("bench")
            for name, row in serve_figures.items():
                print(f"serve {name}: {json.dumps(row)}", flush=True)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    emit({"benchmark": "ray_scale", **provenance(model=args.model, encoder=args.encoder if args.model != "tiny"
                                                  else "backbone:tiny-llama:layer-2", task=task.name,
                                                  n_train=args.n_train, n_queries=args.n_queries,
                                                  repeats=args.repeats, num_cpus=args.num_cpus, dtype="float32",
                                                  batch_size=args.batch_size, seed=0),
          "collection": collect, "serve": serve_figures})


if __name__ == "__main__":
    main()
