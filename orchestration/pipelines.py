"""Entry-point pipelines: what each CLI command and the Python API do, as plain functions returning plain data.

The pipeline, not the CLI, chooses where work runs (`engine="local" | "ray"`), finds the exit database a
query should use (`choose_build`: a database with one build for the task needs no options; with several,
the error lists them and how to pick one; a versioned build is one choice, under its alias), and loads
models once per command. `add_examples` and the `db_*` functions operate a (shared) database: live growth,
versions, listing, dropping, export and import (docs/milvus.md, "Operating a shared database").
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from collectors.build import BuildOptions, BuildSummary
from inference_workers.engine import FULL_MODEL, BatchEngine, Response, ServedTask, stored_head
from milvus.added import AddedExamples
from milvus.exit_db import ExitDB, ExitDBError, StoredBuild, is_lite_uri, list_exit_dbs
from raee.exit_policy import DEFAULT_POLICY, all_policies
from raee.models import load_backbone
from raee.spec import ModelSpec
from raee.tasks import Dataset, Task, layer_stats, load_split, score, with_data

if TYPE_CHECKING:
    from milvus.admin import CollectionInfo
    from milvus.transfer import Transfer
    from milvus.versions import Switch

Engine = Literal["local", "ray"]


class ExitDatabaseError(RuntimeError):
    """No usable exit database for a query: none built, several to choose from, or built for another setup."""


@dataclass(frozen=True)
class BuildSelector:
    """Which of a task's builds a query uses when a database holds several (None: any)."""

    collection: str | None = None
    fraction: float | None = None
    only_correct: bool | None = None
    head: str | None = None  # "lm" or "offramp"

    def matches(self, build: StoredBuild) -> bool:
        return ((self.collection is None or build.collection == self.collection)
                and (self.fraction is None or abs(build.variant.fraction - self.fraction) < 1e-12)
                and (self.only_correct is None or build.variant.only_correct == self.only_correct)
                and (self.head is None or build.meta.head.split(":")[0] == self.head))

    def describe(self) -> str:
        given = [f"--collection {self.collection}" if self.collection else "",
                 f"--fraction {self.fraction:g}" if self.fraction is not None else "",
                 "--only-correct" if self.only_correct else "", f"--head {self.head}" if self.head else ""]
        return " ".join(g for g in given if g)


@dataclass(frozen=True)
class RayOptions:
    """Where Ray work runs: a new local cluster (address None) or an existing one, and how wide."""

    address: str | None = None
    num_actors: int | None = None  # collector actors: one per GPU, else CPUs - 1 by default
    cpus_per_actor: float | None = None  # None: what leaves a CPU for reading (collectors.ray_collect.pool_shape)


def task_argument(task: Task) -> str:
    """How a user names the task on the command line: its spec path, or its built-in name."""
    return task.source if task.source.endswith(".toml") else task.name


# ---- raee layers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTable:
    """Per-layer score of a backbone on a task's test split; row l is layer l, the last row the full model."""

    task: str
    model: str
    metric: str
    n_examples: int
    scores: np.ndarray  # (L+1,)
    constant_share: np.ndarray  # (L+1,) share of examples given the layer's most frequent prediction
    seconds: float
    n_calibration: int = 0  # training examples the calibration was fitted on (0: not calibrated)
    scores_calibrated: np.ndarray | None = None  # (L+1,) after contextual calibration
    constant_share_calibrated: np.ndarray | None = None  # (L+1,)

    def to_dict(self) -> dict:
        def rounded(values: np.ndarray | None) -> list[float] | None:
            return None if values is None else [round(float(v), 4) for v in values]

        return {"task": self.task, "model": self.model, "metric": self.metric, "n_examples": self.n_examples,
                "scores": rounded(self.scores), "constant_share": rounded(self.constant_share),
                "n_calibration": self.n_calibration, "scores_calibrated": rounded(self.scores_calibrated),
                "constant_share_calibrated": rounded(self.constant_share_calibrated), "seconds": round(self.seconds, 1)}


