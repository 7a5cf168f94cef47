"""Entry points that run on a Ray cluster: `raee build --ray`, `raee serve`, `raee eval --ray`.

Each function connects to Ray (a new local cluster on 127.0.0.1, or `ray_address` to join one), does its
work with the collectors / inference_workers pieces and stops only what it started: `ray.shutdown()` for
a local cluster it created, `serve.shutdown()` for Serve. Nothing here ever runs `ray stop`, which would
kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import ray

from collectors.ray_collect import CollectorPool, DistributedBuild
from inference_workers import deployment
from milvus.exit_db import is_lite_uri
from raee.models import DEFAULT_BACKBONE, DEFAULT_ENCODER
from raee.spec import ModelSpec
from raee.tasks import Task, get_task, load_split


@contextmanager
def ray_session(ray_address: str | None = None, *, num_cpus: int | None = None) -> Iterator[dict]:
    """Connected Ray for the block: joins ray_address, else starts a local cluster on 127.0.0.1 and stops it after.

    Never auto-joins a cluster found in /tmp/ray: without an address the cluster is always new ("local")."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps a local node on 127.0.0.1
    if ray.is_initialized():  # a caller (a test, a notebook) owns the connection
        yield {"address": ray.get_runtime_context().gcs_address, "started": False}
        return
    if ray_address:
        context = ray.init(address=ray_address, log_to_driver=False)
    else:
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield {**context.address_info, "started": True}
    finally:
        ray.shutdown()


def build_with_ray(
    tasks: Sequence[Task | str],
    *,
    model: str = DEFAULT_BACKBONE,
    encoder: str = DEFAULT_ENCODER,
    db_uri: str = "./raee.db",
    token: str | None = None,
    num_actors: int | None = None,
    ray_address: str | None = None,
    fraction: float = 1.0,
    seed: int = 0,
    only_correct: bool = False,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 32,
    shard_size: int = 512,
    cpus_per_actor: float = 1.0,
    quiet: bool = False,
) -> DistributedBuild:
    """`raee build --ray`: every task's exit database built by a pool of actors, resumable; checked counts.

    One actor per GPU when the cluster has GPUs, else num_actors CPU actors (default: one per CPU). With
    Milvus Lite the driver is the single writer; with a server URI the actors write directly."""
    task_list = [get_task(t) if isinstance(t, str) else t for t in tasks]
    for task in task_list:
        load_split(task, "train", data_dir)  # bad data fails before any actor starts
    spec = ModelSpec(model, encoder, cache_dir=_abs(cache_dir), batch_size=batch_size)
    with ray_session(ray_address), CollectorPool(spec, n_actors=num_actors, cpus_per_actor=cpus_per_actor) as pool:
        return pool.build(task_list, db_uri=_abs_db(db_uri), token=token, data_dir=data_dir, fraction=fraction,
                          seed=seed, only_correct=only_correct, batch_size=batch_size, shard_size=shard_size,
                          show_progress=not quiet)


def describe_build(result: DistributedBuild) -> list[str]:
    """One line per task stating the checked record count, then one for the run (what `raee build --ray` prints)."""
    lines = [
        f"{s.collection}: {s.n_in_db} records == {s.n_records} written for {s.n_examples} examples (checked); "
        f"{100 * s.share_no_correct_layer:.1f}% have no correct layer, full model right on "
        f"{100 * s.full_model_accuracy:.1f}%"
        for s in result.summaries
    ]
    n = sum(s.n_examples for s in result.summaries)
    lines.append(f"{n} examples in {result.seconds:.1f} s ({n / max(result.seconds, 1e-9):.1f} examples/s) on "
                 f"{result.n_actors} actors; {result.n_shards} shards, {result.n_shards_skipped} already complete")
    return lines


def serve(
    tasks: Sequence[Task | str],
    *,
    model: str = DEFAULT_BACKBONE,
    encoder: str = DEFAULT_ENCODER,
    db_uri: str = "./raee.db",
    token: str | None = None,
    host: str = deployment.DEFAULT_HOST,
    port: int = deployment.DEFAULT_PORT,
    replicas: int = 1,
    ray_address: str | None = None,
    k: int = 12,
    tau: float = 0.9,
    cache_dir: str | None = None,
    batch_size: int = 32,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.01,
    max_texts: int = 64,
    max_text_chars: int = 2000,
    cpus_per_replica: float = 1.0,
) -> str:
    """`raee serve`: the HTTP API on host:port (127.0.0.1:8000 by default); prints the URL, blocks until Ctrl-C.

    Returns the URL after a clean stop (Serve shut down, and the local Ray cluster if this call started it)."""
    names = tuple(get_task(t).name if isinstance(t, str) else t.name for t in tasks)
    if is_lite_uri(db_uri) and not os.path.exists(db_uri):
        raise FileNotFoundError(f"no exit database at {db_uri}; build it first: raee build --task {','.join(names)}")
    spec = ModelSpec(model, encoder, cache_dir=_abs(cache_dir), batch_size=batch_size)
    config = deployment.ServeConfig(tasks=names, db_uri=_abs_db(db_uri), token=token, k=k, tau=tau)
    limits = deployment.Limits(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                               max_texts=max_texts, max_text_chars=max_text_chars)
    with ray_session(ray_address):
        try:
            app = deployment.build_app(spec, config, replicas=replicas, cpus_per_replica=cpus_per_replica,
                                       limits=limits)
            url = deployment.start_http(host=host, port=port)
            deployment.run_app(app)
            print(f"raee serving {', '.join(names)} at {url} (API docs: {url}/docs); Ctrl-C stops it", flush=True)
            if host not in ("127.0.0.1", "localhost", "::1"):
                print(f"warning: {host} is not loopback and the API has no authentication", file=sys.stderr)
            _wait_for_interrupt()
        finally:
            stop_serving()
    return url


def stop_serving() -> None:
    """Stop Serve on the connected cluster (the proxy, the controller and the replicas, which release the db)."""
    if ray.is_initialized():
        deployment.shutdown()


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (both end in a clean shutdown)."""
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping raee serve", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _abs(path: str | None) -> str | None:
    """Workers run in another directory: relative paths must be made absolute in the driver."""
    return os.path.abspath(path) if path else path


def _abs_db(db_uri: str) -> str:
    return os.path.abspath(db_uri) if is_lite_uri(db_uri) else db_uri

