"""Paper Algorithm 3.1 on a Ray cluster with Ray Data: the split streams through an actor pool into Milvus.

Per task (collectors/stream.py has the reading side):

    SplitSource (the spec's reader, blocks)  ->  map_batches(_Collector, ActorPoolStrategy(size=n))  ->  Milvus

- The driver never holds the split: it scans the file twice for the count, the data digest and the
  calibration / off-ramp sample, then consumes only what the actors hand back.
- `_Collector` loads the backbone and key encoder once per actor and runs the in-process collector's own
  per-batch function (`collectors.build.collect_batch`), so ids (task, split, file position) and values are
  the in-process build's. The sample's distributions are computed once, in a Ray task that also fits the
  off-ramps and the calibration, and looked up by the actors for the sample's rows, as in process.
- Writes: with a Milvus server URI each actor upserts its batch itself and returns one row of tallies; with
  Milvus Lite (one owning process) actors return the record columns and the driver is the single writer.
  Either way records reach Milvus batch by batch as they stream, under Ray Data's back-pressure.
- Resume: the driver reads the stored ids of the version it writes once, page by page (`ExitDB.scan`), and
  the source leaves those rows out; their tallies come from the stored exit sets. Writes are upserts by
  deterministic id, so a batch that runs twice rewrites the same rows.
- Faults: Ray Data restarts a killed actor and retries its batches (`max_restarts`/`max_task_retries` -1):
  nothing is lost, and nothing is duplicated because ids are deterministic. A stall longer than timeout_s
  stops the build with an error that says to re-run it.
- Checked: flush, then the Strong count must equal the records this build stands for; only then the alias
  is switched to the version (milvus/versions.py), as `build_database` does.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import ray
from tqdm.auto import tqdm

from collectors.build import BuildOptions, BuildSummary, carry_over, collect_batch, fit_head, prepare, summarize
from collectors.stream import SplitScan, SplitSource, batch_dataset, in_sorted, scan_split
from milvus.exit_db import ExitDB, ExitDBMeta, is_lite_uri
from milvus.index import choose_index
from milvus.versions import BuildTarget, begin_version, finish_version
from raee.calibration import fit_calibration
from raee.heads import ExitHead
from raee.records import ExitRecords, record_ids
from raee.spec import ModelSpec
from raee.tasks import Dataset, Task, get_task

log = logging.getLogger(__name__)

READ_CPUS = 0.25  # the one read task; actors leave room for it (2 actors x 1 CPU on 2 CPUs deadlocked)
_TALLIES = ("n_examples", "n_records", "n_no_correct", "n_full_correct", "pid")


class CollectionError(RuntimeError):
    """A distributed build could not finish: actors unschedulable, a stalled stream, or a wrong count."""


@dataclass(frozen=True)
class PoolShape:
    """How wide a build runs: n_actors, each with cpus (and one GPU when the cluster has GPUs)."""

    n_actors: int
    cpus: float
    gpus: int


@dataclass(frozen=True)
class DistributedBuild:
    """One `build_on_ray`: a BuildSummary per task (as the in-process build returns) and how it ran."""

    summaries: tuple[BuildSummary, ...]
    n_actors: int
    n_batches: int  # batches that went through the actors in this run
    n_resumed: int  # examples whose records were stored before this run (resumed builds)
    seconds: float


def pool_shape(n_actors: int | None = None, cpus_per_actor: float | None = None) -> PoolShape:
    """One actor per GPU when the cluster has GPUs, else n_actors CPU actors (default: CPUs - 1, at least 1).

    cpus_per_actor defaults to what leaves one CPU for reading and writing (at most 1 each). A pool that cannot
    be scheduled next to the read task is a CollectionError now, not a hung stream later."""
    resources = ray.cluster_resources()
    n_gpus, n_cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if n_gpus:
        n_actors = n_actors or n_gpus
        if n_actors > n_gpus:
            raise CollectionError(f"{n_actors} actors need one GPU each but the cluster has {n_gpus}; "
                                  "use --num-actors <= the number of GPUs")
    n_actors = n_actors or max(1, int(n_cpus) - 1)
    cpus = cpus_per_actor if cpus_per_actor is not None else min(1.0, max(n_cpus - 1.0, n_cpus / 2) / n_actors)
    if n_actors * cpus + READ_CPUS > n_cpus + 1e-9:
        raise CollectionError(f"{n_actors} actors x {cpus:g} CPUs plus {READ_CPUS:g} for the read task exceed the "
                              f"cluster's {n_cpus:g} CPUs; use fewer actors or a smaller cpus_per_actor")
    return PoolShape(n_actors, cpus, 1 if n_gpus else 0)


def build_on_ray(tasks: Sequence[Task | str], *, spec: ModelSpec, db_uri: str = "./raee.db",
                 options: BuildOptions | None = None, data_dir: str | None = None, token: str | None = None,
                 shape: PoolShape | None = None, block_rows: int = 4096, timeout_s: float = 1800.0,
                 show_progress: bool = True, on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
                 ) -> DistributedBuild:
    """Build (or complete) the exit database of every task's training file on the connected Ray cluster.

    Same collections, ids, records and calibration as `collectors.build.build_database` with the same options.
    timeout_s bounds the wait for the sample task and for any one batch of the stream; on_batch sees each
    batch of tallies (and records on Lite) in the driver after it is stored."""
    if not ray.is_initialized():
        raise CollectionError("Ray is not initialised; call ray.init(...) first (or use build_with_ray)")
    options = options or BuildOptions()
    shape = shape or pool_shape()
    start = time.perf_counter()
    summaries, n_batches, n_resumed = [], 0, 0
    for task in (get_task(t) for t in tasks):
        summary, batches, resumed = _build_task(task, spec=spec, db_uri=db_uri, options=options, data_dir=data_dir,
                                                token=token, shape=shape, block_rows=block_rows, timeout_s=timeout_s,
                                                show_progress=show_progress, on_batch=on_batch)
        summaries.append(summary)
        n_batches, n_resumed = n_batches + batches, n_resumed + resumed
    return DistributedBuild(tuple(summaries), shape.n_actors, n_batches, n_resumed, time.perf_counter() - start)


class _Collector:
    """The map_batches UDF: models loaded once per actor, then the in-process per-batch collector on each batch."""

    def __init__(self, spec: ModelSpec, task: Task, options: BuildOptions, head: ExitHead | None,
                 known: tuple[np.ndarray, np.ndarray], target: _ServerTarget | None) -> None:
        self.backbone, self.encoder = spec.load(n_threads=1)
        self.task, self.options, self.head = task, options, head
        self.known_pos, self.known_probs = known  # (S,) sorted split positions, (S, L+1, C)
        self.db = None if target is None else ExitDB(target.uri, collection=target.collection, meta=target.meta,
                                                     variant=options.variant, create=False, token=target.token)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        part = batch_dataset(self.task, batch)
        pos = np.asarray(batch["pos"], np.int64)
        known = in_sorted(pos, self.known_pos)  # (b,) rows of the sample, whose distributions came with the actor
        records, probs = collect_batch(self.backbone, self.encoder, part, head=self.head,
                                       known_probs=self.known_probs[np.searchsorted(self.known_pos, pos[known])],
                                       known=known,
                                       only_correct=self.options.only_correct)
        no_correct, full_correct = (probs == 0).all(axis=1), probs[:, -1] > 0  # (b,), (b,)
        if self.db is not None:  # a server: write here, hand back one row of tallies
            self.db.upsert(records)
            return {"n_examples": np.array([len(part)]), "n_records": np.array([len(records)]),
                    "n_no_correct": np.array([no_correct.sum()]), "n_full_correct": np.array([full_correct.sum()]),
                    "pid": np.array([os.getpid()])}
        kept = np.isin(record_ids(self.task.name, "train", part.example_idx), records.ids)  # (b,)
        full = collect_columns(records, kept)
        return {"n_examples": np.ones(len(part), np.int64), "n_records": kept.astype(np.int64),
                "n_no_correct": no_correct.astype(np.int64), "n_full_correct": full_correct.astype(np.int64),
                "pid": np.full(len(part), os.getpid()), **full}


def collect_columns(records: ExitRecords, kept: np.ndarray) -> dict[str, np.ndarray]:
    """Record columns for every example of a batch (rows where kept is False hold zeros, and are not written)."""
    n, rows = len(kept), np.flatnonzero(kept)

    def spread(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n, *values.shape[1:]), values.dtype)
        out[rows] = values
        return out

    texts = np.full(n, "", dtype=object)
    texts[rows] = list(records.texts)
    return {"id": spread(records.ids), "vector": spread(records.vectors), "exit_probs": spread(records.exit_probs),
            "label": spread(records.labels), "text": texts, "layer_probs": spread(records.layer_probs)}


def _records(batch: dict[str, np.ndarray]) -> ExitRecords:
    rows = np.flatnonzero(batch["n_records"] > 0)
    return ExitRecords(ids=batch["id"][rows], vectors=batch["vector"][rows], exit_probs=batch["exit_probs"][rows],
                       labels=batch["label"][rows], texts=tuple(str(t) for t in batch["text"][rows]),
                       layer_probs=batch["layer_probs"][rows])


@dataclass(frozen=True)
class _ServerTarget:
    """Where actors write directly: a Milvus server collection (never a Lite file)."""

    uri: str
    token: str | None
    collection: str
    meta: ExitDBMeta


def _sample_task(spec: ModelSpec, task: Task, sample: Dataset, options: BuildOptions,
                 ) -> tuple[ExitDBMeta, str, ExitHead | None, np.ndarray]:
    """In a Ray task: (meta, collection name, off-ramps or None, the sample's layer distributions).

    The off-ramps are fitted on the sample and its distributions cross-fitted, as in process; else the
    distributions are the LM head's on the calibration sample."""
    backbone, encoder = spec.load(n_threads=1)
    head = known = None
    if options.head == "offramp":
        head, known = fit_head(backbone, sample, options)
    _, meta, name = prepare(backbone, encoder, task, sample, options, head)
    if known is None:
        cal = sample.take(np.arange(min(options.calibration_examples, len(sample))))
        known = backbone.layer_probs(cal.texts, task, pairs=cal.pairs)
    return meta, name, head, np.asarray(known, np.float32)


def _build_task(task: Task, *, spec: ModelSpec, db_uri: str, options: BuildOptions, data_dir: str | None,
                token: str | None, shape: PoolShape, block_rows: int, timeout_s: float, show_progress: bool,
                on_batch: Callable[[dict[str, np.ndarray]], None] | None) -> tuple[BuildSummary, int, int]:
    start = time.perf_counter()
    n_sample = max(options.calibration_examples, options.offramp_examples if options.head == "offramp" else 0)
    scan = scan_split(task, options.variant, n_sample=n_sample, data_dir=data_dir)
    if not scan.n_examples:
        raise CollectionError(f"task {task.name} has no training examples to build from")
    remote = ray.remote(_sample_task).options(num_cpus=shape.cpus, num_gpus=shape.gpus, max_retries=2)
    meta, name, head, known = ray.get(remote.remote(spec, task, scan.sample, options), timeout=timeout_s)
    log.info("%s: scanned %d examples and fitted the sample in %.1f s", task.name, scan.n_examples,
             time.perf_counter() - start)
    calibration = fit_calibration(known[: min(options.calibration_examples, len(known))])
    target = begin_version(db_uri, name, meta, options.variant, data_digest=scan.digest, token=token)
    with ExitDB(db_uri, collection=target.collection, meta=meta, variant=options.variant, token=token,
                index=choose_index(options.index, scan.n_examples), calibration=calibration,
                properties=target.properties) as db:
        if head is not None:
            db.put_blob("head", head.to_bytes())
        tally, stored = _stored(db, task, scan)
        todo = scan.n_examples - tally["n_examples"]
        n_batches = 0
        if todo:
            server = None if is_lite_uri(db_uri) else _ServerTarget(db_uri, token, target.collection, meta)
            order = np.argsort(scan.sample_pos[: len(known)])
            known_sorted = (scan.sample_pos[: len(known)][order], known[order])
            stream = _stream(task, spec, options, head, known_sorted, server, scan, stored, shape, data_dir,
                             block_rows)
            with tqdm(total=scan.n_examples, initial=tally["n_examples"], disable=not show_progress, unit="ex",
                      desc=f"build {task.name} x{shape.n_actors} actors", smoothing=0.05) as bar:
                for batch in _with_timeout(stream, timeout_s, task.name):
                    if server is None:
                        db.upsert(_records(batch))
                    for key in _TALLIES[:-1]:
                        tally[key] += int(batch[key].sum())
                    n_batches += 1
                    bar.update(int(batch["n_examples"].sum()))
                    if on_batch is not None:
                        on_batch(batch)
        log.info("%s: streamed %d examples by %.1f s", task.name, todo, time.perf_counter() - start)
        n_added = carry_over(db_uri, target, db, token=token)
        db.flush()
        n_in_db = db.count()
        index = db.index.describe()
    log.info("%s: flushed and counted by %.1f s", task.name, time.perf_counter() - start)
    summary = _finish(task, scan, target, tally, n_added, n_in_db, db_uri, token, options,
                      time.perf_counter() - start)
    return replace(summary, index=index), n_batches, scan.n_examples - todo


def _stream(task: Task, spec: ModelSpec, options: BuildOptions, head: ExitHead | None,
            known: tuple[np.ndarray, np.ndarray], server: _ServerTarget | None, scan: SplitScan, stored: np.ndarray,
            shape: PoolShape, data_dir: str | None, block_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data pipeline of one task: read -> actor pool -> batches of tallies (and records on Lite)."""
    from ray.data import ActorPoolStrategy, DataContext, read_datasource

    DataContext.get_current().enable_progress_bars = False  # the driver's one bar counts examples
    source = SplitSource(task, data_dir=data_dir, subset=scan.subset, stored=stored, block_rows=block_rows)
    data = read_datasource(source, num_cpus=READ_CPUS).map_batches(
        _Collector, batch_size=options.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=shape.n_actors), num_cpus=shape.cpus, num_gpus=shape.gpus,
        fn_constructor_kwargs={"spec": spec, "task": task, "options": options, "head": head, "known": known,
                               "target": server})
    return data.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)


def _stored(db: ExitDB, task: Task, scan: SplitScan) -> tuple[dict[str, int], np.ndarray]:
    """(tallies of this build's records already stored, their ids sorted): one paged scan, no request per id."""
    tally = dict.fromkeys(_TALLIES[:-1], 0)
    found: list[np.ndarray] = []
    if not db.count():
        return tally, np.zeros(0, np.int64)
    base = record_ids(task.name, "train", np.zeros(1, np.int64))[0]
    for ids, exit_probs in db.scan():
        mine = (ids >= base) & (ids < base + scan.n_split)  # this task's training rows, not added examples
        ids, exit_probs = ids[mine], exit_probs[mine]
        if scan.subset is not None:
            inside = in_sorted(ids - base, scan.subset)
            ids, exit_probs = ids[inside], exit_probs[inside]
        found.append(ids)
        tally["n_examples"] += len(ids)
        tally["n_records"] += len(ids)
        tally["n_no_correct"] += int((exit_probs == 0).all(axis=1).sum())
        tally["n_full_correct"] += int((exit_probs[:, -1] > 0).sum())
    return tally, np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)


def _with_timeout(stream: Iterator[dict[str, np.ndarray]], timeout_s: float, task: str,
                  ) -> Iterator[dict[str, np.ndarray]]:
    """The stream's batches, but a CollectionError when none arrives within timeout_s (a stall is not a hang)."""
    handoff: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    done = object()

    def pump() -> None:
        try:
            for item in stream:
                while not stop.is_set():
                    try:
                        handoff.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(done)
        except BaseException as exc:  # handed to the driver thread, which raises it
            handoff.put(exc)

    thread = threading.Thread(target=pump, name=f"raee-stream-{task}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = handoff.get(timeout=timeout_s)
            except queue.Empty:
                raise CollectionError(f"no {task} batch arrived within {timeout_s:g} s; re-run to resume, stored "
                                      "records are kept") from None
            if item is done:
                return
            if isinstance(item, BaseException):
                raise CollectionError(f"the {task} stream failed ({item}); re-run to resume, stored records are "
                                      "kept") from item
            yield item
    finally:
        stop.set()


def _finish(task: Task, scan: SplitScan, target: BuildTarget, tally: dict[str, int], n_added: int, n_in_db: int,
            db_uri: str, token: str | None, options: BuildOptions, seconds: float) -> BuildSummary:
    """Check the version holds exactly this build's records (and the carried added examples), then switch."""
    if tally["n_examples"] != scan.n_examples:
        raise CollectionError(f"{task.name}: {tally['n_examples']} of {scan.n_examples} examples came back from "
                              "the stream; re-run to resume")
    if n_in_db != tally["n_records"] + n_added:
        raise CollectionError(
            f"collection {target.collection!r} holds {n_in_db} records but this {task.name} build wrote "
            f"{tally['n_records']} for {scan.n_examples} examples (and {n_added} added examples); records from "
            "another build are mixed in (drop the collection or use another database)")
    finish_version(db_uri, target, expected=n_in_db, counted=n_in_db, token=token)
    log.info("%s: %d records in %s for %d examples", task.name, n_in_db, target.collection, scan.n_examples)
    summary = summarize(task, target.name, options.variant, scan.n_examples, tally["n_records"], n_in_db,
                        tally["n_no_correct"], tally["n_full_correct"], seconds)
    return replace(summary, version=target.collection)