def layer_table(task: Task, *, model: ModelSpec, limit: int | None = None, data_dir: str | None = None,
                quiet: bool = False, backbone=None, calibration_examples: int = 0) -> LayerTable:
    """One forward per batch over the test split, scoring every layer's label-word argmax.

    calibration_examples > 0 also fits a contextual calibration on a seeded sample of that many *training*
    examples and scores the calibrated layers (raee/calibration.py)."""
    from raee.calibration import fit_calibration

    data = load_split(task, "test", data_dir).sample(limit)  # bad data fails before the model loads
    train = load_split(task, "train", data_dir).sample(calibration_examples) if calibration_examples else None
    backbone = backbone or load_backbone(model.backbone, cache_dir=model.cache_dir, device=model.device,
                                         batch_size=model.batch_size)
    start = time.perf_counter()
    probs = backbone.layer_probs(data.texts, task, pairs=data.pairs, show_progress=not quiet)  # (N, L+1, C)
    scores, shares = layer_stats(task, probs, data.labels)
    table = LayerTable(task.name, model.backbone, task.metric, len(data), scores, shares, 0.0)
    if train is not None:
        calibration = fit_calibration(backbone.layer_probs(train.texts, task, pairs=train.pairs,
                                                           show_progress=not quiet))
        cal_scores, cal_shares = layer_stats(task, calibration.apply(probs), data.labels)
        table = replace(table, n_calibration=len(train), scores_calibrated=cal_scores,
                        constant_share_calibrated=cal_shares)
    return replace(table, seconds=time.perf_counter() - start)


# ---- raee build -----------------------------------------------------------------------------------------------


def build(tasks: Sequence[Task], *, model: ModelSpec, db_uri: str, options: BuildOptions | None = None,
          token: str | None = None, data_dir: str | None = None, engine: Engine = "local",
          ray_options: RayOptions | None = None, quiet: bool = False) -> list[BuildSummary]:
    """Algorithm 3.1 for each task's training split, into the exit database at db_uri, in process or on Ray.

    Every task's data is read (and checked) before any model loads: in process here, on Ray by the driver's scan."""
    options = options or BuildOptions()
    if engine == "ray":  # streams each training file: read in blocks by Ray Data, never whole in the driver
        from orchestration.distributed import build_with_ray

        result = build_with_ray(tasks, model=model, db_uri=db_uri, options=options, token=token, data_dir=data_dir,
                                ray_options=ray_options, quiet=quiet)
        return list(result.summaries)
    if engine != "local":
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    from collectors.build import build_database

    datasets = {task.name: load_split(task, "train", data_dir) for task in tasks}  # checked before models load
    backbone, encoder = model.load()
    return [build_database(backbone, encoder, task, db_uri=db_uri, options=options, token=token,
                           dataset=datasets[task.name], show_progress=not quiet) for task in tasks]


# ---- finding a build ------------------------------------------------------------------------------------------


