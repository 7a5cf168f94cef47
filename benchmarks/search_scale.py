"""Search at scale on realistic keys: HNSW (ef) and IVF_FLAT (nprobe) against FLAT, by recall and by RAEE's exits.

    nice -n 10 python benchmarks/search_scale.py --n 100000
    nice -n 10 python benchmarks/search_scale.py --n 1000000        # the scale run (an hour here)

Keys: all-MiniLM-L6-v2 (the packaged key encoder, raw sentences) of every distinct *training* text of the 8
LM-BFF tasks; the rest up to N are generated around them: key' = normalise(key_s + sigma * e), s round-robin
over the real keys, sigma uniform in [--sigma-min, --sigma-max], e shaped like the real keys' spread (a
Gaussian mix of 16 centred real keys, scaled to the keys' mean distance from their centroid): a key cloud
that keeps the real sentences' neighbourhoods and fills the space between them. Queries: the MiniLM keys of
the 8 tasks' *test* texts (not stored), --n-queries of them, seeded.

Exit sets (L = 18 layers, as Gemma 3 270M): a real key gets a seeded first-correct layer and gold-label
probabilities rising after it; a generated key inherits its source's, with the first-correct layer moved by
-2..2 and the probabilities jittered. So neighbours that come from one sentence vote alike, as in a real
build where similar texts exit alike.

One collection on the embedded Milvus 2.3.5 server (milvus/server.py, or --uri), bulk-inserted once
(`ExitDB.insert`: no upsert delete records), then re-indexed in place (`ExitDB.reindex`) for each kind:
FLAT first (the truth: its neighbours and the exit layers RAEE picks from them), then HNSW and IVF_FLAT.
For every search setting: recall@12 against FLAT's ids, the share of queries whose exit layer (ExitPolicy,
tau 0.9, k 12: Eq. 4-6 on the returned distances and exit sets) equals FLAT's, p50/p99 latency of one
`ExitDB.search` with 1 and with 32 queries, and the kind's index build time. One JSON line per setting as it
finishes (so a cut-short run keeps what it measured), then a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._common import provenance, search_latency_ms
from milvus.exit_db import ExitDB, ExitDBMeta
from milvus.index import IndexConfig
from milvus.server import EmbeddedMilvusServer
from raee.exit_policy import ExitPolicy
from raee.records import ExitRecords

N_LAYERS = 18
CHUNK = 20_000  # records generated and inserted at a time


def real_keys(cache: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train keys (R, 384), test keys (Q, 384)) of the 8 tasks' distinct texts; cached as .npy under `cache`."""
    train_file, test_file = cache / "minilm_train.npy", cache / "minilm_test.npy"
    if train_file.exists() and test_file.exists():
        return np.load(train_file), np.load(test_file)
    import torch

    from raee.keys import load_encoder
    from raee.tasks import BUILTIN_TASKS, load_split

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train = sorted({t for name in BUILTIN_TASKS for t in load_split(name, "train").inputs})
    test = sorted({t for name in BUILTIN_TASKS for t in load_split(name, "test").inputs} - set(train))
    encoder = load_encoder("all-minilm-l6-v2", batch_size=128)
    cache.mkdir(parents=True, exist_ok=True)
    train_keys, test_keys = encoder.encode(train, show_progress=True), encoder.encode(test, show_progress=True)
    np.save(train_file, train_keys)
    np.save(test_file, test_keys)
    return train_keys, test_keys


