"""Paper Algorithm 3.2 for a batch: keys -> one exit-database search -> exit layers -> truncated forwards.

`BatchEngine.run(requests)` is plain Python that returns one response per request, in order, so it can
be tested without Ray and wrapped by the Ray Serve deployment unchanged. Requests are grouped by task and
exit policy; each group costs one key-encoder call, ONE `ExitDB.search` and one `Backbone.predict` in which
every text runs exactly the blocks up to its own exit layer.

The engine serves `Task` objects it was given (never looked up by name), each with its exit database. One
database serves every policy: the paper's `raee` reads the stored (raw) exit sets, the calibrated policies
(`raee-cal`, `fused`) the same records seen through the database's stored calibration.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from milvus.exit_db import ExitDB, setup_meta
from raee.backbones import Backbone, Predictions
from raee.exit_policy import Policy, answer_probs, calibrated_view
from raee.heads import ExitHead
from raee.keys import KeyEncoder, check_texts
from raee.records import Neighbours
from raee.tasks import Task, join_pairs

FULL_MODEL = "full"  # the request policy that runs every layer and retrieves nothing (the baseline)


class EngineSetupError(ValueError):
    """An exit database that does not fit the engine's backbone, key encoder, task spec or head."""


@dataclass(frozen=True)
class Request:
    """Classify `text` (with `text_pair` for pair tasks) for the served task named `task`.

    explain=True also returns the retrieved neighbours; policy names an exit policy (None: the engine's
    default; "full": the full model). neighbour_texts=False leaves the neighbours' training texts out of the
    explanation (and out of the database read): a caller may classify without being allowed to read the data."""

    text: str
    task: str
    explain: bool = False
    text_pair: str | None = None
    policy: str | None = None
    neighbour_texts: bool = True


@dataclass(frozen=True)
class Neighbour:
    """One retrieved training example, as the paper's Tables 9-10 show them."""

    id: int
    text: str | None  # None where the caller may not see training texts (Request.neighbour_texts)
    label: int
    label_word: str
    distance: float  # smaller is closer (squared L2 for the default metric)
    exit_probs: tuple[float, ...]  # (L+1,) gold-label prob per layer under the policy's view, 0 where wrong


@dataclass(frozen=True)
class Response:
    """The early-exit prediction for one request."""

    label: int
    label_word: str
    exit_layer: int  # blocks run for this text (0 = embeddings only, L = the full model)
    probs: tuple[float, ...]  # (C,) the distribution the policy answered with
    neighbours: tuple[Neighbour, ...] | None = None  # closest first; only when explain=True
    truncated: bool = False  # the text was cut to the model's context before classifying
    policy: str = ""  # the policy that answered


@dataclass(frozen=True)
class ServedTask:
    """A task the engine answers for, its exit database and the exit head the database was built with."""

    task: Task
    db: ExitDB
    head: ExitHead | None = None  # None: the LM head's label words (head "lm")

    @classmethod
    def of(cls, task: Task, db: ExitDB) -> ServedTask:
        """The task over db, with the head stored in db (the off-ramps of a `--head offramp` build)."""
        return cls(task, db, stored_head(db))


def stored_head(db: ExitDB) -> ExitHead | None:
    """The exit head a database was built with: None for the LM head, else its stored off-ramps (checked)."""
    if db.meta.head == "lm":
        return None
    if not db.meta.head.startswith("offramp:"):
        raise EngineSetupError(f"exit database {db.collection!r} was built with head {db.meta.head!r}, which this "
                               "raee cannot read")
    from raee.offramps import OffRamps

    data = db.get_blob("head")
    if data is None:
        raise EngineSetupError(f"exit database {db.collection!r} names head {db.meta.head!r} but stores no "
                               "off-ramps; rebuild it with `raee build --head offramp`")
    head = OffRamps.from_bytes(data)
    if head.name != db.meta.head:
        raise EngineSetupError(f"exit database {db.collection!r}: stored off-ramps are {head.name!r}, its metadata "
                               f"names {db.meta.head!r}; rebuild it")
    return head


