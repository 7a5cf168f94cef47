"""Ray Serve deployment: an HTTP JSON API over `BatchEngine` (paper Algorithm 3.2), with request batching.

    POST /v1/classify {"task": "sst2", "texts": ["..."], "explain": false, "policy": null}
         -> {"task", "predictions": [{"label", "label_word", "exit_layer", "probs", "policy", "neighbours"?,
             "truncated"}]}
    POST /v1/examples {"task": "sst2", "texts": ["..."], "labels": ["1"]}   (live growth; needs the write key)
         -> {"task", "collection", "ids", "added", "existing", "skipped", "seconds_to_visible"}
    GET  /v1/tasks    the served tasks, their label words, policies, database sizes and versions
    GET  /healthz     200 once the replica has loaded its models and databases; limits and policies
    GET  /openapi.json  the API schema (no /docs page: Swagger UI would load its assets from a CDN)

Permissions, each a separate key (compared in constant time; none is ever echoed):
- classify: with an API key (`ServeConfig.api_key`, else $RAEE_API_KEY where `build_app` runs) the /v1/ routes
  answer 401 unless the request carries it in `x-api-key`; /healthz and the OpenAPI pages stay open.
- neighbour texts (`neighbour_texts`): "off" (the default) - explanations carry the neighbours' ids, labels,
  distances and exit layers, never their training texts, which on a shared database are another team's
  data; "key" - texts only for requests with the text key in `x-text-key` (`text_key`, else $RAEE_TEXT_KEY);
  "on" - for every caller who may classify (one user's own database).
- add examples: POST /v1/examples needs the write key in `x-write-key` (`write_key`, else $RAEE_WRITE_KEY);
  without one configured the route answers 403. On a Milvus server the replica writes with `write_token`
  (a writer role's token; default: `token`); a token that may not write is a 403 naming it.

Versions: a task's collection may be the alias of a versioned build (milvus/versions.py). A replica pins each
batch to one version: before a batch, at most every `version_check_s`, it asks where the alias points and,
when it moved (a rebuild finished, `raee db activate`/`rollback`), opens that version with its calibration
and exit head and answers from it; every prediction names the version (`collection`) that answered.

A replica is an ordinary class: it loads the backbone, key encoder and one exit database per task in
`__init__` (several tasks share one backbone), and answers in `classify`. Tasks arrive as `Task` objects in
`ServeConfig` with the collection the driver chose for each, so a task that exists only in a spec file on
the driver is served the same as a built-in one. Each text of a request becomes one
item of `@serve.batch`, so texts from concurrent requests share one engine call: one search per task and
one mixed-exit forward. Batch limits and request limits live in `user_config`; `reconfigure` applies them
without a redeploy.

Databases: Milvus Lite (`*.db`) is owned by exactly one process, so with Lite there is exactly one replica
and it owns the file (`build_app` refuses replicas > 1). With a Milvus server URI every replica connects
directly and `replicas` scales out.
"""


import asyncio
import hmac
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import numpy as np
import ray
from fastapi import FastAPI, Header, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from inference_workers.engine import FULL_MODEL, BatchEngine, EngineSetupError, Request, Response, ServedTask
from milvus.added import AddedExamples
from milvus.exit_db import ExitDB, ExitDBError, is_lite_uri
from raee import __version__
from raee.exit_policy import DEFAULT_POLICY, POLICIES, all_policies
from raee.keys import check_texts
from raee.spec import ModelSpec
from raee.tasks import Dataset, Task

APP_NAME = "raee"
API_KEY_ENV = "RAEE_API_KEY"  # when set where build_app runs, every /v1/ request needs it in `x-api-key`
TEXT_KEY_ENV = "RAEE_TEXT_KEY"  # neighbour_texts="key": the key that lets a request see neighbour texts
WRITE_KEY_ENV = "RAEE_WRITE_KEY"  # the key POST /v1/examples needs in `x-write-key`
NEIGHBOUR_TEXTS = ("off", "key", "on")
_FOLLOW_TIMEOUT_S = 2.0  # asking where an alias points must not hold a batch long while Milvus is away
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000