def choose_build(db_uri: str, task: Task, *, model: ModelSpec | None = None, token: str | None = None,
                 selector: BuildSelector | None = None) -> StoredBuild:
    """The one exit database of `task` in db_uri that a query should use; ExitDatabaseError says why not.

    Builds of other backbones or key encoders are left out when `model` names them; the task spec's digest
    must match (an edited template or label set needs a rebuild). Runs before any model loads."""
    selector = selector or BuildSelector()
    arg = task_argument(task)
    build_cmd = f"raee build --task {arg} --db {db_uri}"
    if is_lite_uri(db_uri) and not os.path.exists(db_uri):
        raise ExitDatabaseError(f"no exit database at {db_uri}; build one with: {build_cmd}")
    found = list_exit_dbs(db_uri, token=token)
    mine = [b for b in found if b.meta is not None and b.meta.task == task.name]
    if not mine:
        others = sorted({b.meta.task for b in found if b.meta is not None})
        old = [b.collection for b in found if b.meta is None]
        holds = f"it holds builds for: {', '.join(others)}" if others else "it holds no exit database"
        note = f" ({len(old)} written by an older raee need a rebuild)" if old else ""
        raise ExitDatabaseError(f"no exit database for task {task.name} in {db_uri} ({holds}{note}); "
                                f"build it with: {build_cmd}")
    chosen = [b for b in mine if selector.matches(b)]
    if not chosen:
        raise ExitDatabaseError(f"no build of task {task.name} in {db_uri} matches {selector.describe()}; it "
                                f"holds: {'; '.join(b.describe() for b in mine)}")
    if model is not None and model.factory is None:
        same_model = [b for b in chosen if b.meta.backbone == model.backbone
                      and b.meta.encoder.split(":")[0] in (model.encoder, "backbone")]
        if not same_model:
            b = chosen[0]
            raise ExitDatabaseError(f"the exit database of task {task.name} in {db_uri} was built with backbone "
                                    f"{b.meta.backbone} and key encoder {b.meta.encoder}, not {model.backbone} / "
                                    f"{model.encoder}; pass --model {b.meta.backbone} --encoder "
                                    f"{b.meta.encoder.split(':')[0]}, or rebuild: {build_cmd}")
        chosen = same_model
    digests = {task.digest("causal"), task.digest("mlm") if task.mlm_template else None}
    current = [b for b in chosen if b.meta.task_digest in digests]
    if not current:
        b = chosen[0]
        raise ExitDatabaseError(f"the exit database {b.collection} was built for another version of task "
                                f"{task.name} (task digest stored {b.meta.task_digest}, this spec "
                                f"{task.digest('causal')}): the template, label values or label words changed; "
                                f"rebuild it: {build_cmd}")
    if len(current) > 1:
        listed = "; ".join(b.describe() for b in current)
        raise ExitDatabaseError(f"{len(current)} exit databases for task {task.name} in {db_uri}: {listed}; pick "
                                "one with --collection NAME (or --fraction / --only-correct / --head)")
    return current[0]


@contextmanager
def open_engine(tasks: Sequence[Task], *, model: ModelSpec, db_uri: str, token: str | None = None,
                selector: BuildSelector | None = None, policy: str = DEFAULT_POLICY,
                knobs: dict[str, float] | None = None, backbone_and_encoder=None) -> Iterator[BatchEngine]:
    """A BatchEngine over each task's chosen build (found before the models load); the databases close after."""
    builds = {task.name: choose_build(db_uri, task, model=model, token=token, selector=selector) for task in tasks}
    backbone, encoder = backbone_and_encoder or model.load()
    with ExitStack() as stack:
        served = {}
        for task in tasks:
            db = stack.enter_context(ExitDB(db_uri, collection=builds[task.name].collection, meta=None,
                                            create=False, token=token))
            served[task.name] = ServedTask.of(task, db)
        yield BatchEngine(backbone, encoder, served, all_policies(**(knobs or {})), policy)


# ---- raee explain and raee score ------------------------------------------------------------------------------


def explain(texts: list[str], task: Task, *, model: ModelSpec, db_uri: str, pairs: list[str] | None = None,
            token: str | None = None, selector: BuildSelector | None = None, policy: str = DEFAULT_POLICY,
            knobs: dict[str, float] | None = None) -> list[Response]:
    """RAEE answers with the retrieved neighbours that chose each exit (the paper's Tables 9-10)."""
    with open_engine([task], model=model, db_uri=db_uri, token=token, selector=selector, policy=policy,
                     knobs=knobs) as engine:
        return engine.classify(texts, task, pairs=pairs, explain=True)