@dataclass(frozen=True)
class StageTimes:
    """Wall-clock seconds per stage of one `run`, summed over its groups."""

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
    """RAEE inference over one backbone and one key encoder for the tasks in `served` (name -> ServedTask).

    policies: the exit policies a request may name (name -> Policy); `default_policy` answers requests that
    name none. Each database's metadata must match the backbone, encoder, task spec and head: checked when
    the engine is made, because a mismatch would silently vote with another setup's exit sets.
    """

    backbone: Backbone
    encoder: KeyEncoder
    served: Mapping[str, ServedTask]
    policies: Mapping[str, Policy]
    default_policy: str
    last_times: StageTimes = field(default_factory=StageTimes, init=False)

    def __post_init__(self) -> None:
        if self.default_policy not in self.policies:
            raise ValueError(f"default policy {self.default_policy!r} is not one of {sorted(self.policies)}")
        for name, entry in self.served.items():
            if name != entry.task.name:
                raise ValueError(f"served task {entry.task.name!r} is registered under another name {name!r}")
            self._check_meta(entry)

    @classmethod
    def single(cls, backbone: Backbone, encoder: KeyEncoder, task: Task, db: ExitDB, policy: Policy, *,
               head: ExitHead | None = None, name: str = "policy") -> BatchEngine:
        """An engine for one task and one policy (evaluation, tests)."""
        return cls(backbone, encoder, {task.name: ServedTask(task, db, head)}, {name: policy}, name)

    @property
    def tasks(self) -> dict[str, Task]:
        return {name: entry.task for name, entry in self.served.items()}

    def run(self, requests: Sequence[Request]) -> list[Response]:
        """responses[i] answers requests[i]; one search per (task, policy) in the batch. Times -> last_times."""
        responses, self.last_times = self.run_timed(requests)
        return responses

    def run_timed(self, requests: Sequence[Request]) -> tuple[list[Response], StageTimes]:
        """run(), also returning the stage times of this call (for callers sharing the engine)."""
        start = time.perf_counter()
        self.check(requests)  # every request, before any work: the error names the index
        groups: dict[tuple[str, str], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.task, request.policy or self.default_policy), []).append(i)
        responses: list[Response | None] = [None] * len(requests)
        times = StageTimes()
        for (task_name, policy), idx in groups.items():
            answers, group_times = self._run_group(self.served[task_name], policy, [requests[i] for i in idx])
            for i, answer in zip(idx, answers, strict=True):
                responses[i] = answer
            times += group_times
        times = StageTimes(times.encode_s, times.search_s, times.policy_s, times.predict_s,
                           time.perf_counter() - start, len(requests), times.n_searches)
        return [r for r in responses if r is not None], times

    def check(self, requests: Sequence[Request]) -> None:
        """ValueError naming the first request that cannot be served: unknown task or policy, bad text or pair."""
        check_texts([r.text for r in requests])
        for i, request in enumerate(requests):
            entry = self.served.get(request.task)
            if entry is None:
                raise ValueError(f"request {i}: task {request.task!r} is not served here; served: "
                                 f"{', '.join(self.served)}")
            policy = request.policy or self.default_policy
            if policy != FULL_MODEL and policy not in self.policies:
                raise ValueError(f"request {i}: unknown exit policy {policy!r}; known: "
                                 f"{', '.join([*sorted(self.policies), FULL_MODEL])}")
            reason = self.policy_unavailable(request.task, policy)
            if reason is not None:
                raise ValueError(f"request {i}: {reason}")
            if entry.task.has_pairs != (request.text_pair is not None):
                need = "needs a text_pair" if entry.task.has_pairs else "takes no text_pair"
                raise ValueError(f"request {i}: task {request.task!r} {need}")
            if request.text_pair is not None:
                check_texts([request.text_pair])

    def policy_unavailable(self, task_name: str, policy: str) -> str | None:
        """Why a known policy cannot serve a served task here, or None: a policy that decides the exit during the
        forward needs one read-out row per example (Backbone.rule_exit_unsupported)."""
        if not getattr(self.policies.get(policy), "dynamic", False):
            return None
        entry = self.served[task_name]
        reason = self.backbone.rule_exit_unsupported(entry.task, entry.head)
        return None if reason is None else (f"policy {policy!r} is not available for task {task_name!r}: {reason}; "
                                            "the other policies are")

    def classify(self, texts: Sequence[str], task: Task | str, *, pairs: Sequence[str] | None = None,
                 explain: bool = False, policy: str | None = None) -> list[Response]:
        """run() for texts (and their pairs) of one served task."""
        check_texts(texts)
        name = task.name if isinstance(task, Task) else task
        pairs = pairs if pairs is not None else [None] * len(texts)
        return self.run([Request(text, name, explain, pair, policy) for text, pair in zip(texts, pairs, strict=True)])

    def _run_group(self, entry: ServedTask, policy_name: str,
                   requests: list[Request]) -> tuple[list[Response], StageTimes]:
        task, db = entry.task, entry.db
        texts = [r.text for r in requests]
        pairs = [r.text_pair for r in requests] if task.has_pairs else None
        words = task.label_words(self.backbone.style)
        t0 = time.perf_counter()
        if policy_name == FULL_MODEL:  # the baseline on the same replica: every block, no retrieval
            preds = self.backbone.predict(texts, task, self.backbone.n_layers, pairs=pairs, head=entry.head)
            elapsed = time.perf_counter() - t0
            return [Response(int(preds.labels[b]), words[int(preds.labels[b])], int(preds.exit_layers[b]),
                             tuple(float(p) for p in preds.probs[b]), truncated=bool(preds.truncated[b]),
                             policy=FULL_MODEL) for b in range(len(texts))], \
                StageTimes(predict_s=elapsed, total_s=elapsed, n_requests=len(texts))
        policy = self.policies[policy_name]
        with_texts = any(r.explain and r.neighbour_texts for r in requests)
        keys = self.encoder.encode(join_pairs(texts, pairs), task)  # (B, D)
        t1 = time.perf_counter()
        found = db.search(keys, k=policy.k, with_texts=with_texts)  # ONE round trip for the group
        t2 = time.perf_counter()
        if getattr(policy, "dynamic", False):  # the exit is decided during the forward, layer by layer
            view = found
            t3 = t2
            preds = self._predict_until(policy, entry, db, texts, pairs, found)
        else:
            view = calibrated_view(found, db.calibration) if policy.calibrated else found
            exit_layers = policy.exit_layers(view)  # (B,)
            t3 = time.perf_counter()
            preds = self.backbone.predict(texts, task, exit_layers, pairs=pairs, head=entry.head)
        t4 = time.perf_counter()
        probs = answer_probs(policy, preds.probs, preds.exit_layers, view,
                             db.calibration if policy.calibrated else None)  # (B, C)
        labels = probs.argmax(axis=1)
        t5 = time.perf_counter()
        responses = [
            Response(
                label=int(labels[b]),
                label_word=words[int(labels[b])],
                exit_layer=int(preds.exit_layers[b]),
                probs=tuple(float(p) for p in probs[b]),
                neighbours=_neighbours(view, b, words, with_text=request.neighbour_texts) if request.explain else None,
                truncated=bool(preds.truncated[b]),
                policy=policy_name,
            )
            for b, request in enumerate(requests)
        ]
        policy_s = (t3 - t2) + (t5 - t4)  # exit choice and answer
        return responses, StageTimes(t1 - t0, t2 - t1, policy_s, t4 - t3, time.perf_counter() - t0, len(requests), 1)

    def _predict_until(self, policy: Policy, entry: ServedTask, db: ExitDB, texts: list[str],
                       pairs: list[str] | None, found: Neighbours) -> Predictions:
        """A dynamic policy's truncated forward: at each layer the rows whose (calibrated) answer, fused with their
        neighbours' vote, is confident leave; the rest go on."""
        calibration = db.calibration if policy.calibrated else None
        if policy.calibrated and calibration is None:
            raise EngineSetupError(f"exit database {db.collection!r} stores no calibration, which the confident "
                                   "policy needs; rebuild it with `raee build`")
        prior = policy.prior(found, entry.task.n_classes)  # (B, C)

        def stop(layer: int, rows: np.ndarray, probs: np.ndarray) -> np.ndarray:
            if calibration is not None:
                probs = calibration.apply_at(probs, np.full(len(rows), layer))
            return policy.stops(probs, prior[rows])

        return self.backbone.predict_until(texts, entry.task, stop, pairs=pairs, head=entry.head,
                                           min_layer=policy.min_layer)

    def _check_meta(self, entry: ServedTask) -> None:
        db = entry.db
        expected = setup_meta(self.backbone, self.encoder, entry.task, head=db.meta.head, metric=db.meta.metric)
        diffs = db.meta.differences(expected)
        head_name = entry.head.name if entry.head is not None else "lm"
        if head_name != db.meta.head:
            diffs.append(f"head: database {db.meta.head!r} != engine {head_name!r}")
        if diffs:
            hint = (" (the task spec changed since the build: rebuild it)"
                    if db.meta.task_digest != expected.task_digest else "")
            raise EngineSetupError(f"exit database {db.collection!r} was built for another setup ({'; '.join(diffs)})"
                             f"{hint}; rebuild it with this backbone/encoder/task or point the engine at the "
                             "matching one")
        reason = self.policy_unavailable(entry.task.name, self.default_policy)
        if reason is not None:
            raise EngineSetupError(f"the default {reason}; pick another with --policy")
        if self.policies[self.default_policy].calibrated and db.calibration is None:
            raise EngineSetupError(f"exit database {db.collection!r} stores no calibration, which the policy "
                             f"{self.default_policy!r} needs; rebuild it with `raee build` (or use --policy raee)")


def _neighbours(found: Neighbours, row: int, words: tuple[str, ...], *,
                with_text: bool = True) -> tuple[Neighbour, ...]:
    """Row `row` of a search result as Neighbour objects, padding (id -1) left out; texts only with_text."""
    texts = found.texts[row] if found.texts is not None and with_text else (None,) * found.ids.shape[1]
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