POLICY_NAMES = (*POLICIES, FULL_MODEL)


# ---- HTTP schema ------------------------------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    """Texts of one task to classify."""

    task: str = Field(description="A served task name, e.g. 'sst2' (see GET /v1/tasks).", examples=["sst2"])
    texts: list[str] = Field(description="Texts to classify, in order.", examples=[["a gripping film ."]])
    text_pairs: list[str] | None = Field(None, description="For pair tasks: the second text of each pair, in the "
                                                           "same order as texts.")
    explain: bool = Field(False, description="Also return the retrieved neighbours that chose each exit layer.")
    policy: str | None = Field(None, description=f"Exit policy: one of {list(POLICY_NAMES)}; null: the server's "
                                                 "default (GET /healthz). 'full' runs every layer (the baseline).")


class NeighbourOut(BaseModel):
    id: int
    text: str | None = Field(None, description="The neighbour's training text: only for callers with the "
                                               "neighbour-text permission (GET /healthz: neighbour_texts).")
    label: int
    label_word: str
    distance: float = Field(description="Smaller is closer (squared L2 for the default metric).")
    exit_layers: list[int] = Field(description="The layers at which this neighbour's record says the model is "
                                               "right (its exit set, under the answering policy's view).")


class PredictionOut(BaseModel):
    label: int
    label_word: str
    exit_layer: int = Field(description="Transformer blocks run for this text (0 = embeddings only, L = all).")
    probs: list[float] = Field(description="The label distribution the policy answered with (calibrated for the "
                                           "calibrated policies, fused with the neighbours' vote for 'fused').")
    policy: str = Field(description="The exit policy that answered.")
    neighbours: list[NeighbourOut] | None = None
    truncated: bool = Field(False, description="The text was longer than the model's context and was cut to fit "
                                               "(the prediction saw only its beginning).")
    collection: str | None = Field(None, description="The exit-database version whose records chose the exit "
                                                     "(null for the 'full' policy, which retrieves nothing).")


class ClassifyResponse(BaseModel):
    task: str
    predictions: list[PredictionOut]


class AddExamplesRequest(BaseModel):
    """Labelled examples to add to a served task's exit database (live growth)."""

    task: str = Field(description="A served task name.", examples=["sst2"])
    texts: list[str] = Field(description="The examples' texts.", examples=[["a gripping film ."]])
    labels: list[str] = Field(description="One label per text: a label value as the task's data spells it (or its "
                                          "label word).", examples=[["1"]])
    text_pairs: list[str] | None = Field(None, description="For pair tasks: the second text of each example.")


class AddExamplesResponse(BaseModel):
    task: str
    collection: str = Field(description="The exit-database version written.")
    ids: list[int] = Field(description="One record id per example (from its content: the same example, the same id).")
    added: int = Field(description="Examples written now.")
    existing: int = Field(description="Examples stored already with the same text and label: nothing changed.")
    skipped: int = Field(description="Examples left out: the database keeps only examples the full model gets right.")
    seconds_to_visible: float = Field(description="From the write until every new record was readable.")


class TaskInfo(BaseModel):
    name: str
    label_words: list[str]
    pairs: bool = Field(description="Whether requests must send text_pairs.")
    collection: str
    version: str = Field(description="The collection answering now: a version of `collection` when that is an alias.")
    build: str = Field(description="Which training examples the exit database holds.")
    head: str
    n_records: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    backbone: str
    encoder: str
    n_layers: int
    tasks: list[str]
    default_policy: str
    policies: list[str]
    limits: dict[str, int | float] = Field(description="Request and batching limits: max_texts, "
                                                       "max_text_chars, max_batch_size, batch_wait_timeout_s.")
    batches: dict[str, int] = Field(description="Engine calls so far: n, texts, largest (texts in one call).")
    neighbour_texts: str = Field(description="Who sees neighbours' training texts: off, key (x-text-key) or on.")
    adds_examples: bool = Field(description="POST /v1/examples is on (a write key is configured).")
    versions: dict[str, str] = Field(description="Per task, the exit-database version answering now.")
    version_errors: dict[str, str] = Field(description="Per task, why the replica did not switch to the version "
                                                       "its alias points at (it keeps answering from the old one).")


