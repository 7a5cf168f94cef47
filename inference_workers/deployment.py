"""Ray Serve deployment: an HTTP JSON API over `BatchEngine` (paper Algorithm 3.2), with request batching.

    POST /v1/classify {"task": "sst2", "texts": ["..."], "explain": false, "policy": null}
         -> {"task", "predictions": [{"label", "label_word", "exit_layer", "probs", "policy", "neighbours"?,
             "truncated"}]}
    GET  /v1/tasks    the served tasks, their label words, policies and database sizes
    GET  /healthz     200 once the replica has loaded its models and databases; limits and policies
    GET  /openapi.json  the API schema (no /docs page: Swagger UI would load its assets from a CDN)

With an API key (`ServeConfig.api_key`, else $RAEE_API_KEY where `build_app` runs) the /v1/ routes answer 401
unless the request carries it in the `x-api-key` header; /healthz and the OpenAPI pages stay open.

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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import ray
from fastapi import FastAPI, Header, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from inference_workers.engine import FULL_MODEL, BatchEngine, Request, Response, ServedTask
from milvus.exit_db import ExitDB, ExitDBError, is_lite_uri
from raee import __version__
from raee.exit_policy import DEFAULT_POLICY, POLICIES, all_policies
from raee.keys import check_texts
from raee.spec import ModelSpec
from raee.tasks import Task

APP_NAME = "raee"
API_KEY_ENV = "RAEE_API_KEY"  # when set where build_app runs, every /v1/ request needs it in `x-api-key`
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
    text: str
    label: int
    label_word: str
    distance: float = Field(description="Smaller is closer (squared L2 for the default metric).")


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


class ClassifyResponse(BaseModel):
    task: str
    predictions: list[PredictionOut]


class TaskInfo(BaseModel):
    name: str
    label_words: list[str]
    pairs: bool = Field(description="Whether requests must send text_pairs.")
    collection: str
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


ApiKeyHeader = Annotated[str | None, Header(description=f"The server's API key, when it has one (${API_KEY_ENV}).")]


class ServeSetupError(RuntimeError):
    """The deployment cannot serve what it was asked to (a task without an exit database, Lite with replicas)."""


# ---- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """What a replica serves: tasks (objects, not names), the collection of each, and the exit policies.

    knobs: the policies' parameters (k, tau, beta, slack; each policy takes those it accepts); policy: the
    default for requests that name none."""

    tasks: tuple[Task, ...]
    collections: dict[str, str]  # task name -> collection (chosen by the driver, see orchestration.pipelines)
    db_uri: str = "./raee.db"
    token: str | None = None
    policy: str = DEFAULT_POLICY
    knobs: dict[str, float] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)  # None: $RAEE_API_KEY at build_app, else no key needed

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ServeSetupError(f"unknown exit policy {self.policy!r}; known: {', '.join(POLICIES)}")
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




def _prediction(response: Response, explain: bool) -> PredictionOut:
    # Defined before RaeeServer: @serve.ingress captures the class with the globals that exist at that point.
    neighbours = None
    if explain and response.neighbours is not None:
        neighbours = [NeighbourOut(id=n.id, text=n.text, label=n.label, label_word=n.label_word,
                                   distance=n.distance) for n in response.neighbours]
    return PredictionOut(label=response.label, label_word=response.label_word, exit_layer=response.exit_layer,
                         probs=list(response.probs), policy=response.policy, neighbours=neighbours,
                         truncated=response.truncated)


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
        served: dict[str, ServedTask] = {}
        try:
            for task in config.tasks:
                collection = config.collections[task.name]
                try:
                    db = ExitDB(config.db_uri, collection=collection, meta=None, create=False, token=config.token)
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
                      policies=list(POLICY_NAMES), limits=dict(self.limits.__dict__), batches=dict(self.batches))

    @app.get("/v1/tasks")
    def tasks(self, x_api_key: ApiKeyHeader = None) -> list[TaskInfo]:
        """The served tasks with their label words and exit-database sizes."""
        self._authorize(x_api_key)
        style = self.engine.backbone.style
        return [TaskInfo(name=name, label_words=list(entry.task.label_words(style)), pairs=entry.task.has_pairs,
                         collection=entry.db.collection, build=entry.db.variant.describe(), head=entry.db.meta.head,
                         n_records=entry.db.count()) for name, entry in self.engine.served.items()]

    @app.post("/v1/classify")
    async def classify(self, body: ClassifyRequest, x_api_key: ApiKeyHeader = None) -> ClassifyResponse:
        """Classify texts of one task; 4xx with a one-line `detail` when the request cannot be served."""
        self._authorize(x_api_key)
        items = self._check(body)
        try:
            answers = await asyncio.gather(*(self._classify_batch(item) for item in items))
        except ExitDBError as exc:  # Milvus down or restarting: a retryable 503 naming it, not a 500
            raise HTTPException(503, f"exit database {self.config.db_uri} is unavailable, retry later: {exc}",
                                headers={"Retry-After": "5"}) from exc
        return ClassifyResponse(task=items[0].task, predictions=[_prediction(a, body.explain) for a in answers])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, items: list[Request]) -> list[Response]:
        # The engine is blocking torch code: run it off the event loop so new requests keep queueing.
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: Sequence[Request]) -> list[Response]:
        """Every item through the engine: one search per (task, policy) in the batch; order kept."""
        self.batches = {"n": self.batches["n"] + 1, "texts": self.batches["texts"] + len(items),
                        "largest": max(self.batches["largest"], len(items))}
        return self.engine.run(items)

    def process_info(self) -> dict[str, int]:
        """This replica's pid and resident memory (bytes): load and fault tests call it through a handle.

        Not an HTTP route, so the pid is never exposed to clients."""
        return {"pid": os.getpid(), "rss_bytes": _rss_bytes()}

    def _authorize(self, x_api_key: str | None) -> None:
        """401 unless the server needs no key or `x-api-key` matches it (constant-time comparison)."""
        expected = self.config.api_key
        if expected and not (x_api_key and hmac.compare_digest(x_api_key.encode(), expected.encode())):
            raise HTTPException(401, "missing or wrong API key: send it in the x-api-key header",
                                headers={"WWW-Authenticate": "x-api-key"})

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
        return [Request(text, name, body.explain, pairs[i] if pairs else None, body.policy)
                for i, text in enumerate(body.texts)]

    def _close(self) -> None:
        for db in getattr(self, "dbs", {}).values():  # __init__ may have failed before the databases
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
