"""Paper Algorithm 3.1 on a Ray cluster: a pool of collector actors working through shards of the training data.

Each actor loads the backbone and key encoder once (from a picklable `ModelSpec`) and then runs the same
per-batch code as the in-process collector (`collectors.build`) on every shard it is given, so the records
are the same ids and the same values. Where the records go depends on the database:

- Milvus server URI (`http://...`): each actor upserts its own records; the driver only counts.
- Milvus Lite (`*.db`): one process may own the file, so actors return their records and the driver is the
  single writer.

Resuming is cheap and safe: record ids are deterministic and writes are upserts, so the driver skips shards
whose ids are all stored already and any shard may be run twice. (With only_correct a shard is skipped only
when all its examples were kept, so most shards of such a build run again, harmlessly.) A killed actor is
restarted by Ray (`max_restarts`) and its unfinished shards are retried (`max_task_retries`). At the end
the driver checks that every collection holds exactly the records this build should have written, and only
then switches the build's alias to the version it wrote (milvus/versions.py, as `build_database` does).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import ray
from tqdm.auto import tqdm

from collectors.build import (
    BuildOptions,
    BuildSummary,
    build_rows,
    carry_over,
    data_digest,
    fit_head,
    prepare,
    record_batches,
    summarize,
)
from milvus.exit_db import BuildVariant, ExitDB, ExitDBMeta, is_lite_uri
from milvus.versions import BuildTarget, begin_version, finish_version
from raee.calibration import Calibration, fit_calibration
from raee.heads import ExitHead
from raee.records import ExitRecords, record_ids
from raee.spec import ModelSpec
from raee.tasks import Dataset, Task, get_task, load_split

log = logging.getLogger(__name__)


class CollectionError(RuntimeError):
    """A distributed build could not finish: actors unschedulable, a shard out of retries, or a wrong count."""


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one task's training examples in build order; the task travels with it."""

    task: Task
    split: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.task.name}[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class ShardResult:
    """What an actor hands back for one shard; records only when the driver is the writer (Milvus Lite)."""

    shard: Shard
    n_records: int  # records kept (fewer than len(shard) with only_correct)
    n_no_correct: int  # examples no layer classifies correctly
    n_full_correct: int  # examples the last layer classifies correctly
    records: ExitRecords | None
    pid: int  # the actor process that did the work (tests kill it)


@dataclass(frozen=True)
class _ServerTarget:
    """Where an actor writes directly: a Milvus server collection (never a Lite file)."""

    uri: str
    token: str | None
    collection: str
    meta: ExitDBMeta
    variant: BuildVariant


@dataclass(frozen=True)
class DistributedBuild:
    """One `CollectorPool.build`: a BuildSummary per task (as the in-process build returns) and the shard counts."""

    summaries: tuple[BuildSummary, ...]
    n_actors: int
    n_shards: int
    n_shards_skipped: int  # complete in the database before this run (resumed builds)
    seconds: float


class _Collector:
    """One actor: backbone and encoder loaded once, then any number of shards."""

    def __init__(self, spec: ModelSpec, n_threads: int) -> None:
        self.backbone, self.encoder = spec.load(n_threads=n_threads)
        self._dbs: dict[tuple[str, str], ExitDB] = {}

    def pid(self) -> int:
        return os.getpid()

    def location(self) -> tuple[str, str, int]:
        """(node id, node IP, pid): where this actor runs."""
        context = ray.get_runtime_context()
        return context.get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def prepare(self, task: Task, dataset: Dataset, options: BuildOptions,
                head: ExitHead | None) -> tuple[Dataset, ExitDBMeta, str]:
        """collectors.build.prepare with this actor's models: (examples in build order, meta, collection)."""
        return prepare(self.backbone, self.encoder, task, dataset, options, head)

    def fit_head(self, data: Dataset, options: BuildOptions) -> tuple[ExitHead, np.ndarray]:
        """collectors.build.fit_head on this actor: (off-ramps, the sample's cross-fitted distributions)."""
        return fit_head(self.backbone, data, options)

    def layer_probs(self, data: Dataset) -> np.ndarray:
        """Raw per-layer label distributions (N, L+1, C): what the driver fits a calibration on."""
        return self.backbone.layer_probs(data.texts, data.task, pairs=data.pairs)

    def collect(self, shard: Shard, data: Dataset, *, only_correct: bool, batch_size: int,
                target: _ServerTarget | None, head: ExitHead | None = None,
                known: np.ndarray | None = None) -> ShardResult:
        """Records of one shard; upserted here when target is a server, else returned to the driver.

        head: read layers through it (off-ramps); known: distributions of the build's first rows (the
        off-ramps' cross-fitted sample), used for the shard's rows they cover."""
        part = data.take(np.arange(shard.start, shard.stop))
        known_part = known[shard.start : shard.stop] if known is not None and shard.start < len(known) else None
        kept: list[ExitRecords] = []
        n_no_correct = n_full_correct = 0
        for records, probs in record_batches(self.backbone, self.encoder, part, batch_size=batch_size,
                                             only_correct=only_correct, head=head, known_probs=known_part):
            kept.append(records)
            n_no_correct += int((probs == 0).all(axis=1).sum())
            n_full_correct += int((probs[:, -1] > 0).sum())
        records = _concat(kept, self.encoder.dim, self.backbone.n_layers)
        if target is not None:
            self._db(target).upsert(records)
        return ShardResult(shard, len(records), n_no_correct, n_full_correct,
                           None if target is not None else records, os.getpid())

    def _db(self, target: _ServerTarget) -> ExitDB:
        key = (target.uri, target.collection)
        if key not in self._dbs:
            self._dbs[key] = ExitDB(target.uri, collection=target.collection, meta=target.meta,
                                    variant=target.variant, create=False, token=target.token)
        return self._dbs[key]


def _concat(parts: list[ExitRecords], dim: int, n_layers: int) -> ExitRecords:
    if not parts:
        return ExitRecords(np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                           np.zeros((0, n_layers + 1), np.float32), np.zeros(0, np.int64), ())
    return ExitRecords(
        ids=np.concatenate([p.ids for p in parts]),
        vectors=np.concatenate([p.vectors for p in parts]),
        exit_probs=np.concatenate([p.exit_probs for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        texts=tuple(t for p in parts for t in p.texts),
        layer_probs=(np.concatenate([p.layer_probs for p in parts])
                     if all(p.layer_probs is not None for p in parts) else None),
    )


@dataclass
class _Plan:
    """One task's share of a build: its data in the object store, its collection and its shards."""

    task: Task
    split: str
    n_examples: int
    example_idx: np.ndarray  # (n_examples,) index of each example in the full split (record ids)
    data_ref: ray.ObjectRef
    collection: str
    meta: ExitDBMeta
    variant: BuildVariant
    shards: list[Shard]
    db: ExitDB
    calibration: Calibration | None = None
    head_ref: ray.ObjectRef | None = None  # the off-ramps of a head="offramp" build
    known_ref: ray.ObjectRef | None = None  # their cross-fitted distributions for the build's first rows
    n_records: int = 0
    n_no_correct: int = 0
    n_full_correct: int = 0
    target: BuildTarget | None = None  # the version written and the alias it is switched in under


class CollectorPool:
    """A pool of collector actors on the connected Ray cluster; reuse it for several builds, then `close()`.

    One actor per GPU (num_gpus=1 each) when the cluster has GPUs, else `n_actors` CPU actors (default: one
    per `cpus_per_actor` of the cluster's CPUs) with one torch thread each. Creating the pool waits (up to
    ready_timeout_s) until every actor has loaded its models, so an unschedulable pool fails here, clearly.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        n_actors: int | None = None,
        cpus_per_actor: float = 1.0,
        n_threads: int = 1,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        ready_timeout_s: float = 300.0,
    ) -> None:
        if not ray.is_initialized():
            raise CollectionError("Ray is not initialised; call ray.init(...) first (or use build_with_ray)")
        resources = ray.cluster_resources()
        n_gpus, n_cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        if n_gpus:
            n_actors = n_actors or n_gpus
            if n_actors > n_gpus:
                raise CollectionError(f"{n_actors} actors need one GPU each but the cluster has {n_gpus}; "
                                      "use --num-actors <= the number of GPUs")
            options = {"num_gpus": 1, "num_cpus": min(cpus_per_actor, n_cpus / n_actors)}
        else:
            n_actors = n_actors or max(1, int(n_cpus // cpus_per_actor))
            options = {"num_cpus": cpus_per_actor}
            free = float(ray.available_resources().get("CPU", 0))
            if n_actors * cpus_per_actor > n_cpus + 1e-9:
                raise CollectionError(f"{n_actors} actors x {cpus_per_actor} CPUs exceed the cluster's {n_cpus:g} "
                                      "CPUs; use fewer actors or a smaller cpus_per_actor")
            if n_actors * cpus_per_actor > free + 1e-9:
                raise CollectionError(f"{n_actors} actors x {cpus_per_actor} CPUs need more than the {free:g} free "
                                      f"of the cluster's {n_cpus:g} CPUs (other actors or Serve replicas hold the "
                                      "rest); use fewer actors or a smaller cpus_per_actor")
        self.spec = spec
        self.uses_gpus = bool(n_gpus)
        remote = ray.remote(_Collector).options(max_restarts=max_restarts, max_task_retries=max_task_retries,
                                                **options)
        self.actors = [remote.remote(spec, n_threads) for _ in range(n_actors)]
        try:
            self.pids(timeout_s=ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def pids(self, *, timeout_s: float = 600.0) -> list[int]:
        """Process id of every actor (waits for queued shards: call it between builds)."""
        refs = [actor.pid.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            raise CollectionError(f"only {len(ready)} of {len(refs)} collector actors started within {timeout_s:g} s "
                                  f"(cluster resources: {ray.cluster_resources()}); use fewer actors")
        return ray.get(refs, timeout=timeout_s)

    def locations(self, *, timeout_s: float = 600.0) -> list[tuple[str, str, int]]:
        """(node id, node IP, pid) of every actor (waits for queued shards: call it between builds)."""
        return ray.get([actor.location.remote() for actor in self.actors], timeout=timeout_s)

    def build(
        self,
        tasks: Sequence[Task | str],
        *,
        db_uri: str = "./raee.db",
        options: BuildOptions | None = None,
        datasets: Mapping[str, Dataset] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        token: str | None = None,
        shard_size: int = 512,
        timeout_s: float = 1800.0,
        show_progress: bool = True,
        on_shard: Callable[[ShardResult], None] | None = None,
    ) -> DistributedBuild:
        """Build (or complete) the exit database of every task's training split with the pool's actors.

        Same collections, ids, records and calibration as `collectors.build.build_database` with the same
        options (one actor runs the calibration sample first; its shards run again). datasets: {task name:
        Dataset} instead of the train split under data_dir. timeout_s bounds the wait for any one shard.
        on_shard is called in the driver after each shard is stored."""
        options = options or BuildOptions()
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        task_list = [get_task(t) for t in tasks]
        start = time.perf_counter()
        plans: list[_Plan] = []
        try:
            for task in task_list:
                given = (datasets or {}).get(task.name)
                dataset = given if given is not None else load_split(task, "train", data_dir)
                plans.append(self._plan(task, dataset, options, db_uri=db_uri, token=token, shard_size=shard_size,
                                        timeout_s=timeout_s))
            n_skipped = self._run(plans, db_uri=db_uri, token=token, options=options, timeout_s=timeout_s,
                                  show_progress=show_progress, on_shard=on_shard)
            seconds = time.perf_counter() - start
            summaries = tuple(self._finish(plan, seconds, token) for plan in plans)
        finally:
            for plan in plans:
                plan.db.close()
        return DistributedBuild(summaries, len(self.actors), sum(len(p.shards) for p in plans), n_skipped, seconds)

    def close(self) -> None:
        """Kill the actors (their models go with them)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> CollectorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers ----------------------------------------------------------------------------------------

    def _plan(self, task: Task, dataset: Dataset, options: BuildOptions, *, db_uri: str, token: str | None,
              shard_size: int, timeout_s: float) -> _Plan:
        head = known = None
        if options.head == "offramp":  # fitted on one actor from the sample's states; the rest use it
            ordered = dataset.take(build_rows(dataset, options.variant))
            head, known = ray.get(self.actors[0].fit_head.remote(ordered, options), timeout=timeout_s)
        data, meta, collection = ray.get(self.actors[0].prepare.remote(task, dataset, options, head),
                                         timeout=timeout_s)
        if not len(data):
            raise CollectionError(f"task {task.name} has no training examples to build from")
        n_cal = min(options.calibration_examples, len(data))
        if known is not None and len(known) >= n_cal:
            calibration = fit_calibration(known[:n_cal])
        else:
            calibration = fit_calibration(ray.get(self.actors[0].layer_probs.remote(data.take(np.arange(n_cal))),
                                                  timeout=timeout_s))
        target = begin_version(db_uri, collection, meta, options.variant, data_digest=data_digest(data), token=token)
        collection = target.collection
        db = ExitDB(db_uri, collection=collection, meta=meta, variant=options.variant, token=token,
                    index=options.index, calibration=calibration, properties=target.properties)  # created once, here
        if head is not None:
            db.put_blob("head", head.to_bytes())
        data_ref = ray.put(data)  # shared by every shard of the task
        shards = [Shard(task, data.split, lo, min(lo + shard_size, len(data)))
                  for lo in range(0, len(data), shard_size)]
        return _Plan(task, data.split, len(data), data.example_idx, data_ref, collection, meta, options.variant,
                     shards, db, db.calibration, None if head is None else ray.put(head),
                     None if known is None else ray.put(known), target=target)

    def _run(self, plans: list[_Plan], *, db_uri: str, token: str | None, options: BuildOptions, timeout_s: float,
             show_progress: bool, on_shard: Callable[[ShardResult], None] | None) -> int:
        """Submit every unfinished shard round-robin, then store results as they arrive; returns shards skipped."""
        lite = is_lite_uri(db_uri)
        pending: dict[ray.ObjectRef, _Plan] = {}
        n_skipped = n_done_examples = 0
        for plan in plans:
            target = None if lite else _ServerTarget(db_uri, token, plan.collection, plan.meta, plan.variant)
            for shard in plan.shards:
                if self._complete(plan, shard, plan.example_idx[shard.start : shard.stop]):
                    n_skipped += 1
                    n_done_examples += len(shard)
                    continue
                actor = self.actors[len(pending) % len(self.actors)]
                ref = actor.collect.remote(shard, plan.data_ref, only_correct=options.only_correct,
                                           batch_size=options.batch_size, target=target, head=plan.head_ref,
                                           known=plan.known_ref)
                pending[ref] = plan
        total = sum(p.n_examples for p in plans)
        with tqdm(total=total, initial=n_done_examples, disable=not show_progress, unit="ex",
                  desc=f"build x{len(self.actors)} actors") as bar:
            waiting = list(pending)
            try:
                while waiting:
                    ready, waiting = ray.wait(waiting, num_returns=1, timeout=timeout_s)
                    if not ready:
                        raise CollectionError(f"no shard finished within {timeout_s:g} s ({len(waiting)} pending); "
                                              "re-run to resume, finished shards are kept")
                    result = self._store(pending[ready[0]], ready[0], timeout_s)
                    bar.update(len(result.shard))
                    if on_shard is not None:
                        on_shard(result)
            except BaseException:
                for ref in waiting:  # leave the pool idle for the next build
                    ray.cancel(ref)
                raise
        return n_skipped

    @staticmethod
    def _store(plan: _Plan, ref: ray.ObjectRef, timeout_s: float) -> ShardResult:
        """Fetch one finished shard; with Lite write its records (the driver is the only writer); tally it."""
        try:
            result: ShardResult = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayError as exc:
            raise CollectionError(f"a {plan.task.name} shard failed after its retries ({exc}); "
                                  "re-run to resume, finished shards are kept") from exc
        if result.records is not None:
            plan.db.upsert(result.records)
        plan.n_records += result.n_records
        plan.n_no_correct += result.n_no_correct
        plan.n_full_correct += result.n_full_correct
        return result

    @staticmethod
    def _complete(plan: _Plan, shard: Shard, example_idx: np.ndarray) -> bool:
        """True when every record of the shard is stored; its statistics then come from the stored rows."""
        stored = plan.db.get(record_ids(plan.task.name, shard.split, example_idx))
        if len(stored) < len(shard):
            return False
        plan.n_records += len(stored)
        plan.n_no_correct += int((stored.exit_probs == 0).all(axis=1).sum())
        plan.n_full_correct += int((stored.exit_probs[:, -1] > 0).sum())
        return True

    @staticmethod
    def _finish(plan: _Plan, seconds: float, token: str | None) -> BuildSummary:
        """Carry added examples over, flush, check the collection holds exactly this build's records, switch."""
        n_added = carry_over(plan.db.uri, plan.target, plan.db, token=token)
        plan.db.flush()
        n_in_db = plan.db.count()
        if n_in_db != plan.n_records + n_added:
            raise CollectionError(
                f"collection {plan.collection!r} holds {n_in_db} records but this {plan.task.name} build wrote "
                f"{plan.n_records} for {plan.n_examples} examples (and {n_added} added examples); records from "
                "another build are mixed in (drop the collection or use another database)")
        finish_version(plan.db.uri, plan.target, expected=n_in_db, counted=n_in_db, token=token)
        log.info("%s: %d records in %s for %d examples", plan.task.name, n_in_db, plan.collection, plan.n_examples)
        summary = summarize(plan.task, plan.target.name, plan.variant, plan.n_examples, plan.n_records, n_in_db,
                            plan.n_no_correct, plan.n_full_correct, seconds)
        return replace(summary, version=plan.collection)