ApiKeyHeader = Annotated[str | None, Header(description=f"The server's API key, when it has one (${API_KEY_ENV}).")]
TextKeyHeader = Annotated[str | None, Header(description="The neighbour-text key: explanations then carry the "
                                                         "neighbours' training texts.")]
WriteKeyHeader = Annotated[str | None, Header(description=f"The write key (${WRITE_KEY_ENV}) POST /v1/examples needs.")]


class ServeSetupError(RuntimeError):
    """The deployment cannot serve what it was asked to (a task without an exit database, Lite with replicas)."""


# ---- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """What a replica serves: tasks (objects, not names), the collection of each, and the exit policies.

    knobs: the policies' parameters (k, tau, beta, slack; each policy takes those it accepts); policy: the
    default for requests that name none. The permissions (neighbour_texts and its text_key, write_key,
    write_token) are described in the module docstring. recorder: the function that records added examples
    (collectors.build.add_examples), handed in by the driver because inference_workers may not import
    collectors; None turns POST /v1/examples off."""

    tasks: tuple[Task, ...]
    collections: dict[str, str]  # task name -> collection (chosen by the driver, see orchestration.pipelines)
    db_uri: str = "./raee.db"
    token: str | None = field(default=None, repr=False)
    policy: str = DEFAULT_POLICY
    knobs: dict[str, float] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)  # None: $RAEE_API_KEY at build_app, else no key needed
    neighbour_texts: Literal["off", "key", "on"] = "off"
    text_key: str | None = field(default=None, repr=False)  # None: $RAEE_TEXT_KEY at build_app
    write_key: str | None = field(default=None, repr=False)  # None: $RAEE_WRITE_KEY at build_app, else no writes
    write_token: str | None = field(default=None, repr=False)  # Milvus token for writes; None: token
    recorder: Callable[..., AddedExamples] | None = field(default=None, repr=False)
    version_check_s: float = 1.0  # how often (at most) a replica asks where each alias points
    db_timeout_s: float = 5.0  # one Milvus call of a request may take this long before the request gets a 503

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ServeSetupError(f"unknown exit policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.neighbour_texts not in NEIGHBOUR_TEXTS:
            raise ServeSetupError(f"neighbour_texts must be one of {', '.join(NEIGHBOUR_TEXTS)}, got "
                                  f"{self.neighbour_texts!r}")
        if self.version_check_s < 0:
            raise ServeSetupError(f"version_check_s must be >= 0, got {self.version_check_s}")
        if self.db_timeout_s <= 0:
            raise ServeSetupError(f"db_timeout_s must be > 0, got {self.db_timeout_s}")
        missing = [t.name for t in self.tasks if t.name not in self.collections]
        if missing:
            raise ServeSetupError(f"no collection chosen for task(s) {missing}")


@dataclass(frozen=True)
class Limits:
    """Request and batching limits (the deployment's user_config, changed live by `reconfigure`)."""

    max_batch_size: int = 32  # texts per engine call, across requests
    batch_wait_timeout_s: float = 0.01  # how long a partial batch waits for more texts
    max_texts: int = 64  # texts per request
    max_text_chars: int = 2000  # characters per text

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_texts, self.max_text_chars) < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError(f"limits must be positive, got {self}")




def _prediction(response: Response, explain: bool, collection: str | None) -> PredictionOut:
    # Defined before RaeeServer: @serve.ingress captures the class with the globals that exist at that point.
    neighbours = None
    if explain and response.neighbours is not None:
        neighbours = [NeighbourOut(id=n.id, text=n.text, label=n.label, label_word=n.label_word,
                                   distance=n.distance, exit_layers=[i for i, p in enumerate(n.exit_probs) if p > 0])
                      for n in response.neighbours]
    return PredictionOut(label=response.label, label_word=response.label_word, exit_layer=response.exit_layer,
                         probs=list(response.probs), policy=response.policy, neighbours=neighbours,
                         truncated=response.truncated, collection=None if response.policy == FULL_MODEL else collection)


