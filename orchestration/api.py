"""The Python entry point, as short as the CLI: `raee.build(...)` once, then `clf = raee.load(...)` and `clf(texts)`.

    import raee
    raee.build("sst2", db="./raee.db", fraction=0.1)      # or a spec path: raee.build("reviews.toml", ...)
    clf = raee.load("sst2", db="./raee.db")               # finds the task's build in the database
    clf(["a gem", "a dull mess"])
    # [{"label": "positive", "score": 0.91, "exit_layer": 7, "probs": {...}, "truncated": False}, ...]
    clf(["a gem"], policy="raee", neighbours=True)        # the paper's policy, with the neighbours that chose

The shape follows Hugging Face pipelines: one dict per text, `label` and `score` first. A Classifier holds
the models and the open exit database (with Milvus Lite, this process owns the file until `close()`).
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours)
import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict

from collectors.build import BuildOptions, BuildSummary
from inference_workers.engine import BatchEngine
from orchestration.pipelines import BuildSelector, open_engine
from orchestration.pipelines import build as run_build
from raee.exit_policy import DEFAULT_POLICY
from raee.models import DEFAULT_BACKBONE, DEFAULT_ENCODER
from raee.spec import ModelSpec
from raee.tasks import Task, get_task

# A script that never calls close() must still end quietly. Milvus Lite answers through a gRPC server in this
# process whose thread pool refuses work once the interpreter starts shutting down, so the open classifiers are
# closed in threading's exit hooks, which run (last registered, first) before the thread pools stop.
_OPEN: weakref.WeakSet[Classifier] = weakref.WeakSet()


def _close_open_classifiers() -> None:
    for classifier in list(_OPEN):
        classifier.close()


threading._register_atexit(_close_open_classifiers)


class Classifier:
    """A task's RAEE classifier over its exit database: call it with texts (and pairs, for pair tasks)."""

    def __init__(self, engine: BatchEngine, task: Task, closer) -> None:
        self.engine = engine
        self.task = task
        self._closer = closer
        _OPEN.add(self)

    def __call__(self, texts: str | Sequence[str], *, pairs: str | Sequence[str] | None = None,
                 policy: str | None = None, neighbours: bool = False) -> list[dict]:
        """One dict per text: label, score (the answer's probability), exit_layer, probs by label word, truncated,
        policy, and neighbours (id, text, label, distance) when asked for."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        pairs = [pairs] if isinstance(pairs, str) else (list(pairs) if pairs is not None else None)
        responses = self.engine.classify(texts, self.task, pairs=pairs, explain=neighbours, policy=policy)
        words = self.task.label_words(self.engine.backbone.style)
        out = []
        for r in responses:
            item = {"label": r.label_word, "score": r.probs[r.label], "exit_layer": r.exit_layer,
                    "probs": dict(zip(words, r.probs, strict=True)), "truncated": r.truncated, "policy": r.policy}
            if neighbours:
                item["neighbours"] = [asdict(n) for n in r.neighbours or ()]
            out.append(item)
        return out

    @property
    def collection(self) -> str:
        return self.engine.served[self.task.name].db.collection

    def close(self) -> None:
        """Release the exit database (a Milvus Lite file can then be opened by another process); idempotent."""
        closer, self._closer = self._closer, None
        if closer is not None:
            _OPEN.discard(self)
            closer.__exit__(None, None, None)

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Classifier(task={self.task.name!r}, collection={self.collection!r})"


def _spec(model: str | ModelSpec, encoder: str, cache_dir: str | None) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec(model, encoder, cache_dir=cache_dir)


def load(task: str | Task, *, db: str = "./raee.db", model: str | ModelSpec = DEFAULT_BACKBONE,
         encoder: str = DEFAULT_ENCODER,
         policy: str = DEFAULT_POLICY, token: str | None = None, collection: str | None = None,
         head: str | None = None, cache_dir: str | None = None, **knobs: float) -> Classifier:
    """A Classifier for a built-in task name or a spec path over its build in `db` (see `raee explain --help`).

    model: a backbone name, folder or hub id (with `encoder`), or a whole raee.spec.ModelSpec. collection / head
    pick a build when db holds several for the task; knobs: the policies' parameters (k, tau, beta, slack)."""
    one = get_task(task)
    context = open_engine([one], model=_spec(model, encoder, cache_dir), db_uri=db, token=token,
                          selector=BuildSelector(collection=collection, head=head), policy=policy, knobs=knobs)
    engine = context.__enter__()
    return Classifier(engine, one, context)


def build(task: str | Task, *, db: str = "./raee.db", model: str | ModelSpec = DEFAULT_BACKBONE,
          encoder: str = DEFAULT_ENCODER,
          head: str = "lm", fraction: float = 1.0, seed: int = 0, only_correct: bool = False,
          token: str | None = None, data_dir: str | None = None, cache_dir: str | None = None,
          quiet: bool = False) -> BuildSummary:
    """Build the task's exit database from its training split (`raee build`); returns what it wrote."""
    options = BuildOptions(fraction=fraction, seed=seed, only_correct=only_correct, head=head)
    return run_build([get_task(task)], model=_spec(model, encoder, cache_dir), db_uri=db,
                     options=options, token=token, data_dir=data_dir, quiet=quiet)[0]