@dataclass(frozen=True)
class ScoreReport:
    """A labelled split through the real engine with one policy, and through the full model, timed side by side."""

    task: str
    metric: str
    policy: str
    collection: str
    n_examples: int
    score: float
    full_score: float
    mean_exit_layer: float
    n_layers: int
    ms_per_example: float  # end to end: keys, search, policy, truncated forward
    full_ms_per_example: float
    speedup: float  # full_ms_per_example / ms_per_example, measured in the same process on the same texts
    batch_size: int

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def score_split(task: Task, *, model: ModelSpec, db_uri: str, token: str | None = None,
                selector: BuildSelector | None = None, policy: str = DEFAULT_POLICY,
                knobs: dict[str, float] | None = None, split: str = "test", limit: int | None = None,
                data_dir: str | None = None, batch_size: int = 32, quiet: bool = False) -> ScoreReport:
    """`raee score`: classify a labelled split with the engine (one policy) and with the full model; score both.

    The two run batch by batch, alternating, on the same texts in the same process, so the speed-up is a ratio
    measured side by side."""
    from tqdm.auto import tqdm

    data = load_split(task, split, data_dir).sample(limit)  # bad data fails before the model loads
    with open_engine([task], model=model, db_uri=db_uri, token=token, selector=selector, policy=policy,
                     knobs=knobs) as engine:
        engine.classify(list(data.texts[:2]), task, pairs=None if data.pairs is None else list(data.pairs[:2]))
        engine.classify(list(data.texts[:2]), task, pairs=None if data.pairs is None else list(data.pairs[:2]),
                        policy=FULL_MODEL)  # warm-up, not timed
        answers: list[Response] = []
        full: list[Response] = []
        seconds = {"raee": 0.0, "full": 0.0}
        for start in tqdm(range(0, len(data), batch_size), disable=quiet, desc=f"score {task.name}", unit="batch"):
            part = data.take(np.arange(start, min(start + batch_size, len(data))))
            pairs = None if part.pairs is None else list(part.pairs)
            for name, out, chosen in (("raee", answers, None), ("full", full, FULL_MODEL)):
                t0 = time.perf_counter()
                out += engine.classify(list(part.texts), task, pairs=pairs, policy=chosen)
                seconds[name] += time.perf_counter() - t0
        collection = engine.served[task.name].db.collection
        n_layers = engine.backbone.n_layers
    preds = np.array([r.label for r in answers], dtype=np.int64)
    full_preds = np.array([r.label for r in full], dtype=np.int64)
    n = max(len(data), 1)
    ms, full_ms = 1000 * seconds["raee"] / n, 1000 * seconds["full"] / n
    return ScoreReport(task.name, task.metric, policy, collection, len(data), score(task, preds, data.labels),
                       score(task, full_preds, data.labels), float(np.mean([r.exit_layer for r in answers])),
                       n_layers, ms, full_ms, full_ms / ms if ms > 0 else float("nan"), batch_size)


# ---- raee eval ------------------------------------------------------------------------------------------------