def _key_matches(given: str | None, expected: str | None) -> bool:
    """A configured key and the request's header agree (constant-time). Before RaeeServer, as above."""
    return bool(expected and given and hmac.compare_digest(given.encode(), expected.encode()))


def _label_indices(task: Task, labels: Sequence[str]) -> np.ndarray:
    """Class indices of label values ("1"), or of label words ("great", any case); HTTPException 422 else.
    Before RaeeServer, as above."""
    by_value = {v: i for i, v in enumerate(task.label_values)}
    by_word = {w.strip().lower(): i for i, w in enumerate(task.words)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        index = by_value.get(label.strip(), by_word.get(label.strip().lower()))
        if index is None:
            raise HTTPException(422, f"label {i} {label!r} is not one of task {task.name}'s label values "
                                     f"{list(task.label_values)} (or words {list(task.words)})")
        out[i] = index
    return out


def _served_name(asked: str, served: Sequence[str]) -> str | None:
    """The served task `asked` names, forgiving case and dashes ("SST-2" is sst2). Before RaeeServer, as above."""
    def key(name: str) -> str:
        return name.strip().lower().replace("-", "").replace("_", "")

    return next((name for name in served if name == asked), None) or next(
        (name for name in served if key(name) == key(asked)), None)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where it is unavailable). Before RaeeServer, as above."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


app = FastAPI(
    title="raee",
    description="Retrieval-augmented early exit: classify texts with an exit layer chosen from similar "
                "training examples.",
    version=__version__,
    docs_url=None,  # Swagger UI loads its assets from a CDN, so the page is blank offline: /openapi.json instead
    redoc_url=None,
)


def _json_safe(value: Any) -> Any:
    """`value` with what strict JSON cannot carry made printable: inf/NaN floats, lone surrogates in strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@app.exception_handler(RequestValidationError)
async def _validation_error(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 body, made JSON-safe: echoing `1e999` or a lone surrogate back must not become a 500."""
    return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})


