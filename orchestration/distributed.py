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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import ray
from tqdm.auto import tqdm

from collectors.build import BuildOptions
from collectors.ray_collect import DistributedBuild, build_on_ray, pool_shape
from inference_workers import deployment
from milvus.exit_db import is_lite_uri
from orchestration.pipelines import BuildSelector, RayOptions, choose_build
from raee.exit_policy import DEFAULT_POLICY
from raee.spec import ModelSpec
from raee.tasks import DATA_DIR_ENV, Task

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


def build_with_ray(tasks: Sequence[Task], *, model: ModelSpec, db_uri: str = "./raee.db",
                   options: BuildOptions | None = None, token: str | None = None, data_dir: str | None = None,
                   ray_options: RayOptions | None = None, quiet: bool = False) -> DistributedBuild:
    """`raee build --ray`: every task's training file streamed through an actor pool (Ray Data) into Milvus.

    One actor per GPU when the cluster has GPUs, else num_actors CPU actors (default: CPUs - 1). With Milvus
    Lite the driver is the single writer; with a server URI the actors write directly. Resumable; checked
    counts. The tasks travel to the actors as objects."""
    ray_options = ray_options or RayOptions()
    spec = replace(model, cache_dir=_abs(model.cache_dir))
    with ray_session(ray_options.address):
        shape = pool_shape(ray_options.num_actors, ray_options.cpus_per_actor)
        return build_on_ray(list(tasks), spec=spec, db_uri=_abs_db(db_uri), options=options,
                            data_dir=_data_dir(data_dir), token=token, shape=shape, show_progress=not quiet)


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
                 f"{result.n_actors} actors; {result.n_batches} batches, {result.n_resumed} examples already stored")
    return lines


def eval_with_ray(tasks: Sequence[Task], *, config: EvalConfig, out_dir: str, command: str, model: ModelSpec,
                  data_dir: str | None = None, ray_options: RayOptions | None = None, cpus_per_task: float = 1.0,
                  quiet: bool = False) -> tuple[list[dict], str]:
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

    spec = replace(model, cache_dir=_abs(model.cache_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ray_session((ray_options or RayOptions()).address):
        n_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(_evaluate_one).options(num_cpus=cpus_per_task, num_gpus=n_gpus, max_retries=1)
        refs = [remote.remote(spec, task, replace(config, db_uri=_task_db(config.db_uri, task.name)),
                              _data_dir(data_dir), str((out / "figures").resolve())) for task in tasks]
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


def _evaluate_one(spec: ModelSpec, task: Task, config: EvalConfig, data_dir: str | None,
                  figure_dir: str) -> tuple[str, dict]:
    """One task's evaluation inside a Ray worker: (encoder name, TaskResult as a dict)."""
    from orchestration.evaluate import evaluate_task

    backbone, encoder = spec.load(n_threads=1)
    result = evaluate_task(task, backbone, encoder, config, data_dir=data_dir, quiet=True, figure_dir=figure_dir)
    return encoder.name, result.to_dict()


def _task_db(db_uri: str, task_name: str) -> str:
    """Lite: <stem>.<task>.db beside db_uri (absolute); a server URI is shared."""
    if not is_lite_uri(db_uri):
        return db_uri
    root, ext = os.path.splitext(os.path.abspath(db_uri))
    return f"{root}.{task_name}{ext}"


@dataclass(frozen=True)
class ServeOptions:
    """How `raee serve` runs: where it listens, how many replicas, its request limits and default policy."""

    host: str = deployment.DEFAULT_HOST
    port: int = deployment.DEFAULT_PORT
    replicas: int = 1
    cpus_per_replica: float = 1.0
    limits: deployment.Limits = field(default_factory=deployment.Limits)
    policy: str = DEFAULT_POLICY
    knobs: dict[str, float] = field(default_factory=dict)  # k, tau, beta, slack
    neighbour_texts: str = "off"  # who sees neighbours' training texts: off, key ($RAEE_TEXT_KEY) or on
    write_token: str | None = field(default=None, repr=False)  # Milvus token POST /v1/examples writes with


def serve(tasks: Sequence[Task], *, model: ModelSpec, db_uri: str = "./raee.db", token: str | None = None,
          selector: BuildSelector | None = None, options: ServeOptions | None = None,
          ray_address: str | None = None) -> str:
    """`raee serve`: the HTTP API on host:port (127.0.0.1:8000 by default); prints the URL, blocks until Ctrl-C.

    Each task's build is chosen here, before anything starts (choose_build); the replicas receive the task
    objects and the collection names. Returns the URL after a clean stop (Serve shut down, and the local Ray
    cluster if this call started it)."""
    options = options or ServeOptions()
    collections = {task.name: choose_build(db_uri, task, model=model, token=token, selector=selector).collection
                   for task in tasks}
    spec = replace(model, cache_dir=_abs(model.cache_dir))
    from collectors.build import add_examples

    config = deployment.ServeConfig(tasks=tuple(tasks), collections=collections, db_uri=_abs_db(db_uri),
                                    token=token, policy=options.policy, knobs=dict(options.knobs),
                                    neighbour_texts=options.neighbour_texts, write_token=options.write_token,
                                    recorder=add_examples)
    names = ", ".join(task.name for task in tasks)
    with ray_session(ray_address):
        try:
            app = deployment.build_app(spec, config, replicas=options.replicas,
                                       cpus_per_replica=options.cpus_per_replica, limits=options.limits)
            url = deployment.start_http(host=options.host, port=options.port)
            deployment.run_app(app)
            adds = ", POST /v1/examples" if os.environ.get(deployment.WRITE_KEY_ENV) else ""
            print(f"raee serving {names} at {url} (POST /v1/classify{adds}, GET /healthz, GET /openapi.json; default "
                  f"policy {options.policy}; neighbour texts {options.neighbour_texts}); Ctrl-C stops it", flush=True)
            if options.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"warning: {options.host} is not loopback and the API has no authentication", file=sys.stderr)
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


def _data_dir(data_dir: str | None) -> str | None:
    """The data folder as an absolute path (from $RAEE_DATA_DIR when not given): workers run elsewhere."""
    return _abs(data_dir or os.environ.get(DATA_DIR_ENV))