def evaluate(tasks: list[Task], *, model: ModelSpec, config, out_dir: str, command: str,
             data_dir: str | None = None, quiet: bool = False, engine: Engine = "local",
             ray_options: RayOptions | None = None) -> tuple[list, str]:
    """`raee eval`: every method on every task; writes results.json, results.md and figures into out_dir."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from orchestration.evaluate import evaluate_task
    from orchestration.report import markdown

    for task in tasks:  # bad data fails before the model loads
        load_split(task, "test", data_dir)
        load_split(task, "train", data_dir)
    if engine == "ray":
        from orchestration.distributed import eval_with_ray

        return eval_with_ray(tasks, config=config, out_dir=out_dir, command=command, model=model, data_dir=data_dir,
                             ray_options=ray_options, quiet=quiet)
    backbone, key_encoder = model.load()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"model": model.backbone, "encoder": key_encoder.name, "command": command, **asdict(config)}
    results = []
    for task in tasks:
        result = evaluate_task(task, backbone, key_encoder, config, data_dir=data_dir, quiet=quiet,
                               figure_dir=str(out / "figures"))
        results.append(result.to_dict())
        (out / "results.json").write_text(json.dumps({"header": header, "tasks": results}, indent=1))
    text = markdown(results, header=header)
    (out / "results.md").write_text(text)
    return results, text



# ---- raee add: live growth ------------------------------------------------------------------------------------


def add_examples(task: Task, examples: str | os.PathLike[str] | Dataset, *, model: ModelSpec, db_uri: str,
                 token: str | None = None, selector: BuildSelector | None = None,
                 batch_size: int = 32) -> AddedExamples:
    """`raee add`: labelled examples (a file in the task's columns, or a Dataset) recorded into the task's build.

    The records come from the same backbone, key encoder and stored exit head as the build's, under content ids
    (adding an example twice changes nothing); returns once readers of the database see them. A Milvus Lite
    file that `raee serve` holds cannot be opened here: add through the server (POST /v1/examples) then."""
    from collectors.build import add_examples as record

    data = examples if isinstance(examples, Dataset) else load_split(
        with_data(task, train=str(Path(examples).resolve()), format=None), "train")  # bad rows fail before any model
    if not len(data):
        raise ExitDatabaseError(f"no examples to add in {examples}")
    try:
        build = choose_build(db_uri, task, model=model, token=token, selector=selector)
        db = ExitDB(db_uri, collection=build.collection, meta=None, create=False, token=token)
    except ExitDBError as exc:
        if is_lite_uri(db_uri) and "owned by another process" in str(exc):
            raise ExitDatabaseError(f"{db_uri} is held by another process (raee serve?) and Milvus Lite has one "
                                    "owner: add the examples through that server, POST /v1/examples with its write "
                                    "key") from exc
        raise
    with db:
        head = stored_head(db)
        backbone, encoder = model.load()
        return record(backbone, encoder, db, data, head=head, batch_size=batch_size, token=token)


# ---- raee db: operating a (shared) database -------------------------------------------------------------------


def db_list(db_uri: str, *, token: str | None = None) -> list[CollectionInfo]:
    """`raee db list`: every exit-database collection at db_uri, each version of a versioned build on its own row."""
    from milvus.admin import list_collections

    if is_lite_uri(db_uri) and not os.path.exists(db_uri):
        return []
    return list_collections(db_uri, token=token)


def db_describe(name: str, db_uri: str, *, token: str | None = None) -> dict:
    """`raee db describe NAME`: the build's collections, and of the one queries read its count, index, calibration."""
    from milvus.admin import describe_build

    _require_lite_file(db_uri)
    return describe_build(db_uri, name, token=token)


def db_activate(name: str, version: str, db_uri: str, *, token: str | None = None, force: bool = False) -> Switch:
    """`raee db activate NAME VERSION`: point the build's alias at version VERSION (a number or a collection)."""
    from milvus.versions import activate

    _require_lite_file(db_uri)
    return activate(db_uri, name, int(version) if version.isdigit() else version, token=token, force=force)


def db_rollback(name: str, db_uri: str, *, token: str | None = None) -> Switch:
    """`raee db rollback NAME`: point the build's alias back at the version it pointed at before the last switch."""
    from milvus.versions import rollback

    _require_lite_file(db_uri)
    return rollback(db_uri, name, token=token)


def db_drop(name: str, db_uri: str, *, version: int | None = None, token: str | None = None) -> list[str]:
    """`raee db drop NAME [--version N]`: delete a build (alias, versions, blobs) or one inactive version."""
    from milvus.admin import drop_build

    _require_lite_file(db_uri)
    return drop_build(db_uri, name, version=version, token=token)


def db_export(name: str, path: str, db_uri: str, *, token: str | None = None) -> Transfer:
    """`raee db export NAME FILE.parquet`: the records, metadata, calibration and exit head in one parquet file."""
    from milvus.transfer import export_build

    _require_lite_file(db_uri)
    return export_build(db_uri, name, path, token=token)


def db_import(path: str, db_uri: str, *, name: str | None = None, token: str | None = None) -> Transfer:
    """`raee db import FILE.parquet --db URI`: a new version of the build in the file (or `name`), switched in."""
    from milvus.transfer import import_build

    if not os.path.isfile(path):
        raise ExitDatabaseError(f"no file {path} to import (write one with raee db export NAME {path})")
    return import_build(path, db_uri, name=name, token=token)


def _require_lite_file(db_uri: str) -> None:
    if is_lite_uri(db_uri) and not os.path.exists(db_uri):
        raise ExitDatabaseError(f"no exit database at {db_uri}; check --db (raee db list --db URI shows what it "
                                "holds)")