def exit_sets(first: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, L+1) gold-label probabilities: 0 before each row's first correct layer, rising in [0.5, 1) after it,
    and a layer after it wrong (0) with probability 0.1."""
    layers = np.arange(N_LAYERS + 1)
    rise = 0.5 + 0.5 * (layers[None, :] - first[:, None]) / (N_LAYERS + 1 - first[:, None] + 1)  # (N, L+1)
    probs = np.clip(rise + rng.normal(0, 0.05, size=rise.shape), 0.5, 0.999)
    probs[layers[None, :] < first[:, None]] = 0.0
    probs[(layers[None, :] > first[:, None]) & (rng.random(rise.shape) < 0.1)] = 0.0
    return probs.astype(np.float32)


def generated_chunk(real: np.ndarray, real_first: np.ndarray, lo: int, hi: int, args: argparse.Namespace,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(keys (hi-lo, D), exit sets (hi-lo, L+1)) of records lo..hi-1; records < len(real) are the real keys."""
    rng = np.random.default_rng([args.seed, lo])
    n_real = len(real)
    idx = np.arange(lo, hi)
    source = idx % n_real  # (b,) round-robin over the real keys
    keys = real[source].copy()
    first = real_first[source].copy()
    made = idx >= n_real
    if made.any():
        centred = real - real.mean(axis=0)
        spread = float(np.linalg.norm(centred, axis=1).mean())
        m = int(made.sum())
        picks = rng.integers(0, n_real, size=(m, 16))  # (m, 16) each key mixes its own 16 centred real keys
        mix = rng.normal(size=(m, 16)) / 4.0  # unit variance in total
        shape = np.concatenate([np.einsum("mj,mjd->md", mix[s : s + 2048], centred[picks[s : s + 2048]])
                                for s in range(0, m, 2048)])  # (m, D) noise shaped like the keys' spread
        shape *= spread / np.linalg.norm(shape, axis=1, keepdims=True).mean()
        sigma = rng.uniform(args.sigma_min, args.sigma_max, size=(m, 1))
        moved = keys[made] + sigma * shape
        keys[made] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
        first[made] = np.clip(first[made] + rng.integers(-2, 3, size=m), 0, N_LAYERS)
    return keys.astype(np.float32), exit_sets(first, rng)


def load(db: ExitDB, real: np.ndarray, args: argparse.Namespace) -> float:
    """Insert the N records chunk by chunk; returns the seconds (insert + flush)."""
    real_first = np.random.default_rng(args.seed).integers(0, N_LAYERS + 1, size=len(real))
    t0 = time.perf_counter()
    for lo in range(0, args.n, CHUNK):
        hi = min(lo + CHUNK, args.n)
        keys, probs = generated_chunk(real, real_first, lo, hi, args)
        db.insert(ExitRecords(ids=np.arange(lo, hi, dtype=np.int64), vectors=keys, exit_probs=probs,
                              labels=np.arange(lo, hi, dtype=np.int64) % 2, texts=("x" * 64,) * (hi - lo)))
    db.flush(wait_index=True, timeout_s=7200)
    return time.perf_counter() - t0




def search_all(db: ExitDB, queries: np.ndarray, k: int):
    """Neighbours of every query, 64 queries per request."""
    from dataclasses import fields

    from raee.records import Neighbours

    parts = [db.search(queries[s : s + 64], k=k) for s in range(0, len(queries), 64)]
    return Neighbours(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                         for f in fields(Neighbours) if f.name not in ("texts", "layer_probs")})


def measure(db: ExitDB, index: IndexConfig, build_s: float, queries: np.ndarray, truth, args) -> dict:
    """Recall@k and exit agreement against FLAT's answers (truth), and search latency, for db's current index."""
    policy = ExitPolicy(k=args.k)
    found = search_all(db, queries, args.k)
    hits = (found.ids[:, :, None] == truth.ids[:, None, :]).any(axis=2)  # (Q, k)
    agree = policy.exit_layers(found) == policy.exit_layers(truth)  # (Q,)
    reps_1, reps_32 = (args.repeats_1, args.repeats_32) if index.kind != "FLAT" else (20, 5)
    p50_1, p99_1 = search_latency_ms(db, queries, 1, reps_1, args.k)
    p50_32, p99_32 = search_latency_ms(db, queries, 32, reps_32, args.k)
    return {"index": index.kind, "build_params": index.build_params(), "search_params": index.search_params(args.k),
            "index_build_s": round(build_s, 1), "recall_at_k": round(float(hits.mean()), 4),
            "exit_agreement": round(float(agree.mean()), 4), "exit_disagreements": int((~agree).sum()),
            "search_b1_p50_ms": round(p50_1, 2), "search_b1_p99_ms": round(p99_1, 2),
            "search_b32_p50_ms": round(p50_32, 2), "search_b32_p99_ms": round(p99_32, 2)}