@serve.deployment(max_ongoing_requests=64, max_constructor_retry_count=2, graceful_shutdown_timeout_s=10)
@serve.ingress(app)
class RaeeServer:
    """One replica: backbone, key encoder and exit databases loaded once; texts batched across requests."""

    def __init__(self, spec: ModelSpec, config: ServeConfig, n_threads: int | None = 1) -> None:
        backbone, encoder = spec.load(n_threads=n_threads)
        self.config = config
        self.limits = Limits()
        self.batches = {"n": 0, "texts": 0, "largest": 0}
        self.errors: list[str] = []  # tasks that cannot be served, with why
        self.dbs: dict[str, ExitDB] = {}
        self.retired: list[ExitDB] = []  # versions switched away from, closed at the next switch
        self.writers: dict[str, ExitDB] = {}  # task -> handle that writes added examples (write_token)
        self.version_errors: dict[str, str] = {}
        self._lock = threading.Lock()  # one engine call or add at a time: they share the models and the handles
        self._db_failure: tuple[float, ExitDBError | None] = (-math.inf, None)  # when the last batch failed on Milvus
        self._next_version_check = 0.0
        served: dict[str, ServedTask] = {}
        try:
            for task in config.tasks:
                collection = config.collections[task.name]
                try:
                    db = ExitDB(config.db_uri, collection=collection, meta=None, create=False, token=config.token,
                                timeout_s=config.db_timeout_s)
                except ExitDBError as exc:  # reported by setup_errors(), as below
                    self.errors.append(f"no exit database for task {task.name} in {config.db_uri} ({exc}); build "
                                       f"it first: raee build --task {task.name}")
                    continue
                self.dbs[task.name] = db
                if db.count() == 0:  # reported by setup_errors(): a failing __init__ only says "deploy failed"
                    self.errors.append(f"the exit database {collection!r} of task {task.name} in {config.db_uri} "
                                       f"is empty; build it first: raee build --task {task.name}")
                    continue
                served[task.name] = ServedTask.of(task, db)
            self.engine = BatchEngine(backbone, encoder, served, all_policies(**config.knobs), config.policy)
        except BaseException:
            self._close()
            raise

    def setup_errors(self) -> list[str]:
        """Why configured tasks are not served (empty or missing exit databases); [] when all are."""
        return list(self.errors)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new limits (user_config keys are Limits' fields) without reloading anything."""
        self.limits = Limits(**user_config)
        self._classify_batch.set_max_batch_size(self.limits.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(self.limits.batch_wait_timeout_s)

    @app.get("/healthz")
    def healthz(self) -> Health:
        """Liveness and what this replica serves."""
        backbone = self.engine.backbone
        return Health(backbone=backbone.name, encoder=self.engine.encoder.name, n_layers=backbone.n_layers,
                      tasks=list(self.engine.served), default_policy=self.engine.default_policy,
                      policies=list(POLICY_NAMES), limits=dict(self.limits.__dict__), batches=dict(self.batches),
                      neighbour_texts=self.config.neighbour_texts, adds_examples=self._writes_on(),
                      versions={name: e.db.collection for name, e in self.engine.served.items()},
                      version_errors=dict(self.version_errors))

    @app.get("/v1/tasks")
    def tasks(self, x_api_key: ApiKeyHeader = None) -> list[TaskInfo]:
        """The served tasks with their label words and exit-database sizes."""
        self._authorize(x_api_key)
        style = self.engine.backbone.style
        return [TaskInfo(name=name, label_words=list(entry.task.label_words(style)), pairs=entry.task.has_pairs,
                         collection=entry.db.alias or entry.db.collection, version=entry.db.collection,
                         build=entry.db.variant.describe(), head=entry.db.meta.head, n_records=entry.db.count())
                for name, entry in self.engine.served.items()]

    @app.post("/v1/classify")
    async def classify(self, body: ClassifyRequest, x_api_key: ApiKeyHeader = None,
                       x_text_key: TextKeyHeader = None) -> ClassifyResponse:
        """Classify texts of one task; 4xx with a one-line `detail` when the request cannot be served."""
        self._authorize(x_api_key)
        texts_allowed = self.config.neighbour_texts == "on" or (
            self.config.neighbour_texts == "key" and _key_matches(x_text_key, self.config.text_key))
        items = [replace(item, neighbour_texts=texts_allowed) for item in self._check(body)]
        try:
            answers = await asyncio.gather(*(self._classify_batch(item) for item in items))
        except ExitDBError as exc:  # Milvus down or restarting: a retryable 503 naming it, not a 500
            raise HTTPException(503, f"exit database {self.config.db_uri} is unavailable, retry later: {exc}",
                                headers={"Retry-After": "5"}) from exc
        return ClassifyResponse(task=items[0].task, predictions=[_prediction(a, body.explain, collection)
                                                                 for a, collection in answers])

    @app.post("/v1/examples")
    async def add_examples(self, body: AddExamplesRequest, x_api_key: ApiKeyHeader = None,
                           x_write_key: WriteKeyHeader = None) -> AddExamplesResponse:
        """Add labelled examples to a served task's exit database; later classify requests retrieve them.

        401 without the write key (x-write-key), 403 where writes are off or Milvus refuses the replica's token."""
        self._authorize(x_api_key)
        if not self._writes_on():
            raise HTTPException(403, "adding examples is off on this server: start it with a write key "
                                     f"(${WRITE_KEY_ENV}) to turn POST /v1/examples on")
        if not _key_matches(x_write_key, self.config.write_key):
            raise HTTPException(401, "missing or wrong write key: send it in the x-write-key header",
                                headers={"WWW-Authenticate": "x-write-key"})
        name, data = self._check_examples(body)
        try:
            added = await asyncio.to_thread(self._add, name, data)
        except ExitDBError as exc:
            if "permission denied" in str(exc):
                raise HTTPException(403, f"the server's Milvus token may not write to the exit database ({exc}); "
                                         "start it with a writer token (raee serve --write-token, "
                                         "$RAEE_MILVUS_WRITE_TOKEN)") from exc
            raise HTTPException(503, f"exit database {self.config.db_uri} is unavailable, retry later: {exc}",
                                headers={"Retry-After": "5"}) from exc
        return AddExamplesResponse(task=name, collection=added.collection, ids=list(added.ids), added=added.n_new,
                                   existing=added.n_existing, skipped=added.n_skipped,
                                   seconds_to_visible=added.seconds_to_visible)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, items: list[Request]) -> list[tuple[Response, str]]:
        # The engine is blocking torch code: run it off the event loop so new requests keep queueing.
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: Sequence[Request]) -> list[tuple[Response, str]]:
        """Every item through the engine, with the version that answered it: one search per (task, policy) in
        the batch, all from one version per task; order kept.

        A batch that waited for the lock while the batch ahead of it failed on Milvus fails at once with the
        same error: each would otherwise wait out its own timeout, and queued requests would hang for several."""
        waiting_since = time.monotonic()
        with self._lock:
            failed_at, failure = self._db_failure
            if failed_at >= waiting_since:
                raise ExitDBError(failure.operation, failure.collection,
                                  f"{failure.detail} (the batch ahead of this one failed so while this one waited)")
            self._follow_aliases()
            self.batches = {"n": self.batches["n"] + 1, "texts": self.batches["texts"] + len(items),
                            "largest": max(self.batches["largest"], len(items))}
            engine = self.engine
            try:
                answers = engine.run(items)
            except ExitDBError as exc:
                self._db_failure = (time.monotonic(), exc)
                raise
        return [(a, engine.served[item.task].db.collection) for a, item in zip(answers, items, strict=True)]

    def _writes_on(self) -> bool:
        return bool(self.config.write_key) and self.config.recorder is not None

    def _add(self, name: str, data: Dataset) -> AddedExamples:
        """Record the examples into the version the task's alias points at now (under the model lock)."""
        with self._lock:
            self._follow_aliases(force=True)
            entry = self.engine.served[name]
            writer = self.writers.get(name)
            if writer is None or writer.collection != entry.db.collection:
                if writer is not None:
                    writer.close()
                writer = ExitDB(self.config.db_uri, collection=entry.db.collection, meta=entry.db.meta, create=False,
                                token=self.config.write_token or self.config.token)
                self.writers[name] = writer
            return self.config.recorder(self.engine.backbone, self.engine.encoder, writer, data, head=entry.head,
                                        token=self.config.write_token or self.config.token)

    def _follow_aliases(self, *, force: bool = False) -> None:
        """Switch each task whose alias moved to the version it points at now (at most every version_check_s).

        A version that does not fit this replica (another backbone, task spec or head) is not switched to: the
        replica keeps answering from the one it has and says why in /healthz (version_errors)."""
        now = time.monotonic()
        if not force and now < self._next_version_check:
            return
        self._next_version_check = now + self.config.version_check_s
        served = dict(self.engine.served)
        for name, entry in self.engine.served.items():
            if entry.db.alias is None:
                continue
            try:
                if entry.db.resolve(timeout_s=_FOLLOW_TIMEOUT_S) == entry.db.collection:
                    continue
                db = ExitDB(self.config.db_uri, collection=entry.db.alias, meta=None, create=False,
                            token=self.config.token, timeout_s=self.config.db_timeout_s)
            except ExitDBError as exc:
                self.version_errors[name] = f"cannot follow {entry.db.alias}: {exc}"
                continue
            try:
                fresh = ServedTask.of(entry.task, db)
                BatchEngine(self.engine.backbone, self.engine.encoder, {name: fresh}, self.engine.policies,
                            self.engine.default_policy)  # checks the version fits this replica's setup
            except (EngineSetupError, ExitDBError, ValueError) as exc:
                db.close()
                self.version_errors[name] = f"not switching {entry.db.alias} to {db.collection}: {exc}"
                continue
            served[name] = fresh
            self.version_errors.pop(name, None)
        if served != dict(self.engine.served):
            for old in self.retired:  # switched away from one switch ago: no batch or route uses them now
                old.close()
            self.retired = [e.db for n, e in self.engine.served.items() if served[n] is not e]
            self.dbs.update({n: e.db for n, e in served.items()})
            self.engine = BatchEngine(self.engine.backbone, self.engine.encoder, served, self.engine.policies,
                                      self.engine.default_policy)

    def process_info(self) -> dict[str, int]:
        """This replica's pid and resident memory (bytes): load and fault tests call it through a handle.

        Not an HTTP route, so the pid is never exposed to clients."""
        return {"pid": os.getpid(), "rss_bytes": _rss_bytes()}

    def _authorize(self, x_api_key: str | None) -> None:
        """401 unless the server needs no key or `x-api-key` matches it (constant-time comparison)."""
        if self.config.api_key and not _key_matches(x_api_key, self.config.api_key):
            raise HTTPException(401, "missing or wrong API key: send it in the x-api-key header",
                                headers={"WWW-Authenticate": "x-api-key"})

    def _check_examples(self, body: AddExamplesRequest) -> tuple[str, Dataset]:
        """(served task name, the examples as a Dataset), or HTTPException 404/413/422 as for classify."""
        check = ClassifyRequest(task=body.task, texts=body.texts, text_pairs=body.text_pairs)
        name = self._check(check)[0].task
        if len(body.labels) != len(body.texts):
            raise HTTPException(422, f"{len(body.labels)} labels for {len(body.texts)} texts; send one label per text")
        task = self.engine.served[name].task
        labels = _label_indices(task, body.labels)
        pairs = tuple(body.text_pairs) if body.text_pairs is not None else None
        return name, Dataset(task, "train", tuple(body.texts), labels, None, pairs)

    def _check(self, body: ClassifyRequest) -> list[Request]:
        """The engine requests, or HTTPException: 404 unknown task, 422 bad input or policy, 413 too much input."""
        pairs = body.text_pairs or []
        for field_name, value in [("task", body.task), *((f"text {i}", t) for i, t in enumerate(body.texts)),
                                  *((f"text_pair {i}", t) for i, t in enumerate(pairs))]:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON allows "\ud800"; the tokenizer and the response do not
                raise HTTPException(422, f"{field_name} is not valid Unicode: a lone surrogate at character "
                                         f"{exc.start}") from exc
        name = _served_name(body.task, self.engine.served)
        if name is None:
            raise HTTPException(404, f"task {body.task!r} is not served here; this server serves: "
                                     f"{', '.join(self.engine.served)}")
        entry = self.engine.served[name]
        if body.policy is not None and body.policy not in POLICY_NAMES:
            raise HTTPException(422, f"unknown policy {body.policy!r}; use one of {', '.join(POLICY_NAMES)} "
                                     "or null for the server's default")
        limits = self.limits
        if not body.texts:
            raise HTTPException(422, f"texts is empty; send 1 to {limits.max_texts} texts")
        if len(body.texts) > limits.max_texts:
            raise HTTPException(413, f"too many texts: {len(body.texts)} > {limits.max_texts} per request; "
                                     "split the request")
        if entry.task.has_pairs != (body.text_pairs is not None) or len(pairs) not in (0, len(body.texts)):
            need = (f"task {body.task!r} classifies pairs: send text_pairs, one per text" if entry.task.has_pairs
                    else f"task {body.task!r} takes no text_pairs")
            raise HTTPException(422, need)
        for field_name, values in (("texts", body.texts), ("text_pairs", pairs)):
            try:
                check_texts(values)
            except ValueError as exc:
                raise HTTPException(422, f"{field_name}: {exc}") from exc
            for i, text in enumerate(values):
                if len(text) > limits.max_text_chars:
                    raise HTTPException(413, f"{field_name[:-1]} {i} has {len(text)} characters, more than the "
                                             f"limit of {limits.max_text_chars} (raee serve --max-text-chars)")
        unavailable = self.engine.policy_unavailable(name, body.policy or self.engine.default_policy)
        if unavailable is not None:
            raise HTTPException(422, unavailable)
        return [Request(text, name, body.explain, pairs[i] if pairs else None, body.policy)
                for i, text in enumerate(body.texts)]

    def _close(self) -> None:
        handles = [*getattr(self, "dbs", {}).values(), *getattr(self, "retired", []),
                   *getattr(self, "writers", {}).values()]  # __init__ may have failed before the databases
        for db in handles:
            db.close()

    def __del__(self) -> None:
        self._close()  # releases a Milvus Lite file for the next owner


