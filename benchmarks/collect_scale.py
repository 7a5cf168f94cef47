"""Collection at scale: N generated examples streamed through Ray Data actors into the embedded Milvus server.

    python benchmarks/collect_scale.py --n 20000                          # the acceptance run (2 cores)
    nice -n 10 python benchmarks/collect_scale.py --n 100000 --actors 1
    nice -n 10 python benchmarks/collect_scale.py --n 1000000 --actors 2 --kill-actor-at 0.5

1. Writes a deterministic task of N texts (seeded words from the tiny models' vocabulary, seeded labels) as a
   task spec: a TOML file and a jsonl train file on disk, in chunks (the generator holds no more than a chunk).
2. Starts the embedded Milvus 2.3.5 server (milvus/server.py; or --uri) and a local Ray cluster on 127.0.0.1.
3. Builds the exit database with `collectors.ray_collect.build_on_ray`: the tests' tiny random llama backbone
   and its layer-2 state key encoder (backbone batch --batch-size), --actors CPU actors writing to the server.
   --kill-actor-at F sends SIGKILL to the actor that wrote the batch crossing F * N examples.
4. Counts the records in Milvus (Strong) and reads every stored id back (one paged scan) to check that they
   are exactly the N record ids: nothing lost, nothing duplicated.
Prints one JSON line: n, records, ids_exact, seconds, rows_per_s, driver_peak_rss_mib (sampled every 0.2 s
during the build) and the process's lifetime max RSS, actors, provenance. Never compare numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps the node on 127.0.0.1
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil
import ray

from benchmarks._common import emit, provenance
from collectors.build import BuildOptions
from collectors.ray_collect import build_on_ray, pool_shape
from milvus.exit_db import ExitDB
from milvus.server import EmbeddedMilvusServer
from raee.records import record_ids
from raee.spec import ModelSpec
from raee.tasks import get_task, load_task_spec, with_data

CHUNK = 50_000  # rows generated and written at a time


def bench_models():
    """The tests' tiny llama (batch 64) and its layer-2 state encoder: module-level, so Ray pickles it by name."""
    from raee.backbones import Backbone
    from raee.keys import BackboneStateEncoder
    from tests.fixtures_models import tiny_model

    model, tokenizer = tiny_model("llama")
    backbone = Backbone(model, tokenizer, name="tiny-llama", device="cpu", batch_size=64)
    return backbone, BackboneStateEncoder(backbone, layer_idx=2)


def write_task(folder: Path, n: int, seed: int) -> Path:
    """A spec `scale.toml` over `scale.train.jsonl`: n texts of 4-12 seeded vocabulary words, seeded sst2 labels."""
    from tests.fixtures_models import SENTENCES

    base = get_task("sst2")
    vocab = np.array(sorted({w for s in SENTENCES for w in s.split()}))
    rng = np.random.default_rng(seed)
    with (folder / "scale.train.jsonl").open("w") as out:
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            lengths = rng.integers(4, 13, size=size)
            words = vocab[rng.integers(0, len(vocab), size=(size, 12))]  # (size, 12)
            labels = rng.integers(0, base.n_classes, size=size)
            out.writelines(json.dumps({"text": " ".join(w[:k]), "label": base.label_values[y]}) + "\n"
                           for w, k, y in zip(words, lengths.tolist(), labels.tolist(), strict=True))
    task = with_data(base, train="scale.train.jsonl", test=None, text="text", label="label", text_pair=None,
                     columns=None, quoting=True, format="jsonl")
    spec = folder / "scale.toml"
    spec.write_text(task.to_toml().replace('name = "sst2"', 'name = "scale"', 1))
    return spec


class PeakRss:
    """The driver's resident memory, sampled every interval_s in a thread: peak in MiB."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, me.memory_info().rss)
            time.sleep(interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def killer(n: int, at: float | None) -> tuple[Callable[[dict], None], dict]:
    """on_batch that SIGKILLs the actor of the batch crossing at * n examples (once); and what it did."""
    state = {"done": 0, "killed_pid": None, "killed_at_examples": None}

    def on_batch(batch: dict) -> None:
        state["done"] += int(batch["n_examples"].sum())
        if at is not None and state["killed_pid"] is None and state["done"] >= at * n:
            pid = int(batch["pid"][0])
            os.kill(pid, signal.SIGKILL)
            state["killed_pid"], state["killed_at_examples"] = pid, state["done"]

    return on_batch, state


def stored_ids_exact(uri: str, collection: str, n: int) -> bool:
    """Every stored id is one of the n record ids and every record id is stored once (paged scan)."""
    with ExitDB(uri, collection=collection, meta=None, create=False, timeout_s=120.0) as db:
        ids = np.sort(np.concatenate([page for page, _ in db.scan()]))
    return bool(len(ids) == n and np.array_equal(ids, record_ids("scale", "train", np.arange(n))))


def run(args: argparse.Namespace, root: Path, uri: str) -> dict:
    spec_path = write_task(root, args.n, args.seed)
    task = load_task_spec(spec_path)
    options = BuildOptions(batch_size=args.batch_size, index=args.index, calibration_examples=2000)
    on_batch, kill = killer(args.n, args.kill_actor_at)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        shape = pool_shape(args.actors)
        with PeakRss() as rss:
            t0 = time.perf_counter()
            result = build_on_ray([task], spec=ModelSpec(factory=bench_models), db_uri=uri, options=options,
                                  shape=shape, block_rows=args.block_rows, show_progress=not args.quiet,
                                  on_batch=on_batch)
            seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    (summary,) = result.summaries
    with ExitDB(uri, collection=summary.collection, meta=None, create=False, consistency="Strong",
                timeout_s=120.0) as db:
        records = db.count()
    return {"n": args.n, "records": records, "ids_exact": stored_ids_exact(uri, summary.collection, args.n),
            "seconds": round(seconds, 1), "rows_per_s": round(args.n / seconds, 1),
            "driver_peak_rss_mib": round(rss.mib, 1),
            "driver_max_rss_mib_lifetime": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "actors": shape.n_actors, "cpus_per_actor": shape.cpus, "index": summary.index,
            "batches": result.n_batches, **kill, "collection": summary.version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="examples to generate and build")
    parser.add_argument("--actors", type=int, default=2, help="CPU collector actors")
    parser.add_argument("--kill-actor-at", type=float, default=None, help="SIGKILL an actor at this share of n")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per map_batches call")
    parser.add_argument("--block-rows", type=int, default=4096, help="rows per block read from the file")
    parser.add_argument("--index", default="flat", help="auto, flat, hnsw or ivf_flat (default flat: time the "
                                                         "collection, not an index build)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--uri", default=None, help="an existing Milvus server (default: start the embedded one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    prov = provenance(num_cpus=args.num_cpus, batch_size=args.batch_size, block_rows=args.block_rows, seed=args.seed,
                      kill_actor_at=args.kill_actor_at, backend=args.uri or "embedded milvus 2.3.5",
                      loadavg_1m_at_start=round(os.getloadavg()[0], 2))  # the code that runs, before it runs
    with tempfile.TemporaryDirectory(prefix="raee-collect-scale-") as tmp:
        root = Path(tmp)
        if args.uri:
            figures = run(args, root, args.uri)
        else:
            with EmbeddedMilvusServer(root / "milvus") as server:
                figures = run(args, root, server.uri)
    emit({"benchmark": "collect_scale", **figures, **prov, "loadavg_1m_at_end": round(os.getloadavg()[0], 2)})
    if figures["records"] != args.n or not figures["ids_exact"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