def run(uri: str, token: str | None, args: argparse.Namespace, prov: dict) -> list[dict]:
    real, test = real_keys(Path(args.cache), args.seed)
    queries = test[np.sort(np.random.default_rng(args.seed).permutation(len(test))[: args.n_queries])]
    meta = ExitDBMeta(backbone="bench", encoder="all-minilm-l6-v2:sentence", task="bench", task_digest="bench",
                      n_layers=N_LAYERS, dim=real.shape[1], n_classes=2, metric="L2")
    collection = f"search_scale_{args.n}"
    with ExitDB(uri, collection=collection, meta=meta, token=token, timeout_s=600.0) as db:
        db.drop()
    rows = []
    with ExitDB(uri, collection=collection, meta=meta, token=token, index=IndexConfig(), timeout_s=600.0,
                batch_rows=args.batch_rows) as db:
        load_s = load(db, real, args)
        common = {**prov, "n": args.n, "count": db.count(), "n_real_keys": len(real), "n_queries": len(queries),
                  "load_s": round(load_s, 1), "insert_rows_per_s": round(args.n / load_s)}
        truth = search_all(db, queries, args.k)
        rows.append({**common, **measure(db, db.index, 0.0, queries, truth, args)})
        print(json.dumps(rows[-1]), flush=True)
        plans = [(IndexConfig(kind="HNSW", m=args.m, ef_construction=args.ef_construction), "ef", args.ef),
                 (IndexConfig(kind="IVF_FLAT", nlist=args.nlist), "nprobe", args.nprobe)]
        for base, knob, values in plans:
            if base.kind.lower() not in args.kinds:
                continue
            build_s = db.reindex(base)
            for value in values:
                index = IndexConfig(**{**base.__dict__, knob: value})
                db.index = index  # search-time knob only: no rebuild
                rows.append({**common, "loadavg_1m": round(os.getloadavg()[0], 2),
                             **measure(db, index, build_s, queries, truth, args)})
                print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            db.drop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--kinds", default="hnsw,ivf_flat", help="ANN kinds to compare with FLAT")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--sigma-min", type=float, default=0.15)
    parser.add_argument("--sigma-max", type=float, default=0.6)
    parser.add_argument("--repeats-1", type=int, default=100)
    parser.add_argument("--repeats-32", type=int, default=30)
    parser.add_argument("--batch-rows", type=int, default=5000, help="rows per insert request")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "raee-search-scale-keys"))
    parser.add_argument("--uri", default=None, help="an existing server (default: start the embedded 2.3.5 one)")
    parser.add_argument("--token", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.kinds = args.kinds.split(",")

    prov = {"benchmark": "search_scale", **provenance(seed=args.seed, k=args.k, sigma=[args.sigma_min, args.sigma_max],
                                                      backend=args.uri or "embedded milvus 2.3.5"),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    if args.uri:
        rows = run(args.uri, args.token, args, prov)
    else:
        with tempfile.TemporaryDirectory(prefix="raee-search-scale-") as tmp, EmbeddedMilvusServer(tmp) as server:
            rows = run(server.uri, None, args, prov)
    print("| index | search | build s | recall@12 | exit agreement | b1 p50/p99 ms | b32 p50/p99 ms |", file=sys.stderr)
    for r in rows:
        print(f"| {r['index']} {r['build_params'] or ''} | {r['search_params'] or ''} | {r['index_build_s']} | "
              f"{r['recall_at_k']} | {r['exit_agreement']} | {r['search_b1_p50_ms']} / {r['search_b1_p99_ms']} | "
              f"{r['search_b32_p50_ms']} / {r['search_b32_p99_ms']} |", file=sys.stderr)


if __name__ == "__main__":
    main()
