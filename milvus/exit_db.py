"""The exit database: one Milvus collection of build-time exit records, guarded by its metadata.

`ExitDB` is a small facade over `pymilvus.MilvusClient` with the collection bound at construction and a
few verbs (`upsert`, `search`, `count`, `get`, `drop`, `close`). Data comes in as `raee.records.ExitRecords`
and goes out as `ExitRecords` / `Neighbours` numpy arrays; pymilvus errors are caught only here and re-raised
as `ExitDBError` naming the operation and the collection.

Decisions (see docs/milvus.md for the long form):
- One collection per build: the collection's properties hold its `ExitDBMeta` (backbone, encoder, task and
  task digest, L, dim, C, metric, head: what must match to use the records), the `BuildVariant` (which
  training examples it holds) and the `Calibration`; opening it with a different meta raises
  `MetadataMismatchError`, so records never mix silently. `setup_meta(...)` makes a setup's meta and
  `collection_name(meta, variant)` its stable name; `list_exit_dbs(uri)` lists what a database holds, so
  later commands find a build without repeating its options. No task field or partitions are needed.
- Distances: the metric defaults to L2 as in the authors' FAISS code. Milvus' L2 is the *squared*
  Euclidean distance (as FAISS' IndexFlatL2 is). COSINE and IP are similarities and are converted so that
  smaller is always closer: COSINE -> 1 - cos (in [0, 2]), IP -> -ip (can be negative, so Eq. 5's
  min_j d_j / d_i ratio is only meaningful for L2 or COSINE).
- Consistency: reads use Milvus' "Session" level by default, i.e. a handle always sees its own upserts (a
  build followed by a query in the same process), while other processes read Bounded-stale data without
  paying Strong's ~200 ms per search on a server. `count()` is always Strong because it is used to check
  that a build is complete.
- Milvus Lite (a `*.db` URI, the default) is owned by exactly one process; a second process gets an
  `ExitDBError` at once. `close()` flushes and releases the Lite lock so another process can open it.
- A server URI may name a Milvus database (one per team): `http://host:19530/team_a` (`split_uri`); without
  one it is the server's `default` database. Milvus Lite files take no database (no authentication, so a
  database there would isolate nothing; use one file per team).
- Opening a name that is a Milvus alias (a versioned build, milvus/versions.py) pins the handle to the
  collection the alias points at when it opens: `collection` is that version, `alias` the name asked for,
  so search, writes, calibration and blobs always come from one version.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from milvus.index import IndexConfig
from raee.calibration import Calibration
from raee.records import ExitRecords, Neighbours

Metric = Literal["L2", "IP", "COSINE"]
Consistency = Literal["Session", "Strong", "Bounded", "Eventually"]

META_PROPERTY = "raee.meta"  # collection property holding ExitDBMeta as JSON
INDEX_PROPERTY = "raee.index"  # the IndexConfig it was built with (Lite's describe_index omits params)
CALIBRATION_PROPERTY = "raee.calibration"  # raee.calibration.Calibration as JSON (fitted on the training split)
VERSION_OF_PROPERTY = "raee.version_of"  # on each version of a versioned build: the alias it serves under
SCHEMA_VERSION = "3"  # 2 added the label distributions per layer; 3 raw distributions + calibration, variant
_METRICS = ("L2", "IP", "COSINE")
_ID, _VECTOR, _PROBS, _LABEL, _TEXT = "id", "vector", "exit_probs", "label", "text"
_LAYER_PROBS = "layer_probs"  # (L+1) * C floats, flattened; empty when a record was written without them
_MAX_ARRAY = 4096  # Milvus' ARRAY max_capacity limit
_MAX_K = 16384  # Milvus' topk limit
TIE_TOLERANCE = 1e-6  # neighbour distances closer than this are a tie (key noise between batches: ~1e-7)
# Blobs (a trained exit head's weights) live in a companion collection "<collection>__blobs" as base64 chunks:
# collection properties share one metadata record with a size limit on a server, a collection does not.
BLOB_SUFFIX = "__blobs"
_BLOB_CHUNK = 48_000  # raw bytes per row: 64,000 base64 characters, under VARCHAR's 65,535
# Milvus Lite's FLAT search materialises a (queries, rows, D) float32 array per segment (measured: 29 GiB
# for 256 queries over 80k rows of D=384), so on Lite the query batch is split to stay under this size.
_LITE_SEARCH_BYTES = 256 * 2**20


class ExitDBError(RuntimeError):
    """A Milvus operation on the exit database failed; says which operation on which collection."""

    def __init__(self, operation: str, collection: str, detail: str) -> None:
        super().__init__(f"exit db {operation} on collection {collection!r} failed: {detail}")
        self.operation = operation
        self.collection = collection
        self.detail = detail


class MetadataMismatchError(ExitDBError):
    """The collection was built with a different setup (backbone, encoder, task spec, L, dim, metric, head)."""

    def __init__(self, collection: str, stored: ExitDBMeta, given: ExitDBMeta) -> None:
        diffs = stored.differences(given)
        hint = ("; the task spec changed since the build (template, label values or words): rebuild it"
                if stored.task_digest != given.task_digest else "")
        super().__init__("open", collection, "metadata mismatch, refusing to mix records (" + "; ".join(diffs)
                         + f"){hint}; use another collection name or rebuild this one")
        self.stored = stored
        self.given = given


@dataclass(frozen=True)
class ExitDBMeta:
    """The setup a collection's records were computed with; stored in the collection and checked on every open.

    Everything here must match for a query to use the records. How the records were selected from the
    training split (`BuildVariant`) is stored beside it and shown, not required to match."""

    backbone: str  # model name, e.g. "gemma-3-270m"
    encoder: str  # key encoder name, e.g. "all-minilm-l6-v2:sentence"
    task: str  # task name, e.g. "sst2"
    task_digest: str  # raee.tasks.Task.digest: template, label values and words (their order)
    n_layers: int  # L; records hold L+1 exit probabilities (layer 0 = embeddings)
    dim: int  # key vector dimension D
    n_classes: int  # C; records hold (L+1) * C label probabilities
    metric: Metric = "L2"  # L2 = squared Euclidean, see module docstring
    head: str = "lm"  # exit head: "lm" (label words through the LM head) or "offramp:<digest>" (trained)

    def __post_init__(self) -> None:
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {list(_METRICS)}, got {self.metric!r}")
        if self.n_layers < 1 or self.dim < 1 or self.n_classes < 2:
            raise ValueError(f"n_layers and dim must be >= 1 and n_classes >= 2, got n_layers={self.n_layers}, "
                             f"dim={self.dim}, n_classes={self.n_classes}")

    def differences(self, other: ExitDBMeta) -> list[str]:
        """'field: stored X != given Y' for every field that differs (self is the stored one)."""
        return [f"{f.name}: stored {getattr(self, f.name)!r} != given {getattr(other, f.name)!r}"
                for f in fields(ExitDBMeta) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class BuildVariant:
    """Which training examples a build wrote: a seeded fraction of the split, optionally only those the full
    model gets right (the paper's "RAEE w/o"). Recorded with the collection; later commands read it."""

    fraction: float = 1.0
    seed: int = 0
    only_correct: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")

    def describe(self) -> str:
        parts = ["full training split" if self.fraction >= 1.0 else f"fraction {self.fraction:g} (seed {self.seed})"]
        if self.only_correct:
            parts.append("only-correct")
        return ", ".join(parts)


def setup_meta(backbone: Any, encoder: Any, task: Any, *, head: str = "lm", metric: Metric = "L2") -> ExitDBMeta:
    """The ExitDBMeta of a backbone (name, n_layers, style), key encoder (name, dim) and raee.tasks.Task.

    The one place a setup's identity is made: builds, the engine, serving and evaluation all ask it."""
    return ExitDBMeta(backbone=backbone.name, encoder=encoder.name, task=task.name,
                      task_digest=task.digest(backbone.style), n_layers=backbone.n_layers, dim=encoder.dim,
                      n_classes=task.n_classes, metric=metric, head=head)


def collection_name(meta: ExitDBMeta, variant: BuildVariant | None = None) -> str:
    """A stable, Milvus-legal collection name: "raee_<task>_<10 hex of the meta and variant>"."""
    task = re.sub(r"[^0-9a-zA-Z_]", "_", meta.task)[:64]
    key = _meta_json(meta, variant or BuildVariant())
    return f"raee_{task}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _meta_json(meta: ExitDBMeta, variant: BuildVariant) -> str:
    return json.dumps({**asdict(meta), "variant": asdict(variant)}, sort_keys=True)


def parse_meta(text: str) -> tuple[ExitDBMeta, BuildVariant]:
    """The stored JSON -> (meta, variant); ValueError for metadata written by an older raee (schema < 3)."""
    data = json.loads(text)
    variant = BuildVariant(**data.pop("variant", {}))
    try:
        return ExitDBMeta(**data), variant
    except TypeError as exc:
        raise ValueError(f"exit database written by an older raee ({exc}); rebuild it with `raee build`") from exc


def is_lite_uri(uri: str) -> bool:
    """Milvus Lite is selected by pymilvus for a local path ending in `.db`."""
    return not re.match(r"^[a-z]+://", uri) and uri.endswith(".db")


_SERVER_URI = re.compile(r"^(?P<address>(?:https?|tcp)://[^/]+?)(?:/(?P<db>[^/]*))?/?$")
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def split_uri(uri: str) -> tuple[str, str | None]:
    """(address, database) of a URI: "http://host:19530/team_a" -> ("http://host:19530", "team_a").

    A server URI without a path is the server's default database (None); a Milvus Lite path has none and may
    not name one (ValueError), because Lite has no authentication to keep teams apart."""
    match = _SERVER_URI.match(uri)
    if match is None:
        if re.search(r"\.db/[^/]+/?$", uri):
            raise ValueError(f"{uri!r} names a database inside a Milvus Lite file; Lite has no authentication, so a "
                             "database would keep no team out: use one Lite file per team, or a server URI "
                             "http://host:port/database")
        if re.match(r"^[a-z]+://", uri):
            raise ValueError(f"cannot read {uri!r} as a Milvus server URI (http://host:port or "
                             "http://host:port/database)")
        return uri, None
    db = match.group("db") or None
    if db is not None and not _DB_NAME.match(db):
        raise ValueError(f"{db!r} in {uri!r} is not a Milvus database name (letters, digits and _, not starting "
                         "with a digit)")
    return match.group("address"), db


def database_label(uri: str) -> str:
    """How messages name the database of a URI: "team_a", or "default"."""
    return split_uri(uri)[1] or "default"


# Milvus Lite serves one database per process from a thread; several ExitDB handles in one process share
# it, so the lock is released only when the last of them closes.
_lite_refs: dict[str, int] = {}
_lite_refs_lock = threading.Lock()


def _new_client(uri: str, token: str | None, timeout_s: float) -> MilvusClient:
    """A MilvusClient on the URI's database; raises MilvusException (callers wrap it), ExitDBError for a bad URI."""
    try:
        address, db = split_uri(uri)
    except ValueError as exc:
        raise ExitDBError("open", "*", str(exc)) from exc
    return MilvusClient(uri=address, token=token or "", timeout=timeout_s, **({"db_name": db} if db else {}))


@contextmanager
def open_client(uri: str, *, token: str | None = None, timeout_s: float = 10.0,
                operation: str = "connect") -> Iterator[MilvusClient]:
    """A MilvusClient on the URI's database for the block (admin code in milvus/), closed after.

    With Milvus Lite it shares the process's Lite server with open ExitDB handles (the lock is released when
    the last user closes). Failing to connect is an ExitDBError naming the URI."""
    lite_path = os.path.abspath(uri) if is_lite_uri(uri) else None
    if lite_path is not None:
        with _lite_refs_lock:
            _lite_refs[lite_path] = _lite_refs.get(lite_path, 0) + 1
    try:
        try:
            client = _new_client(uri, token, timeout_s)
        except MilvusException as exc:
            detail = _lite_busy(uri, exc) if lite_path is not None else f"cannot connect to {uri!r}: {exc}"
            raise ExitDBError(operation, "*", detail) from exc
        try:
            yield client
        finally:
            client.close()
    finally:
        if lite_path is not None:
            _release_lite(lite_path)


class ExitDB:
    """One collection of exit records on Milvus Lite (`*.db`, default) or a Milvus server (`http://...`).

    Opening creates the collection (schema, index, metadata, variant, calibration) if it is missing and
    `create`, otherwise checks its metadata against `meta` (None: adopt the stored meta; readers then check it
    against their setup) and, when given, its variant. All arguments but `uri` are keyword-only;
    `index=None` means FLAT for a new collection and "whatever it was built with" for an existing one.
    """

    def __init__(
        self,
        uri: str = "./raee.db",
        *,
        collection: str,
        meta: ExitDBMeta | None,
        variant: BuildVariant | None = None,
        create: bool = True,
        token: str | None = None,
        timeout_s: float = 10.0,
        index: IndexConfig | None = None,
        consistency: Consistency = "Session",
        text_max_bytes: int = 2048,
        batch_rows: int = 1000,
        calibration: Calibration | None = None,
        properties: dict[str, str] | None = None,
    ) -> None:
        if text_max_bytes < 1 or batch_rows < 1:
            raise ValueError(f"text_max_bytes and batch_rows must be >= 1, got {text_max_bytes}, {batch_rows}")
        if meta is None and create:
            raise ValueError("meta=None opens an existing collection as stored, so it needs create=False")
        expected = None if meta is None else (meta.n_layers + 1, meta.n_classes)
        if calibration is not None and expected is not None and calibration.bias.shape != expected:
            raise ValueError(f"calibration is {calibration.bias.shape}, the meta needs "
                             f"({meta.n_layers + 1}, {meta.n_classes})")
        self.uri = uri
        self.collection = collection  # the collection itself: where `collection` is an alias, its target (below)
        self.alias: str | None = None  # the alias this handle was opened through, if any
        self._extra_properties = dict(properties or {})  # written with a new collection (e.g. its version's alias)
        self.properties: dict[str, str] = {}  # the collection's stored properties, once open
        self.meta = meta  # None: adopt the stored one (readers check it against their setup themselves)
        self.variant = variant or BuildVariant()  # the stored one replaces it when the collection exists
        self.timeout_s = timeout_s
        self.consistency = consistency
        self.batch_rows = batch_rows
        self.is_lite = is_lite_uri(uri)
        self.calibration = calibration  # the stored one replaces it when the collection exists
        self.has_layer_probs = True
        self._lite_path = os.path.abspath(uri) if self.is_lite else None
        self._client = self._connect(token)
        try:
            with self._op("open"):
                if self._client.has_collection(collection, timeout=timeout_s):
                    self.index, self.text_max_bytes = self._check_existing(index, variant)
                elif not create:
                    raise ExitDBError("open", collection, f"no such collection in {uri}")
                else:
                    self.index, self.text_max_bytes = index or IndexConfig(), text_max_bytes
                    self._create()
                self._client.load_collection(self.collection, timeout=max(timeout_s, 60.0))
            # Lite has one owning process, so its row count can be tracked here (see _search_chunk).
            self._lite_rows = self.count() if self.is_lite else 0
        except BaseException:
            self.close()
            raise

    # ---- verbs ------------------------------------------------------------------------------------------

    def upsert(self, records: ExitRecords) -> int:
        """Write records by id (insert or replace), in batches of `batch_rows`; returns the rows written.

        Re-running a build with the same ids leaves `count()` unchanged. Texts longer than
        `text_max_bytes` UTF-8 bytes are cut at a character boundary.
        """
        return self._write(records, "upsert")

    def insert(self, records: ExitRecords) -> int:
        """Append records whose ids are certainly not stored (a bulk load into a fresh collection); returns rows.

        Not idempotent: a repeated id is stored twice. Builds use `upsert`; this exists because Milvus 2.3.5's
        upsert writes a delete record per row, and at a million rows compaction then rebuilds indexed segments
        for tens of minutes (docs/milvus.md)."""
        return self._write(records, "insert")

    def reindex(self, index: IndexConfig, *, timeout_s: float = 7200.0) -> float:
        """Replace the collection's vector index with `index` (records untouched); seconds until every row is
        indexed and the collection is loaded again. Searches fail while it runs: an offline operation."""
        t0 = time.perf_counter()
        with self._op("reindex"):
            self._client.release_collection(self.collection, timeout=self.timeout_s)
            self._client.drop_index(self.collection, index_name=_VECTOR, timeout=self.timeout_s)
            params = self._client.prepare_index_params()
            params.add_index(field_name=_VECTOR, index_name=_VECTOR, index_type=index.kind,
                             metric_type=self.meta.metric, params=index.build_params())
            self._client.create_index(self.collection, params, timeout=timeout_s)
            self._client.alter_collection_properties(self.collection, properties={
                INDEX_PROPERTY: json.dumps(asdict(index))}, timeout=self.timeout_s)
        self.index = index
        deadline = time.monotonic() + timeout_s
        while not self._is_lite_or_indexed():
            if time.monotonic() > deadline:
                raise ExitDBError("reindex", self.collection, f"index not built after {timeout_s:.0f} s")
            time.sleep(1.0)
        with self._op("reindex"):
            self._client.load_collection(self.collection, timeout=timeout_s)
        return time.perf_counter() - t0

    def _is_lite_or_indexed(self) -> bool:
        if self._lite_path is not None:
            _wait_lite_background(self._lite_path, self.collection, 7200.0)
            return True
        state = self.index_state()
        return state["pending_rows"] == 0 and state["indexed_rows"] >= state["total_rows"]

    def _write(self, records: ExitRecords, verb: Literal["upsert", "insert"]) -> int:
        n = len(records)
        if n == 0:
            return 0
        ids, vectors, probs, labels = self._check_records(records)
        texts = [_cap_text(t, self.text_max_bytes) for t in records.texts]
        dists = self._check_layer_probs(records.layer_probs, n)  # (N, (L+1) * C) or None
        written = 0
        for start in range(0, n, self.batch_rows):
            stop = min(start + self.batch_rows, n)
            rows = [
                {_ID: i, _VECTOR: v, _PROBS: p, _LABEL: lab, _TEXT: t}
                for i, v, p, lab, t in zip(
                    ids[start:stop].tolist(),
                    vectors[start:stop].tolist(),
                    probs[start:stop].tolist(),
                    labels[start:stop].tolist(),
                    texts[start:stop],
                    strict=True,
                )
            ]
            if self.has_layer_probs:
                chunk = dists[start:stop].tolist() if dists is not None else [[]] * (stop - start)
                for row, dist in zip(rows, chunk, strict=True):
                    row[_LAYER_PROBS] = dist
            with self._op(verb):
                if verb == "upsert":
                    written += int(self._client.upsert(self.collection, rows, timeout=self.timeout_s)["upsert_count"])
                else:
                    written += int(self._client.insert(self.collection, rows, timeout=self.timeout_s)["insert_count"])
        self._lite_rows += written if self.is_lite else 0  # upper bound: replaced ids are counted again
        return written

    def search(self, vectors: np.ndarray, *, k: int = 12, with_texts: bool = False) -> Neighbours:
        """Top-k neighbours of every query in ONE round trip: d[i, j] = distance(vectors[i], key of ids[i, j]).

        vectors (N, D) float32 -> Neighbours with (N, K) ids/distances/labels and (N, K, L+1) exit_probs,
        ascending distance (distances within TIE_TOLERANCE ordered by id), padded with id -1 / distance +inf
        where fewer than k records exist. A query whose tie crosses the k-th place costs one wider search.
        (On Milvus Lite with FLAT, large batches over many rows are split into in-process calls to bound
        Lite's memory; there is no network round trip to save there.)
        """
        vectors = self._check_vectors(vectors, "search")
        if not 1 <= k <= _MAX_K:
            raise ValueError(f"k must lie in [1, {_MAX_K}], got {k}")
        n_queries, n_probs = len(vectors), self.meta.n_layers + 1
        ids = np.full((n_queries, k), -1, dtype=np.int64)
        distances = np.full((n_queries, k), np.inf, dtype=np.float32)
        exit_probs = np.zeros((n_queries, k, n_probs), dtype=np.float32)
        labels = np.full((n_queries, k), -1, dtype=np.int64)
        texts = [[""] * k for _ in range(n_queries)] if with_texts else None
        if n_queries:
            output_fields = [_PROBS, _LABEL, *([_TEXT] if with_texts else []),
                             *([_LAYER_PROBS] if self.has_layer_probs else [])]
            dists: list[list[float]] = []
            hits = self._search_hits(vectors, k, output_fields)
            for q, row in enumerate(hits):  # (N, <=K) dicts: the only per-hit Python loop, unavoidable
                for j, hit in enumerate(row):
                    entity = hit["entity"]
                    ids[q, j] = hit["id"]
                    distances[q, j] = hit["distance"]
                    exit_probs[q, j] = entity[_PROBS]
                    labels[q, j] = entity[_LABEL]
                    if self.has_layer_probs:
                        dists.append(entity[_LAYER_PROBS])
                    if texts is not None:
                        texts[q][j] = entity[_TEXT]
            valid = ids >= 0
            if self.meta.metric == "COSINE":
                distances = np.where(valid, 1.0 - distances, np.inf).astype(np.float32)
            elif self.meta.metric == "IP":
                distances = np.where(valid, -distances, np.inf).astype(np.float32)
        return Neighbours(
            ids=ids,
            distances=distances,
            exit_probs=exit_probs,
            labels=labels,
            texts=tuple(tuple(row) for row in texts) if texts is not None else None,
            layer_probs=self._unflatten(dists, ids >= 0) if self.has_layer_probs and n_queries else None,
        )

    def _search_hits(self, vectors: np.ndarray, k: int, output_fields: list[str]) -> list[list[dict[str, Any]]]:
        """Each query's k nearest hits, ties broken by id: the same neighbours whatever the batch.

        Duplicate training texts (MPQA holds "wants" 20 times) give records at one distance, or at distances
        that differ only by the key encoder's float noise (a text's key changes by ~1e-7 with the padding of
        its batch). Milvus returns such ties in no defined order, so which of them make the top k differed
        between an evaluation's batch search and the engine's. Distances within TIE_TOLERANCE of each other
        are one tie, ordered by id. One hit more than k shows whether a tie crosses the k-th place; only those
        queries are searched again, wider, until the whole tie is in the window."""
        def spills(row: list[dict[str, Any]], group: np.ndarray) -> bool:  # the k-th hit's tie fills the window
            return len(row) == limit and group[k - 1] == group[-1]

        limit = min(k + 1, _MAX_K)
        rows = [self._tie_order(row) for row in self._search_rows(vectors, limit, output_fields)]
        tied = [q for q, row in enumerate(rows) if spills(*row)]
        while tied and limit < _MAX_K:
            limit = min(4 * limit, _MAX_K)
            for q, row in zip(tied, self._search_rows(vectors[tied], limit, output_fields), strict=True):
                rows[q] = self._tie_order(row)
            tied = [q for q in tied if spills(*rows[q])]
        return [row[:k] for row, _ in rows]

    def _tie_order(self, row: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Hits sorted by (tie group, id) and each one's tie group: consecutive distances closer than
        TIE_TOLERANCE share a group."""
        if not row:
            return row, np.zeros(0, dtype=np.int64)
        sign = 1.0 if self.meta.metric == "L2" else -1.0  # Milvus returns similarities for COSINE and IP
        d = sign * np.array([hit["distance"] for hit in row], dtype=np.float64)
        by_distance = np.argsort(d, kind="stable")
        group = np.concatenate([[0], np.cumsum(np.diff(d[by_distance]) > TIE_TOLERANCE)]).astype(np.int64)
        ids = np.array([row[i]["id"] for i in by_distance], dtype=np.int64)
        order = np.lexsort((ids, group))
        return [row[by_distance[i]] for i in order], group[order]

    def _search_rows(self, vectors: np.ndarray, limit: int, output_fields: list[str]) -> list[list[dict[str, Any]]]:
        hits: list[list[dict[str, Any]]] = []
        chunk = self._search_chunk(len(vectors))
        for start in range(0, len(vectors), chunk):
            with self._op("search"):
                hits.extend(self._client.search(
                    self.collection,
                    data=list(vectors[start : start + chunk]),
                    limit=limit,
                    output_fields=output_fields,
                    search_params={"metric_type": self.meta.metric, "params": self.index.search_params(limit)},
                    anns_field=_VECTOR,
                    consistency_level=self.consistency,
                    timeout=self.timeout_s,
                ))
        return [list(row) for row in hits]

    def count(self) -> int:
        """Number of records, read with Strong consistency so it includes every acknowledged upsert."""
        with self._op("count"):
            res = self._client.query(
                self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong",
                timeout=self.timeout_s,
            )
        return int(res[0]["count(*)"])

    def get(self, ids: np.ndarray) -> ExitRecords:
        """The stored records for ids, in the order asked; ids that are not stored are left out."""
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(wanted), self.batch_rows):
            chunk = wanted[start : start + self.batch_rows].tolist()
            with self._op("get"):
                rows = self._client.query(
                    self.collection,
                    filter=f"{_ID} in {chunk}",
                    output_fields=[_ID, _VECTOR, _PROBS, _LABEL, _TEXT,
                                   *([_LAYER_PROBS] if self.has_layer_probs else [])],
                    consistency_level=self.consistency,
                    timeout=self.timeout_s,
                )
            found.update((int(r[_ID]), r) for r in rows)
        order = [i for i in dict.fromkeys(wanted.tolist()) if i in found]
        rows = [found[i] for i in order]
        n_probs = self.meta.n_layers + 1
        return ExitRecords(
            ids=np.asarray(order, dtype=np.int64),
            vectors=np.asarray([r[_VECTOR] for r in rows], dtype=np.float32).reshape(-1, self.meta.dim),
            exit_probs=np.asarray([r[_PROBS] for r in rows], dtype=np.float32).reshape(-1, n_probs),
            labels=np.asarray([r[_LABEL] for r in rows], dtype=np.int64),
            texts=tuple(r[_TEXT] for r in rows),
            layer_probs=(self._unflatten([r[_LAYER_PROBS] for r in rows], np.ones(len(rows), dtype=bool))
                         if self.has_layer_probs and rows else None),
        )

    def scan(self, *, batch_rows: int = 16384) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (B,), exit_probs (B, L+1)) of every stored record, page by page (a Strong query iterator).

        How a resumed build learns what is stored without one request per id: a few hundred pages at 1M."""
        with self._op("scan"):
            pages = self._client.query_iterator(self.collection, batch_size=min(batch_rows, 16384),
                                                filter=f"{_ID} >= 0", output_fields=[_ID, _PROBS],
                                                consistency_level="Strong", timeout=self.timeout_s)
        n_probs = self.meta.n_layers + 1
        try:
            while True:
                with self._op("scan"):
                    page = pages.next()
                if not page:
                    return
                yield (np.asarray([r[_ID] for r in page], dtype=np.int64),
                       np.asarray([r[_PROBS] for r in page], dtype=np.float32).reshape(-1, n_probs))
        finally:
            pages.close()

    def flush(self, *, wait_index: bool = True, timeout_s: float = 600.0) -> None:
        """Seal pending writes to storage and, on a server, wait until the vector index covers every row.

        Call once at the end of a build: until then a server searches unsealed rows by brute force.
        """
        with self._op("flush"):
            self._client.flush(self.collection, timeout=timeout_s)
        if not wait_index:
            return
        if self._lite_path is not None:
            _wait_lite_background(self._lite_path, self.collection, timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.index_state()
            if state["pending_rows"] == 0 and state["indexed_rows"] >= state["total_rows"]:
                return
            if time.monotonic() > deadline:
                raise ExitDBError("flush", self.collection, f"index not built after {timeout_s:.0f} s: {state}")
            time.sleep(0.5)

    def index_state(self) -> dict[str, Any]:
        """{"kind", "total_rows", "indexed_rows", "pending_rows", "state"} as Milvus reports them."""
        with self._op("index_state"):
            desc = self._client.describe_index(self.collection, index_name=_VECTOR, timeout=self.timeout_s)
        return {
            "kind": desc.get("index_type"),
            "total_rows": int(desc.get("total_rows", 0)),
            "indexed_rows": int(desc.get("indexed_rows", 0)),
            "pending_rows": int(desc.get("pending_index_rows", 0)),
            "state": str(desc.get("state")),
        }

    def put_blob(self, name: str, data: bytes) -> None:
        """Store bytes under `name` beside the records (e.g. a trained exit head), replacing what was there."""
        blobs = self.collection + BLOB_SUFFIX
        with self._op("put_blob"):
            if not self._client.has_collection(blobs, timeout=self.timeout_s):
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("id", DataType.INT64, is_primary=True)
                schema.add_field("name", DataType.VARCHAR, max_length=128)
                schema.add_field("data", DataType.VARCHAR, max_length=65535)
                schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field; unused
                index_params = self._client.prepare_index_params()
                index_params.add_index(field_name="v", index_type="FLAT", metric_type="L2")
                self._client.create_collection(blobs, schema=schema, index_params=index_params,
                                               timeout=self.timeout_s)
            self._client.load_collection(blobs, timeout=max(self.timeout_s, 60.0))
            self._client.delete(blobs, filter=f'name == "{name}"', timeout=self.timeout_s)
            encoded = base64.b64encode(data).decode("ascii")
            step = _BLOB_CHUNK * 4 // 3
            base = (zlib.crc32(name.encode()) & 0x7FFFFFFF) << 20
            rows = [{"id": base + i, "name": name, "data": encoded[start : start + step], "v": [0.0, 0.0]}
                    for i, start in enumerate(range(0, max(len(encoded), 1), step))]
            self._client.insert(blobs, rows, timeout=self.timeout_s)
            self._client.flush(blobs, timeout=max(self.timeout_s, 60.0))

    def get_blob(self, name: str) -> bytes | None:
        """The bytes stored under `name`, or None."""
        blobs = self.collection + BLOB_SUFFIX
        with self._op("get_blob"):
            if not self._client.has_collection(blobs, timeout=self.timeout_s):
                return None
            self._client.load_collection(blobs, timeout=max(self.timeout_s, 60.0))
            rows = self._client.query(blobs, filter=f'name == "{name}"', output_fields=["id", "data"],
                                      consistency_level="Strong", timeout=self.timeout_s)
        if not rows:
            return None
        return base64.b64decode("".join(r["data"] for r in sorted(rows, key=lambda r: r["id"])))

    def resolve(self, *, timeout_s: float | None = None) -> str:
        """The collection the name this handle was opened with points at now (an alias may have moved since)."""
        with self._op("resolve"):
            desc = self._client.describe_collection(self.alias or self.collection, timeout=timeout_s or self.timeout_s)
        return str(desc["collection_name"])

    def drop(self) -> None:
        """Delete the collection, its records and its blobs; the handle is unusable afterwards."""
        if self.alias is not None:
            raise ExitDBError("drop", self.alias, "it is an alias of a versioned build; drop versions or the whole "
                                                  "build with `raee db drop` (milvus.admin.drop_build)")
        with self._op("drop"):
            self._client.drop_collection(self.collection, timeout=self.timeout_s)
            if self._client.has_collection(self.collection + BLOB_SUFFIX, timeout=self.timeout_s):
                self._client.drop_collection(self.collection + BLOB_SUFFIX, timeout=self.timeout_s)

    def close(self) -> None:
        """Release the connection; with Lite, flush and release the database lock when the last handle closes."""
        client, self._client = getattr(self, "_client", None), None
        if client is None:
            return
        try:
            if self.is_lite and client.has_collection(self.collection, timeout=self.timeout_s):
                client.flush(self.collection, timeout=self.timeout_s)
        except MilvusException:
            pass  # closing must not fail; acknowledged Lite writes are already in its WAL
        finally:
            client.close()
            if self._lite_path is not None:
                _release_lite(self._lite_path)

    def __enter__(self) -> ExitDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExitDB(uri={self.uri!r}, collection={self.collection!r}, index={self.index.kind})"

    # ---- helpers ----------------------------------------------------------------------------------------

    def _op(self, operation: str) -> _Wrap:
        db = split_uri(self.uri)[1]
        return _Wrap(operation, f"{db}.{self.collection}" if db else self.collection)

    def _search_chunk(self, n_queries: int) -> int:
        """Queries per search request: all of them, except for Lite's memory-hungry brute force."""
        if not self.is_lite or self.index.kind != "FLAT":
            return n_queries
        per_query = max(self._lite_rows, 1) * self.meta.dim * 4  # bytes of Lite's (1, rows, D) difference
        return max(1, min(n_queries, _LITE_SEARCH_BYTES // per_query))

    def _connect(self, token: str | None) -> MilvusClient:
        if self._lite_path is not None:
            with _lite_refs_lock:
                _lite_refs[self._lite_path] = _lite_refs.get(self._lite_path, 0) + 1
        try:
            return _new_client(self.uri, token, self.timeout_s)
        except MilvusException as exc:
            if self._lite_path is not None:
                _release_lite(self._lite_path)
                detail = _lite_busy(self.uri, exc)
            else:
                detail = f"cannot connect to {self.uri!r}: {exc}"
            raise ExitDBError("open", self.collection, detail) from exc

    def _create(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(_ID, DataType.INT64, is_primary=True)
        schema.add_field(_VECTOR, DataType.FLOAT_VECTOR, dim=self.meta.dim)
        schema.add_field(_PROBS, DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=self.meta.n_layers + 1)
        schema.add_field(_LABEL, DataType.INT64)
        schema.add_field(_TEXT, DataType.VARCHAR, max_length=self.text_max_bytes)
        schema.add_field(_LAYER_PROBS, DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=_MAX_ARRAY)
        index_params = self._client.prepare_index_params()
        index_params.add_index(
            field_name=_VECTOR, index_name=_VECTOR, index_type=self.index.kind, metric_type=self.meta.metric,
            params=self.index.build_params(),
        )
        properties = {META_PROPERTY: _meta_json(self.meta, self.variant),
                      INDEX_PROPERTY: json.dumps(asdict(self.index)), "raee.schema": SCHEMA_VERSION,
                      **({CALIBRATION_PROPERTY: self.calibration.to_json()} if self.calibration else {}),
                      **self._extra_properties}
        try:  # the index is created with the collection, i.e. before any insert
            self._client.create_collection(
                self.collection, schema=schema, index_params=index_params, consistency_level="Bounded",
                properties=properties, timeout=self.timeout_s,
            )
        except MilvusException:
            if not self._client.has_collection(self.collection, timeout=self.timeout_s):
                raise
            self.index, self.text_max_bytes = self._check_existing(self.index, self.variant)  # another writer won
            return
        self.properties = properties
        kind = self._client.describe_index(self.collection, index_name=_VECTOR).get("index_type")
        if kind != self.index.kind:
            raise ExitDBError("open", self.collection, f"asked for a {self.index.kind} index, Milvus made {kind}")

    def _check_existing(self, index: IndexConfig | None, variant: BuildVariant | None) -> tuple[IndexConfig, int]:
        desc = self._client.describe_collection(self.collection, timeout=self.timeout_s)
        if desc.get("collection_name") not in (None, self.collection):  # an alias: pin the handle to its target
            self.alias, self.collection = self.collection, str(desc["collection_name"])
        properties = desc.get("properties") or {}
        self.properties = dict(properties)
        stored_json = properties.get(META_PROPERTY)
        if stored_json is None:
            raise ExitDBError("open", self.collection, f"not an exit database (no {META_PROPERTY!r} property)")
        try:
            stored, self.variant = parse_meta(stored_json)
        except ValueError as exc:
            raise ExitDBError("open", self.collection, str(exc)) from exc
        if self.meta is None:
            self.meta = stored
        elif stored != self.meta:
            raise MetadataMismatchError(self.collection, stored, self.meta)
        if variant is not None and variant != self.variant:
            raise ExitDBError("open", self.collection, f"it holds the build {self.variant.describe()!r}, not "
                                                       f"{variant.describe()!r}; use another collection name")
        by_name = {f["name"]: f for f in desc["fields"]}
        text_max_bytes = int(by_name[_TEXT]["params"]["max_length"])
        self.has_layer_probs = _LAYER_PROBS in by_name
        if CALIBRATION_PROPERTY in properties:
            self.calibration = Calibration.from_json(properties[CALIBRATION_PROPERTY])
        idx = self._client.describe_index(self.collection, index_name=_VECTOR, timeout=self.timeout_s)
        kind = idx.get("index_type")
        if index is not None and index.kind != kind:
            raise ExitDBError("open", self.collection, f"built with a {kind} index, opened with {index.kind}")
        if index is None:
            built = IndexConfig(**json.loads(properties.get(INDEX_PROPERTY, "{}")))
            if built.kind != kind:
                raise ExitDBError("open", self.collection, f"index is {kind} but was created as {built.kind}")
            index = built
        return index, text_max_bytes

    def _check_vectors(self, vectors: np.ndarray, operation: str) -> np.ndarray:
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
            shape = getattr(vectors, "shape", type(vectors).__name__)
            raise ValueError(f"{operation}: vectors must be a (N, {self.meta.dim}) numpy array, got {shape}")
        if vectors.shape[1] != self.meta.dim:
            raise ValueError(
                f"{operation}: vectors have dim {vectors.shape[1]} but collection {self.collection!r} "
                f"holds dim {self.meta.dim} keys (encoder {self.meta.encoder!r})"
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise ValueError(f"{operation}: vectors contain NaN or inf")
        return vectors

    def _check_records(self, records: ExitRecords) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ids = np.asarray(records.ids, dtype=np.int64).reshape(-1)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("upsert: ids repeat within one batch; an upsert batch must have unique ids")
        vectors = self._check_vectors(records.vectors, "upsert")
        probs = np.asarray(records.exit_probs, dtype=np.float32)
        n_probs = self.meta.n_layers + 1
        if probs.ndim != 2 or probs.shape[1] != n_probs:
            raise ValueError(
                f"upsert: exit_probs must be (N, L+1) = (N, {n_probs}) for {self.meta.n_layers} layers, "
                f"got {probs.shape}"
            )
        labels = np.asarray(records.labels, dtype=np.int64).reshape(-1)
        return ids, vectors, probs, labels


    def _check_layer_probs(self, layer_probs: np.ndarray | None, n: int) -> np.ndarray | None:
        if layer_probs is None:
            return None
        dists = np.asarray(layer_probs, dtype=np.float32)
        want = (n, self.meta.n_layers + 1, self.meta.n_classes)
        if dists.shape != want:
            raise ValueError(f"upsert: layer_probs must be (N, L+1, C) = {want}, got {dists.shape}")
        if dists[0].size > _MAX_ARRAY:
            raise ValueError(f"upsert: (L+1) * C = {dists[0].size} label probabilities per record exceed "
                             f"Milvus' array limit of {_MAX_ARRAY}")
        if not np.isfinite(dists).all():
            raise ValueError("upsert: layer_probs contain NaN or inf")
        return dists.reshape(n, -1)

    def _unflatten(self, flat: list[list[float]], valid: np.ndarray) -> np.ndarray | None:
        """valid.shape + (L+1, C) from the flat arrays of the valid hits; None if any was written without."""
        if not flat or any(len(f) == 0 for f in flat):
            return None
        n_probs = self.meta.n_layers + 1
        values = np.asarray(flat, dtype=np.float32).reshape(len(flat), n_probs, -1)  # (hits, L+1, C)
        out = np.zeros((*valid.shape, n_probs, values.shape[2]), dtype=np.float32)
        out[valid] = values  # hits fill each row's first slots, in the order valid enumerates them
        return out


@dataclass(frozen=True)
class StoredBuild:
    """One exit database found in a Milvus database, as `list_exit_dbs` reads it without loading it.

    A versioned build (milvus/versions.py) is one StoredBuild under its alias: `collection` is the alias that
    queries open, `version` the collection it points at, `versions` all of its versions."""

    collection: str
    meta: ExitDBMeta | None  # None: not readable by this raee (problem says why)
    variant: BuildVariant
    n_rows: int  # as Milvus' statistics report it (may lag recent upserts on a server)
    calibrated: bool  # a Calibration is stored with it
    problem: str | None = None
    version: str | None = None  # the collection the alias points at; None for an unversioned collection
    versions: tuple[str, ...] = ()  # every version of the build in this database, oldest first

    def describe(self) -> str:
        if self.meta is None:
            return f"{self.collection} ({self.problem})"
        at = f", version {self.version}" if self.version else ""
        return (f"{self.collection} (task {self.meta.task}, {self.variant.describe()}, {self.n_rows} records, "
                f"backbone {self.meta.backbone}, head {self.meta.head.split(':')[0]}{at})")


def list_exit_dbs(uri: str, *, token: str | None = None, timeout_s: float = 10.0) -> list[StoredBuild]:
    """Every exit database a query can open in the database at uri (Lite file or server), sorted by name.

    An unversioned collection is listed as itself; a versioned build once, under its alias, read from the
    version the alias points at. Versions no alias points at (a build still running or never switched in)
    are no choice and are left out (`milvus.admin.list_collections` shows them). [] if there is nothing;
    reads properties and statistics only, nothing is loaded into memory."""
    if is_lite_uri(uri) and not os.path.exists(uri):
        return []
    with open_client(uri, token=token, timeout_s=timeout_s, operation="list") as client:
        stored = raee_collections(client, timeout_s=timeout_s, where=f"{database_label(uri)}.*")
        found: list[StoredBuild] = []
        versions: dict[str, list[str]] = {}
        for name, properties in stored.items():
            if VERSION_OF_PROPERTY in properties:
                versions.setdefault(properties[VERSION_OF_PROPERTY], []).append(name)
            else:
                found.append(_stored_build(client, name, properties, timeout_s))
        for alias, members in versions.items():
            target = resolve_alias(client, alias, timeout_s=timeout_s)
            if target in members:
                build = _stored_build(client, target, stored[target], timeout_s)
                found.append(replace(build, collection=alias, version=target,
                                     versions=tuple(sorted(members, key=lambda c: (len(c), c)))))
    return sorted(found, key=lambda b: b.collection)


def raee_collections(client: MilvusClient, *, timeout_s: float = 10.0,
                     where: str = "*") -> dict[str, dict[str, str]]:
    """{collection: its properties} for every collection of the client's database that holds exit records.

    where: how errors name the database ("team_a.*")."""
    with _Wrap("list", where):
        names = sorted(client.list_collections(timeout=timeout_s))
    found = {}
    for name in names:
        with _Wrap("describe", name):
            properties = client.describe_collection(name, timeout=timeout_s).get("properties") or {}
        if META_PROPERTY in properties:  # else not ours (a blob companion, another application's collection)
            found[name] = dict(properties)
    return found


def resolve_alias(client: MilvusClient, name: str, *, timeout_s: float = 10.0) -> str | None:
    """The collection the alias `name` points at; None when no alias of that name exists (or it is a collection)."""
    with _Wrap("resolve", name):
        if not client.has_collection(name, timeout=timeout_s):
            return None
        target = str(client.describe_collection(name, timeout=timeout_s)["collection_name"])
    return None if target == name else target


def _stored_build(client: MilvusClient, name: str, properties: dict[str, str], timeout_s: float) -> StoredBuild:
    with _Wrap("statistics", name):
        n_rows = int(client.get_collection_stats(name, timeout=timeout_s).get("row_count", 0))
    try:
        meta, variant = parse_meta(properties[META_PROPERTY])
        problem = None
    except (ValueError, TypeError) as exc:
        meta, variant, problem = None, BuildVariant(), str(exc)
    return StoredBuild(name, meta, variant, n_rows, CALIBRATION_PROPERTY in properties, problem)


def milvus_errors(operation: str, collection: str) -> _Wrap:
    """Context manager turning pymilvus errors inside it into ExitDBError(operation, collection) (milvus/ only)."""
    return _Wrap(operation, collection)


class _Wrap:
    """Context manager turning pymilvus errors into ExitDBError(operation, collection)."""

    def __init__(self, operation: str, collection: str) -> None:
        self.operation, self.collection = operation, collection

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, MilvusException | grpc.RpcError):  # pymilvus lets some RPC errors through raw
            raise ExitDBError(self.operation, self.collection, _error_detail(exc)) from exc


def _error_detail(exc: BaseException) -> str:
    """The server's message; a refused privilege also says which roles may do what (milvus/roles.py)."""
    detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
    if "permission deny" in detail.lower() or "PERMISSION_DENIED" in detail:
        detail = (f"permission denied, the token's role lacks this privilege ({detail}); raee_reader may search, "
                  "raee_writer may also build, only root may drop, and a team's roles reach only the team's own "
                  "database (milvus/roles.py)")
    return detail


def _lite_busy(uri: str, exc: BaseException) -> str:
    return (f"cannot open Milvus Lite database {uri!r} ({exc}); it is most likely owned by another process: Milvus "
            "Lite allows one process per database, use a Milvus server (docker-compose.milvus.yml) for several "
            "writers")


def _cap_text(text: str, max_bytes: int) -> str:
    """text cut to at most max_bytes UTF-8 bytes, never inside a character."""
    data = text.encode("utf-8")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", errors="ignore")


def _wait_lite_background(path: str, collection: str, timeout_s: float) -> None:
    """Wait for Milvus Lite's background compaction and index build after a flush.

    Lite builds segment indexes on a background thread and its describe_index reports rows as indexed
    before that finishes, so searches right after a build would silently fall back to brute force and
    compete with the build. There is no public call for this; it uses Lite 3.2's in-process
    `Collection._wait_for_bg` and does nothing where that is missing.
    """
    from milvus_lite.server_manager import server_manager_instance

    try:
        _, lite_db, _ = server_manager_instance._servers[path]
        lite_db.get_collection(collection)._wait_for_bg(timeout=timeout_s)
    except (AttributeError, KeyError, TypeError, ValueError):
        return


def _release_lite(path: str) -> None:
    with _lite_refs_lock:
        left = _lite_refs.get(path, 1) - 1
        if left > 0:
            _lite_refs[path] = left
            return
        _lite_refs.pop(path, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(path)
