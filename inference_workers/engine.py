"""Paper Algorithm 3.2 for a batch: keys -> one exit-database search -> exit layers -> truncated forwards.

`BatchEngine.run(requests)` is plain Python that returns one response per request, in order, so it can
be tested without Ray and wrapped by the Ray Serve deployment unchanged. Requests are grouped by task;
each task's group costs one key-encoder call, ONE `ExitDB.search` and one `Backbone.predict` in which
every text runs exactly the blocks up to its own exit layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from milvus.exit_db import ExitDB
from raee.backbones import Backbone
from raee.exit_policy import Policy, answer_probs
from raee.keys import KeyEncoder, check_texts
from raee.records import Neighbours
from raee.tasks import Task, get_task

DbLookup = Mapping[str, ExitDB] | Callable[[Task], ExitDB]


@dataclass(frozen=True)
class Request:
    """Classify `text` for `task` (a task name); explain=True also returns the retrieved neighbours."""

    text: str
    task: str
    explain: bool = False


@dataclass(frozen=True)
class Neighbour:
    """One retrieved training example, as the paper's Tables 9-10 show them."""

    id: int
    text: str
    label: int
    label_word: str
    distance: float  # smaller is closer (squared L2 for the default metric)
    exit_probs: tuple[float, ...]  # (L+1,) gold-label prob per layer, 0 where that layer was wrong


@dataclass(frozen=True)
class Response:
    """The early-exit prediction for one request."""

    label: int
    label_word: str
    exit_layer: int  # blocks run for this text (0 = embeddings only, L = the full model)
    probs: tuple[float, ...]  # (C,) softmax over the label words at the exit layer
    neighbours: tuple[Neighbour, ...] | None = None  # closest first; only when explain=True
    truncated: bool = False  # the text was cut to the model's context before classifying


@dataclass(frozen=True)
class StageTimes:
    """Wall-clock seconds per stage of one `run`, summed over its task groups."""

    encode_s: float = 0.0
    search_s: float = 0.0
    policy_s: float = 0.0
    predict_s: float = 0.0
    total_s: float = 0.0
    n_requests: int = 0
    n_searches: int = 0

    def __add__(self, other: StageTimes) -> StageTimes:
        return StageTimes(*(a + b for a, b in zip(_astuple(self), _astuple(other), strict=True)))


def _astuple(t: StageTimes) -> tuple[float | int, ...]:
    return (t.encode_s, t.search_s, t.policy_s, t.predict_s, t.total_s, t.n_requests, t.n_searches)