# ---- building and running ---------------------------------------------------------------------------------


def build_app(
    spec: ModelSpec,
    config: ServeConfig,
    *,
    replicas: int = 1,
    num_gpus: float | None = None,
    cpus_per_replica: float = 1.0,
    n_threads: int | None = 1,
    limits: Limits | None = None,
) -> serve.Application:
    """The bound application: `replicas` copies of RaeeServer, each with its own models (and GPU, if any).

    num_gpus None: 1 per replica when the connected cluster has GPUs, else 0. Milvus Lite allows one replica."""
    if replicas < 1:
        raise ServeSetupError(f"replicas must be >= 1, got {replicas}")
    if replicas > 1 and is_lite_uri(config.db_uri):
        raise ServeSetupError(f"Milvus Lite database {config.db_uri!r} can be owned by one process only, so it "
                              f"serves one replica, not {replicas}; for more replicas use a Milvus server "
                              "(docker compose -f docker-compose.milvus.yml up -d; --db http://127.0.0.1:19530)")
    if not config.tasks:
        raise ServeSetupError("no tasks to serve; pass at least one task")
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        config = replace(config, api_key=os.environ[API_KEY_ENV])
    if config.text_key is None and os.environ.get(TEXT_KEY_ENV):
        config = replace(config, text_key=os.environ[TEXT_KEY_ENV])
    if config.write_key is None and os.environ.get(WRITE_KEY_ENV):
        config = replace(config, write_key=os.environ[WRITE_KEY_ENV])
    if config.neighbour_texts == "key" and not config.text_key:
        raise ServeSetupError(f"neighbour_texts='key' needs a text key: set ${TEXT_KEY_ENV} (or ServeConfig.text_key)")
    if is_lite_uri(config.db_uri):  # replicas run in another working directory
        config = replace(config, db_uri=os.path.abspath(config.db_uri))
    if num_gpus is None:
        num_gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    limits = limits or Limits()
    deployment = RaeeServer.options(num_replicas=replicas, user_config=dict(limits.__dict__),
                                    max_ongoing_requests=max(64, limits.max_batch_size),
                                    ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": num_gpus})
    return deployment.bind(spec, config, n_threads)


def start_http(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """Start Ray Serve's HTTP proxy on host:port (loopback by default) on the connected cluster; its base URL."""
    serve.start(http_options={"host": host, "port": port})
    return f"http://{host}:{port}"


def run_app(application: serve.Application, *, name: str = APP_NAME, route_prefix: str = "/",
            timeout_s: float = 120.0) -> DeploymentHandle:
    """Deploy (or update in place) the application; returns once every replica is ready.

    Raises ServeSetupError with the replica's reasons when a configured task has no exit database."""
    handle = serve.run(application, name=name, route_prefix=route_prefix)
    errors = handle.setup_errors.remote().result(timeout_s=timeout_s)
    if errors:
        raise ServeSetupError("; ".join(errors))
    return handle


def delete_app(name: str = APP_NAME) -> None:
    """Remove the application; its replicas exit and release their databases."""
    serve.delete(name)


def shutdown() -> None:
    """Stop Serve (proxy, controller and every application) on the connected cluster."""
    serve.shutdown()
