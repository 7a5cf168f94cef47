"""Exit-database scale: insert rows/s, index build time, top-12 search latency and recall@12, Lite and server.

    python benchmarks/milvus_scale.py --n 100000                      # Lite (FLAT) and the 2.3.5 server (HNSW)
    python benchmarks/milvus_scale.py --n 1000000 --backend server    # the scale run
    python benchmarks/milvus_scale.py --backend server --uri http://127.0.0.1:19530 --token root:...

Records look like the real ones: a (D=384) key and L+1 = 19 exit probabilities. Keys are *clustered*
(overlapping Gaussian blobs around n/100 random centres; queries drawn from the same blobs, not stored): uniform random
384-d vectors have nearly equal distances to everything, which makes any ANN index look broken. Recall@12
compares the configured index with exact search (numpy, float64) on the same data. Each backend prints one
JSON line with the figures and its provenance; never compare numbers across runs or machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import search_latency_ms
from milvus.exit_db import ExitDB, ExitDBMeta
from milvus.index import IndexConfig
from milvus.server import EmbeddedMilvusServer
from raee.records import ExitRecords


def clustered_vectors(n: int, dim: int, n_clusters: int, spread: float, rng: np.random.Generator,
                      centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 points = centre[c] + spread * noise, c uniform over the clusters; returns (points, centres).

    centres and noise are standard normal, so spread=1 puts a point as far from its own centre as two centres
    are from each other: clusters that overlap, as sentence embeddings do, rather than trivially separable ones.
    """
    if centres is None:
        centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    assign = rng.integers(0, len(centres), size=n)
    return (centres[assign] + spread * rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32), centres


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the k smallest squared L2 distances, by brute force in float64, in row blocks."""
    q64 = queries.astype(np.float64)
    best_d = np.full((len(queries), 0), np.inf)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(data), 100_000):
        block = data[start : start + 100_000].astype(np.float64)
        d = (q64**2).sum(1)[:, None] - 2 * q64 @ block.T + (block**2).sum(1)[None, :]  # (Q, B)
        idx = np.argpartition(d, min(k, d.shape[1] - 1), axis=1)[:, :k]
        best_d = np.concatenate([best_d, np.take_along_axis(d, idx, 1)], axis=1)
        best_i = np.concatenate([best_i, idx + start], axis=1)
        keep = np.argsort(best_d, axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(best_d, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def records(lo: int, hi: int, data: np.ndarray, n_layers: int, rng: np.random.Generator) -> ExitRecords:
    probs = rng.random((hi - lo, n_layers + 1), dtype=np.float32)
    probs[probs < 0.3] = 0.0  # layers that predict wrongly
    return ExitRecords(ids=np.arange(lo, hi, dtype=np.int64), vectors=data[lo:hi], exit_probs=probs,
                       labels=np.arange(lo, hi, dtype=np.int64) % 2, texts=tuple("x" * 64 for _ in range(hi - lo)))




def run_backend(backend: str, uri: str, token: str | None, index: IndexConfig, data: np.ndarray,
                queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> dict:
    meta = ExitDBMeta(backbone="bench", encoder="bench", task="bench", template_hash="bench",
                      n_layers=args.n_layers, dim=args.dim, metric="L2")
    collection = f"bench_{len(data)}_{index.kind.lower()}"
    rng = np.random.default_rng(args.seed + 1)
    with ExitDB(uri, collection=collection, meta=meta, token=token, index=index, timeout_s=120.0) as db:
        db.drop()
    with ExitDB(uri, collection=collection, meta=meta, token=token, index=index, timeout_s=120.0,
                batch_rows=args.batch_rows) as db:
        t0 = time.perf_counter()
        for lo in range(0, len(data), 10_000):
            db.upsert(records(lo, min(lo + 10_000, len(data)), data, args.n_layers, rng))
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        db.flush(wait_index=True, timeout_s=3600)
        index_s = time.perf_counter() - t0
        count = db.count()
        p50_1, p99_1 = search_latency_ms(db, queries, 1, args.repeats_1, args.k)
        p50_32, p99_32 = search_latency_ms(db, queries, 32, args.repeats_32, args.k)
        found = db.search(queries, k=args.k).ids  # (Q, k)
        recall = float(np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found.tolist(), truth.tolist(),
                                                                                 strict=True)]))
        state = db.index_state()
        if not args.keep:
            db.drop()
    return {"backend": backend, "index": index.kind, "search_params": index.search_params(args.k), "n": len(data),
            "count": count, "insert_rows_per_s": round(len(data) / insert_s), "insert_s": round(insert_s, 2),
            "flush_index_s": round(index_s, 2), "indexed_rows": state["indexed_rows"],
            "search_b1_p50_ms": round(p50_1, 2), "search_b1_p99_ms": round(p99_1, 2),
            "search_b32_p50_ms": round(p50_32, 2), "search_b32_p99_ms": round(p99_32, 2),
            "recall_at_k": round(recall, 4), "k": args.k, "consistency": db.consistency}


def provenance(args: argparse.Namespace) -> dict:
    import milvus_lite
    import pymilvus

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False).stdout.strip()
    return {"git_sha": sha or "unknown", "machine": platform.machine(), "cpus": os.cpu_count(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
            "pymilvus": pymilvus.__version__, "milvus_lite": milvus_lite.__version__, "server": "milvus 2.3.5",
            "dim": args.dim, "n_layers": args.n_layers, "seed": args.seed, "spread": args.spread,
            "n_queries": args.n_queries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="records to insert")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--n-layers", type=int, default=18, help="L; each record holds L+1 floats")
    parser.add_argument("--backend", choices=["lite", "server", "both"], default="both")
    parser.add_argument("--uri", default=None, help="an existing server (default: start the embedded 2.3.5 one)")
    parser.add_argument("--token", default=None)
    parser.add_argument("--lite-index", choices=["FLAT", "HNSW", "IVF_FLAT"], default="FLAT")
    parser.add_argument("--server-index", choices=["FLAT", "HNSW", "IVF_FLAT"], default="HNSW")
    parser.add_argument("--ef", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--n-queries", type=int, default=256)
    parser.add_argument("--repeats-1", type=int, default=100)
    parser.add_argument("--repeats-32", type=int, default=30)
    parser.add_argument("--batch-rows", type=int, default=2000, help="rows per upsert request")
    parser.add_argument("--keep", action="store_true", help="keep the collection afterwards")
    parser.add_argument("--spread", type=float, default=1.0, help="cluster noise scale (centres are N(0, 1))")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n_clusters = max(args.n // 100, 10)
    data, centres = clustered_vectors(args.n, args.dim, n_clusters, args.spread, rng)
    queries, _ = clustered_vectors(args.n_queries, args.dim, n_clusters, args.spread, rng, centres)
    truth = exact_top_k(data, queries, args.k)
    prov = provenance(args)
    results = []
    if args.backend in ("lite", "both"):
        with tempfile.TemporaryDirectory(prefix="raee-bench-") as tmp:
            index = IndexConfig(kind=args.lite_index, ef=args.ef, nprobe=args.nprobe)
            results.append(run_backend("lite", str(Path(tmp) / "bench.db"), None, index, data, queries, truth, args))
            print(json.dumps({**prov, **results[-1]}), flush=True)
    if args.backend in ("server", "both"):
        index = IndexConfig(kind=args.server_index, ef=args.ef, nprobe=args.nprobe)
        if args.uri:
            results.append(run_backend("server", args.uri, args.token, index, data, queries, truth, args))
        else:
            with tempfile.TemporaryDirectory(prefix="raee-bench-server-") as tmp, \
                    EmbeddedMilvusServer(tmp) as server:
                results.append(run_backend("server", server.uri, None, index, data, queries, truth, args))
        print(json.dumps({**prov, **results[-1]}), flush=True)
    print("| backend | index | N | insert rows/s | flush+index s | b1 p50/p99 ms | b32 p50/p99 ms | recall@12 |",
          file=sys.stderr)
    for r in results:
        print(f"| {r['backend']} | {r['index']} {r['search_params'] or ''} | {r['n']} | {r['insert_rows_per_s']} | "
              f"{r['flush_index_s']} | {r['search_b1_p50_ms']} / {r['search_b1_p99_ms']} | "
              f"{r['search_b32_p50_ms']} / {r['search_b32_p99_ms']} | {r['recall_at_k']} |", file=sys.stderr)


if __name__ == "__main__":
    main()