@dataclass
class BatchEngine:
    """RAEE inference over one backbone, one key encoder and an exit database per task.

    dbs: {task name: ExitDB} or a callable task -> ExitDB (it is called once per task group of every run,
    so it should cache). Each database's metadata must match the backbone, encoder and task: checked on
    first use, because a mismatch would silently vote with another setup's exit sets.
    """

    backbone: Backbone
    encoder: KeyEncoder
    dbs: DbLookup
    policy: Policy
    last_times: StageTimes = field(default_factory=StageTimes, init=False)
    _checked: set[tuple[int, str]] = field(default_factory=set, init=False, repr=False)

    def run(self, requests: Sequence[Request]) -> list[Response]:
        """responses[i] answers requests[i]; one search per task present in the batch. Times -> last_times."""
        responses, self.last_times = self.run_timed(requests)
        return responses

    def run_timed(self, requests: Sequence[Request]) -> tuple[list[Response], StageTimes]:
        """run(), also returning the stage times of this call (for callers sharing the engine)."""
        start = time.perf_counter()
        check_texts([r.text for r in requests])  # every text, before any work: the error names the index
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(get_task(request.task).name, []).append(i)
        responses: list[Response | None] = [None] * len(requests)
        times = StageTimes()
        for task_name, idx in groups.items():
            group = [requests[i] for i in idx]
            answers, group_times = self._run_task(get_task(task_name), group)
            for i, answer in zip(idx, answers, strict=True):
                responses[i] = answer
            times += group_times
        times = StageTimes(times.encode_s, times.search_s, times.policy_s, times.predict_s,
                           time.perf_counter() - start, len(requests), times.n_searches)
        return [r for r in responses if r is not None], times

    def classify(self, texts: Sequence[str], task: Task | str, *, explain: bool = False) -> list[Response]:
        """run() for texts of one task."""
        check_texts(texts)
        name = task.name if isinstance(task, Task) else task
        return self.run([Request(text, name, explain) for text in texts])

    def _run_task(self, task: Task, requests: list[Request]) -> tuple[list[Response], StageTimes]:
        texts = [r.text for r in requests]
        explain = any(r.explain for r in requests)
        db = self._db(task)
        t0 = time.perf_counter()
        keys = self.encoder.encode(texts, task)  # (B, D)
        t1 = time.perf_counter()
        neighbours = db.search(keys, k=self.policy.k, with_texts=explain)  # ONE round trip for the batch
        t2 = time.perf_counter()
        exit_layers = self.policy.exit_layers(neighbours)  # (B,)
        t3 = time.perf_counter()
        preds = self.backbone.predict(texts, task, exit_layers)
        t4 = time.perf_counter()
        probs = answer_probs(self.policy, preds.probs, preds.exit_layers, neighbours, db.calibration)  # (B, C)
        labels = probs.argmax(axis=1)
        t5 = time.perf_counter()
        words = task.label_words(self.backbone.style)
        responses = [
            Response(
                label=int(labels[b]),
                label_word=words[int(labels[b])],
                exit_layer=int(preds.exit_layers[b]),
                probs=tuple(float(p) for p in probs[b]),
                neighbours=_neighbours(neighbours, b, words) if request.explain else None,
                truncated=bool(preds.truncated[b]),
            )
            for b, request in enumerate(requests)
        ]
        policy_s = (t3 - t2) + (t5 - t4)  # exit choice and answer
        return responses, StageTimes(t1 - t0, t2 - t1, policy_s, t4 - t3, time.perf_counter() - t0, len(requests), 1)

    def _db(self, task: Task) -> ExitDB:
        db = self.dbs[task.name] if isinstance(self.dbs, Mapping) else self.dbs(task)
        if (id(db), task.name) not in self._checked:
            self._check_meta(db, task)
            self._checked.add((id(db), task.name))
        return db

    def _check_meta(self, db: ExitDB, task: Task) -> None:
        meta = db.meta
        expected = {
            "backbone": self.backbone.name, "encoder": self.encoder.name, "task": task.name,
            "template_hash": task.template_hash(self.backbone.style), "n_layers": self.backbone.n_layers,
            "dim": self.encoder.dim,
        }
        diffs = [f"{k}: database {getattr(meta, k)!r} != engine {v!r}" for k, v in expected.items()
                 if getattr(meta, k) != v]
        if meta.calibrated != self.policy.calibrated:
            want = "a calibrated" if self.policy.calibrated else "an uncalibrated"
            diffs.append(f"the policy needs {want} database (build it with the same --policy)")
        if diffs:
            raise ValueError(f"exit database {db.collection!r} was built for another setup ({'; '.join(diffs)}); "
                             "rebuild it with this backbone/encoder or point the engine at the matching one")


def _neighbours(found: Neighbours, row: int, words: tuple[str, ...]) -> tuple[Neighbour, ...]:
    """Row `row` of a search result as Neighbour objects, padding (id -1) left out."""
    texts = found.texts[row] if found.texts is not None else ("",) * found.ids.shape[1]
    return tuple(
        Neighbour(
            id=int(found.ids[row, j]),
            text=texts[j],
            label=int(found.labels[row, j]),
            label_word=words[int(found.labels[row, j])],
            distance=float(found.distances[row, j]),
            exit_probs=tuple(float(p) for p in found.exit_probs[row, j]),
        )
        for j in np.flatnonzero(found.valid[row])
    )
