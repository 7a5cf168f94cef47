"""Bounded load test of the HTTP API: N concurrent clients for T seconds, loopback only.

    python benchmarks/load.py --clients 16 --seconds 60                      # tiny llama, plumbing only
    python benchmarks/load.py --model gemma-3-270m --clients 8 --seconds 60 --n-train 256
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 8       # a running `raee serve`

Without --url it starts a new local Ray cluster (127.0.0.1, --num-cpus), builds a Milvus Lite exit database
from the first --n-train training examples, deploys one replica and measures it: each client thread sends
`POST /v1/classify` with --texts-per-request texts back to back (keep-alive session) until T seconds are up.
Reports requests and texts served, throughput, p50/p99 latency per request, errors by kind, and the replica's
resident memory before (after a warm-up) and after the load. With --url memory is not measured (the replica
is in another Ray cluster). `tests/test_load.py` runs the same `run_load` for a few seconds in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

Body = Callable[[int, int], dict]  # (client index, request index of that client) -> JSON body


@dataclass(frozen=True)
class Outcome:
    """One request as a client saw it: when it started and ended (perf_counter s), and how it ended."""

    client: int
    start: float
    end: float
    status: int  # HTTP status, or 0 when no response came back (connection error, timeout)
    error: str = ""  # "" for 2xx, else the status line or the exception's class and message
    n_texts: int = 0
    payload: dict | None = None  # the body sent and the JSON answer, kept only with run_load(keep_replies=True)
    reply: dict | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class LoadStats:
    """What a load run measured; `lines()` is the human-readable report."""

    clients: int
    seconds: float  # wall time from the first request sent to the last answer received
    requests: int
    texts: int  # texts in successful requests
    errors: int
    error_kinds: dict[str, int] = field(default_factory=dict)
    requests_per_s: float = 0.0
    texts_per_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    rss_before_mib: float | None = None
    rss_after_mib: float | None = None

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_before_mib is None or self.rss_after_mib is None:
            return None
        return self.rss_after_mib - self.rss_before_mib

    def lines(self) -> str:
        memory = ("replica RSS n/a" if self.rss_growth_mib is None else
                  f"replica RSS {self.rss_before_mib:.0f} MiB before -> {self.rss_after_mib:.0f} MiB after "
                  f"({self.rss_growth_mib:+.1f} MiB)")
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.error_kinds.items())) or "none"
        return (f"load: {self.clients} clients for {self.seconds:.1f} s: {self.requests} requests "
                f"({self.texts} texts) served, {self.requests_per_s:.1f} req/s ({self.texts_per_s:.1f} texts/s), "
                f"latency p50 {self.p50_ms:.1f} ms p99 {self.p99_ms:.1f} ms max {self.max_ms:.1f} ms, "
                f"errors {self.errors} ({kinds}), {memory}")


def run_load(url: str, body: Body, *, clients: int, seconds: float, timeout_s: float = 60.0,
             path: str = "/v1/classify", headers: dict[str, str] | None = None,
             stop: threading.Event | None = None, keep_replies: bool = False,
             on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """`clients` threads post body(client, i) to url+path back to back until `seconds` pass (or `stop` is set).

    Every request is recorded, failures included: a request never hangs longer than timeout_s. on_outcome sees
    each one as it ends (fault tests watch for recovery while the load runs)."""
    deadline = time.perf_counter() + seconds
    stop = stop or threading.Event()
    outcomes: list[list[Outcome]] = [[] for _ in range(clients)]

    def client(c: int) -> None:
        with requests.Session() as session:
            i = 0
            while time.perf_counter() < deadline and not stop.is_set():
                payload = body(c, i)
                t0 = time.perf_counter()
                answer = None
                try:
                    reply = session.post(url + path, json=payload, headers=headers, timeout=timeout_s)
                    status = reply.status_code
                    error = "" if 200 <= status < 300 else f"HTTP {status}: {reply.text[:200]}"
                    if keep_replies and not error:
                        answer = reply.json()
                except requests.RequestException as exc:
                    status, error = 0, f"{type(exc).__name__}: {str(exc)[:200]}"
                outcome = Outcome(c, t0, time.perf_counter(), status, error, len(payload.get("texts", ())),
                                  payload if keep_replies else None, answer)
                outcomes[c].append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
                i += 1

    threads = [threading.Thread(target=client, args=(c,), name=f"load-client-{c}", daemon=True)
               for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout_s + 30)
    return sorted((o for per_client in outcomes for o in per_client), key=lambda o: o.start)


def summarize(outcomes: list[Outcome], clients: int, *, rss_before: int | None = None,
              rss_after: int | None = None) -> LoadStats:
    """Throughput over the run's wall time, latency percentiles of successful requests, errors by kind."""
    if not outcomes:
        return LoadStats(clients, 0.0, 0, 0, 0)
    wall = max(o.end for o in outcomes) - min(o.start for o in outcomes)
    good = [o for o in outcomes if o.ok]
    bad = [o for o in outcomes if not o.ok]
    lat_ms = np.array([o.end - o.start for o in good]) * 1000
    kinds = Counter(str(o.status) if o.status else o.error.split(":", 1)[0] for o in bad)
    texts = sum(o.n_texts for o in good)
    mib = 2.0**20
    return LoadStats(
        clients=clients, seconds=wall, requests=len(good), texts=texts, errors=len(bad), error_kinds=dict(kinds),
        requests_per_s=len(good) / wall if wall else 0.0, texts_per_s=texts / wall if wall else 0.0,
        p50_ms=float(np.percentile(lat_ms, 50)) if len(lat_ms) else float("nan"),
        p99_ms=float(np.percentile(lat_ms, 99)) if len(lat_ms) else float("nan"),
        max_ms=float(lat_ms.max()) if len(lat_ms) else float("nan"),
        rss_before_mib=None if rss_before is None else rss_before / mib,
        rss_after_mib=None if rss_after is None else rss_after / mib,
    )


