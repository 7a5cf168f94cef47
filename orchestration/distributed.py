"""Entry points that run on a Ray cluster: `raee build --ray`, `raee eval --ray`, `raee serve`.

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
from dataclasses import replace
from typing import TYPE_CHECKING

import ray
from tqdm.auto import tqdm

from collectors.build import variant_collection
from collectors.ray_collect import CollectorPool, DistributedBuild
from inference_workers import deployment
from milvus.exit_db import ExitDBMeta, collection_name, is_lite_uri
from raee.models import DEFAULT_BACKBONE, DEFAULT_ENCODER
from raee.spec import ModelSpec
from raee.tasks import Task, get_task, load_split

if TYPE_CHECKING:
    from orchestration.evaluate import EvalConfig


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
    spec: ModelSpec | None = None,
    calibrate: bool = False,
) -> DistributedBuild:
    """`raee build --ray`: every task's exit database built by a pool of actors, resumable; checked counts.

    One actor per GPU when the cluster has GPUs, else num_actors CPU actors (default: one per CPU). With
    Milvus Lite the driver is the single writer; with a server URI the actors write directly. spec overrides
    model/encoder/cache_dir (tests pass tiny models)."""
    task_list = [get_task(t) if isinstance(t, str) else t for t in tasks]
    for task in task_list:
        load_split(task, "train", data_dir)  # bad data fails before any actor starts
    spec = spec or ModelSpec(model, encoder, cache_dir=_abs(cache_dir), batch_size=batch_size)
    with ray_session(ray_address), CollectorPool(spec, n_actors=num_actors, cpus_per_actor=cpus_per_actor) as pool:
        return pool.build(task_list, db_uri=_abs_db(db_uri), token=token, data_dir=data_dir, fraction=fraction,
                          seed=seed, only_correct=only_correct, batch_size=batch_size, shard_size=shard_size,
                          calibrate=calibrate, show_progress=not quiet)


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


def eval_with_ray(
    tasks: Sequence[Task | str],
    *,
    config: EvalConfig,
    out_dir: str,
    command: str,
    model: str = DEFAULT_BACKBONE,
    encoder: str = DEFAULT_ENCODER,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    ray_address: str | None = None,
    cpus_per_task: float = 1.0,
    quiet: bool = False,
    spec: ModelSpec | None = None,
) -> tuple[list[dict], str]:
    """`raee eval --ray`: the tasks of `raee eval` run in parallel, one Ray task each with its own models.

    Writes results.json and results.md into out_dir as `raee eval` does and returns (results, markdown).
    With Milvus Lite every task gets its own database file
    (`<db stem>.<task>.db`: one Lite file has one owner process); with a server URI they share it. One GPU
    per task where the cluster has GPUs. Latency figures are measured while the other tasks run, so compare
    them within one run only."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from orchestration.report import markdown

    task_list = [get_task(t) if isinstance(t, str) else t for t in tasks]
    for task in task_list:  # bad data fails before anything starts
        load_split(task, "test", data_dir)
    spec = spec or ModelSpec(model, encoder, cache_dir=_abs(cache_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ray_session(ray_address):
        n_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(_evaluate_one).options(num_cpus=cpus_per_task, num_gpus=n_gpus, max_retries=1)
        refs = [remote.remote(spec, task.name, replace(config, db_uri=_task_db(config.db_uri, task.name)),
                              _abs(data_dir), str((out / "figures").resolve())) for task in task_list]
        pending = list(refs)
        with tqdm(total=len(refs), disable=quiet, desc="eval tasks", unit="task") as bar:
            while pending:  # short waits in a loop: a long evaluation is not a hang
                ready, pending = ray.wait(pending, num_returns=1, timeout=60)
                bar.update(len(ready))
        answers = ray.get(refs, timeout=600)
    results = [result for _, result in answers]
    header = {"model": spec.backbone if spec.factory is None else "custom", "encoder": answers[0][0],
              "command": command, **asdict(config)}
    (out / "results.json").write_text(json.dumps({"header": header, "tasks": results}, indent=1))
    text = markdown(results, header=header)
    (out / "results.md").write_text(text)
    return results, text


def _evaluate_one(spec: ModelSpec, task_name: str, config: EvalConfig, data_dir: str | None,
                  figure_dir: str) -> tuple[str, dict]:
    """One task's evaluation inside a Ray worker: (encoder name, TaskResult as a dict)."""
    from orchestration.evaluate import evaluate_task

    backbone, encoder = spec.load(n_threads=1)
    result = evaluate_task(get_task(task_name), backbone, encoder, config, data_dir=data_dir, quiet=True,
                           figure_dir=figure_dir)
    return encoder.name, result.to_dict()


def _task_db(db_uri: str, task_name: str) -> str:
    """Lite: <stem>.<task>.db beside db_uri (absolute); a server URI is shared."""
    if not is_lite_uri(db_uri):
        return db_uri
    root, ext = os.path.splitext(os.path.abspath(db_uri))
    return f"{root}.{task_name}{ext}"


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
    policy: str = "raee",
    policy_params: dict[str, float] | None = None,
    cache_dir: str | None = None,
    batch_size: int = 32,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.01,
    max_texts: int = 64,
    max_text_chars: int = 2000,
    cpus_per_replica: float = 1.0,
    fraction: float = 1.0,
    seed: int = 0,
    only_correct: bool = False,
    spec: ModelSpec | None = None,
) -> str:
    """`raee serve`: the HTTP API on host:port (127.0.0.1:8000 by default); prints the URL, blocks until Ctrl-C.

    fraction/seed/only_correct pick the database variant `raee build` wrote with the same options. Returns the
    URL after a clean stop (Serve shut down, and the local Ray cluster if this call started it)."""
    names = tuple(get_task(t).name if isinstance(t, str) else t.name for t in tasks)
    if is_lite_uri(db_uri) and not os.path.exists(db_uri):
        raise deployment.ServeSetupError(f"no exit database at {db_uri}; build it first: "
                                         f"raee build --task {','.join(names)}")
    spec = spec or ModelSpec(model, encoder, cache_dir=_abs(cache_dir), batch_size=batch_size)
    config = deployment.ServeConfig(tasks=names, db_uri=_abs_db(db_uri), token=token, k=k, tau=tau,
                                    exit_policy=policy, policy_params=dict(policy_params or {}),
                                    collection_suffix=variant_suffix(only_correct=only_correct, fraction=fraction,
                                                                     seed=seed))
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


def variant_suffix(*, only_correct: bool = False, fraction: float = 1.0, seed: int = 0) -> str:
    """What `variant_collection` appends to a collection name for these build options ("" for the full db)."""
    probe = ExitDBMeta(backbone="-", encoder="-", task="-", template_hash="-", n_layers=1, dim=1)
    return variant_collection(probe, only_correct=only_correct, fraction=fraction, seed=seed)[
        len(collection_name(probe)):]


def stop_serving() -> None:
    """Stop Serve on the connected cluster (the proxy, the controller and the replicas, which release the db)."""
    if ray.is_initialized():
        deployment.shutdown()


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (both end in a clean shutdown)."""
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Both installed explicitly: a process started in the background inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping raee serve", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _abs(path: str | None) -> str | None:
    """Workers run in another directory: relative paths must be made absolute in the driver."""
    return os.path.abspath(path) if path else path


def _abs_db(db_uri: str) -> str:
    return os.path.abspath(db_uri) if is_lite_uri(db_uri) else db_uri