def rotating_body(task: str, texts: list[str], per_request: int) -> Body:
    """Bodies that walk through `texts`, `per_request` at a time, each client from its own offset."""

    def body(client: int, i: int) -> dict:
        start = (client * 7 + i * per_request) % len(texts)
        return {"task": task, "texts": [texts[(start + j) % len(texts)] for j in range(per_request)]}

    return body


def tiny_models():
    """The tests' tiny llama and its layer-2 state encoder (module-level: Ray pickles it by reference)."""
    from tests.fixtures_ray import tiny_llama_models

    return tiny_llama_models()


def _deploy(args: argparse.Namespace, root: Path) -> tuple[str, object, list[str]]:
    """(base URL, deployment handle, query texts): database built, Serve started on 127.0.0.1, app running."""
    from collectors.build import BuildOptions, build_database
    from inference_workers.deployment import Limits, ServeConfig, build_app, run_app, start_http
    from milvus.server import free_port
    from raee.spec import ModelSpec
    from raee.tasks import Dataset, get_task, load_split

    task = get_task(args.task)
    if args.model == "tiny":
        from tests.fixtures_models import SENTENCES

        pairs = [f"{a} {b}" for a in SENTENCES for b in SENTENCES]
        rng = np.random.default_rng(0)
        n = min(args.n_train, len(pairs))
        train = Dataset(task, "train", tuple(pairs[:n]), rng.integers(0, task.n_classes, n))
        queries = list(SENTENCES)
        spec = ModelSpec(factory=tiny_models)
    else:
        train = load_split(task, "train", args.data_dir).head(args.n_train)
        queries = list(load_split(task, "test", args.data_dir).head(64).texts)
        spec = ModelSpec(args.model, args.encoder, cache_dir=args.cache_dir, batch_size=args.batch_size)
    backbone, encoder = spec.load(n_threads=1)
    uri = str(root / "exit.db")
    summary = build_database(backbone, encoder, task, db_uri=uri, dataset=train,
                             options=BuildOptions(batch_size=args.batch_size), show_progress=False)
    del backbone, encoder
    url = start_http(port=free_port())
    config = ServeConfig(tasks=(task,), collections={task.name: summary.collection}, db_uri=uri, policy=args.policy)
    limits = Limits(max_batch_size=args.max_batch_size, max_texts=max(64, args.texts_per_request))
    handle = run_app(build_app(spec, config, cpus_per_replica=1.0, limits=limits), name="load-bench",
                     route_prefix="/")
    return url, handle, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--url", default=None, help="measure a running server instead of starting one")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--model", default="tiny", help="'tiny' (the tests' 4-layer llama) or a backbone name")
    parser.add_argument("--encoder", default="all-minilm-l6-v2")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--policy", default="fused", help="the server's default exit policy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--data-dir", default=None, help="LM-BFF data (default: $RAEE_DATA_DIR)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=200.0, help="fail above this growth")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from benchmarks._common import emit, provenance

    if args.url:
        from tests.fixtures_models import SENTENCES

        body = rotating_body(args.task, list(SENTENCES), args.texts_per_request)
        run_load(args.url, body, clients=1, seconds=2)  # warm-up
        stats = summarize(run_load(args.url, body, clients=args.clients, seconds=args.seconds), args.clients)
    else:
        import tempfile

        import ray
        from ray import serve

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            with tempfile.TemporaryDirectory(prefix="raee-load-") as root:
                url, handle, queries = _deploy(args, Path(root))
                body = rotating_body(args.task, queries, args.texts_per_request)
                run_load(url, body, clients=args.clients, seconds=3)  # warm-up: allocator and batch shapes
                before = handle.process_info.remote().result(timeout_s=60)["rss_bytes"]
                outcomes = run_load(url, body, clients=args.clients, seconds=args.seconds)
                after = handle.process_info.remote().result(timeout_s=60)["rss_bytes"]
                stats = summarize(outcomes, args.clients, rss_before=before, rss_after=after)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(stats.lines(), flush=True)
    emit({"benchmark": "load", **provenance(model=args.model, task=args.task, clients=args.clients,
                                             seconds=args.seconds, texts_per_request=args.texts_per_request,
                                             n_train=args.n_train, num_cpus=args.num_cpus, url=args.url),
          "figures": dict(stats.__dict__)})
    growth = stats.rss_growth_mib
    if stats.errors or (growth is not None and growth > args.max_rss_growth_mib):
        sys.exit(1)


if __name__ == "__main__":
    main()
