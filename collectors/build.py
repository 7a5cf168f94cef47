"""Paper Algorithm 3.1, in process: keys and exit records for a labelled split, written to the exit database.

For each training example the backbone runs once with every layer recorded (`Backbone.layer_pass`); a
record keeps the example's key, every layer's label distribution (raw) and its exit set (the gold-label
probability at each layer that predicts the gold label, 0 at the others). A per-layer calibration is fitted
on a seeded sample of the same examples (their pass is reused) and stored with the collection, so one build
serves every exit policy: the paper's `raee` reads the raw exit sets, `raee-cal` and `fused` the same records
seen through the calibration. Records carry deterministic ids (task, split, example index) and are upserted,
so a repeated or resumed build rewrites the same rows instead of adding new ones.

Which examples a build holds (a seeded fraction, only the ones the full model gets right) is its
`BuildVariant`, recorded with the collection: later commands find the build without repeating the options.

Versions: a build writes a version of its collection and switches the collection's alias to it only after the
exact-count check (milvus/versions.py), so queries never see a half-built database; a re-run over the same
training data rewrites the version it built (idempotent), other data makes a new version. Examples added to
the served version since (`add_examples`) are carried into the new one.

Live growth: `add_examples` records labelled examples added to a built database with the same per-batch code,
the database's stored exit head and raw distributions (its stored calibration applies to them as to the
build's records), under content ids (milvus.added.added_ids), and returns once readers can see them.

Exit heads: `head="lm"` reads each layer through the LM head's label words (the paper). `head="offramp"` fits
one linear off-ramp per layer on the answer-position states of a seeded sample of the training examples
(raee/offramps.py); the sample's records get cross-fitted distributions (from off-ramps that never saw the
example), the rest of the split is read through the off-ramps fitted on the whole sample, which never saw it
either. The off-ramps are stored with the collection and named in its metadata, so the database is only
queried with the head it was built with.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from milvus.added import AddedExamples, added_ids, carry_added, count_added, wait_visible
from milvus.exit_db import (
    BuildVariant,
    ExitDB,
    ExitDBMeta,
    MetadataMismatchError,
    Metric,
    collection_name,
    setup_meta,
)
from milvus.index import IndexChoice, IndexConfig, choose_index
from milvus.versions import BuildTarget, begin_version, finish_version
from raee.backbones import Backbone
from raee.calibration import Calibration, fit_calibration
from raee.exit_policy import exit_sets
from raee.heads import ExitHead
from raee.keys import KeyEncoder
from raee.records import ExitRecords, record_ids
from raee.tasks import Dataset, Task, load_split


@dataclass(frozen=True)
class BuildOptions:
    """How a build selects, records and stores its examples; declared once and passed whole.

    fraction/seed/only_correct: the BuildVariant (which training examples). head: "lm" (label words through
    the LM head) or "offramp" (trained per-layer off-ramps, fitted on the first offramp_examples of the build
    order, cross-fitted over offramp_folds). metric/index: how Milvus compares keys and indexes them (an
    IndexConfig; "auto" FLAT while the build is small, else HNSW, or "flat" / "hnsw" / "ivf_flat" with the tuned
    parameters: milvus.index.choose_index; None: as built for an existing collection, FLAT for a new one).
    calibration_examples: the seeded sample the calibration is fitted on. collection: a name instead of the
    derived one."""

    fraction: float = 1.0
    seed: int = 0
    only_correct: bool = False
    head: Literal["lm", "offramp"] = "lm"
    offramp_examples: int = 10000
    offramp_folds: int = 5
    offramp_l2: float = 1.0
    metric: Metric = "L2"
    index: IndexConfig | IndexChoice | None = "auto"
    batch_size: int = 32
    calibration_examples: int = 2000
    collection: str | None = None

    def __post_init__(self) -> None:
        self.variant  # noqa: B018 - validates the fraction
        if self.batch_size < 1 or self.calibration_examples < 1:
            raise ValueError(f"batch_size and calibration_examples must be >= 1, got {self.batch_size}, "
                             f"{self.calibration_examples}")
        if self.head not in ("lm", "offramp"):
            raise ValueError(f"head must be 'lm' or 'offramp', got {self.head!r}")
        if self.offramp_examples < 2 * self.offramp_folds or self.offramp_folds < 2:
            raise ValueError(f"offramp_folds must be >= 2 and offramp_examples >= 2 * offramp_folds, got "
                             f"{self.offramp_folds}, {self.offramp_examples}")

    @property
    def variant(self) -> BuildVariant:
        return BuildVariant(self.fraction, self.seed, self.only_correct)


@dataclass(frozen=True)
class BuildSummary:
    """What one build wrote, for the CLI summary and the evaluation report."""

    task: str
    collection: str
    variant: str  # BuildVariant.describe()
    n_examples: int  # examples processed (after the fraction subset)
    n_records: int  # records written (fewer than n_examples with only_correct)
    n_in_db: int  # collection count after the build (== n_records on a fresh collection)
    share_no_correct_layer: float  # share of processed examples no layer classifies correctly
    full_model_accuracy: float  # share of processed examples the last layer classifies correctly
    seconds: float
    examples_per_s: float
    version: str = ""  # the collection written: a version of `collection` (its alias), or `collection` itself
    index: str = ""  # the collection's index and its parameters (IndexConfig.describe), e.g. chosen by "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def build_rows(dataset: Dataset, variant: BuildVariant) -> np.ndarray:
    """The rows of `dataset` a build processes, in processing order: a seeded subset (subset_indices), shuffled
    with the same seed so that the first rows - the calibration sample - are a fair sample (the LM-BFF files
    are grouped by label). Calibrating on any split but train is refused."""
    if dataset.split != "train":
        raise ValueError(f"exit databases and their calibration come from the training split only, got the "
                         f"{dataset.split!r} split")
    rows = subset_indices(len(dataset), variant.fraction, variant.seed)
    return rows[np.random.default_rng(variant.seed).permutation(len(rows))]


def subset_indices(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random round(fraction * n) subset of range(n) (at least 1 when n > 0)."""
    BuildVariant(fraction, seed)  # validates
    if fraction >= 1.0:
        return np.arange(n)
    size = max(1, round(fraction * n)) if n else 0
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def exit_records(task: Task, split: str, data: Dataset, layer_probs: np.ndarray, keys: np.ndarray, *,
                 only_correct: bool = False) -> tuple[ExitRecords, np.ndarray]:
    """(records kept, exit sets of every example) for examples whose layer distributions and keys are known.

    layer_probs (N, L+1, C) raw, keys (N, D). only_correct keeps the examples whose last layer is right."""
    probs = exit_sets(layer_probs, data.labels)  # (N, L+1)
    kept = np.flatnonzero(probs[:, -1] > 0) if only_correct else np.arange(len(data))
    inputs = data.inputs
    records = ExitRecords(
        ids=record_ids(task.name, split, data.example_idx[kept]),
        vectors=np.asarray(keys, dtype=np.float32)[kept],
        exit_probs=probs[kept],
        labels=np.asarray(data.labels, dtype=np.int64)[kept],
        texts=tuple(inputs[i] for i in kept),
        layer_probs=np.asarray(layer_probs, dtype=np.float32)[kept],
    )
    return records, probs


def record_batches(backbone: Backbone, encoder: KeyEncoder, data: Dataset, *, batch_size: int,
                   only_correct: bool = False, known_probs: np.ndarray | None = None, head: ExitHead | None = None,
                   show_progress: bool = False) -> Iterator[tuple[ExitRecords, np.ndarray]]:
    """(records kept, exit sets of the batch) for each batch of `data`, in order (collect_batch on each).

    known_probs: layer distributions of data's first rows, already computed (calibration or off-ramp sample).
    head: read every layer through this exit head (off-ramps) instead of the LM head's label words."""
    bar = tqdm(total=len(data), disable=not show_progress, desc=f"build {data.task.name}", unit="ex")
    with bar:
        for start in range(0, len(data), batch_size):
            part = data.take(np.arange(start, min(start + batch_size, len(data))))
            have = known_probs[start : start + len(part)] if known_probs is not None else None
            bar.update(len(part))
            yield collect_batch(backbone, encoder, part, head=head, known_probs=have, only_correct=only_correct)


def collect_batch(backbone: Backbone, encoder: KeyEncoder, part: Dataset, *, head: ExitHead | None = None,
                  known_probs: np.ndarray | None = None, known: np.ndarray | None = None,
                  only_correct: bool = False) -> tuple[ExitRecords, np.ndarray]:
    """(records kept, exit sets of every example) of one batch: the per-batch collector every engine runs.

    known_probs (k, L+1, C): layer distributions already computed (a calibration or off-ramp sample) for the
    rows where `known` (b,) is True, or for the first k rows when `known` is None; the rest run the backbone."""
    if known is None:
        known = np.arange(len(part)) < (0 if known_probs is None else len(known_probs))
    rest = np.flatnonzero(~known)
    layer_probs = None
    if len(rest):
        computed = _layer_probs(backbone, part.take(rest), head)  # (r, L+1, C)
        layer_probs = np.empty((len(part), *computed.shape[1:]), dtype=computed.dtype)
        layer_probs[rest] = computed
    if known.any():
        have = np.asarray(known_probs, dtype=np.float32)
        layer_probs = np.empty((len(part), *have.shape[1:]), np.float32) if layer_probs is None else layer_probs
        layer_probs[known] = have
    keys = encoder.encode(part.inputs, part.task)  # (b, D)
    return exit_records(part.task, part.split, part, layer_probs, keys, only_correct=only_correct)


def _layer_probs(backbone: Backbone, data: Dataset, head: ExitHead | None) -> np.ndarray:
    if head is None:
        return backbone.layer_probs(data.texts, data.task, pairs=data.pairs)
    states = backbone.layer_pass(data.texts, data.task, pairs=data.pairs).states  # (b, L+1, H)
    return np.stack([head.probs(layer, states[:, layer]) for layer in range(states.shape[1])], axis=1)


def fit_head(backbone: Backbone, data: Dataset, options: BuildOptions, *,
             show_progress: bool = False) -> tuple[ExitHead, np.ndarray]:
    """(off-ramps fitted on the first offramp_examples of `data`, those examples' cross-fitted distributions)."""
    from raee.offramps import cross_fit

    sample = data.take(np.arange(min(options.offramp_examples, len(data))))
    states = backbone.layer_pass(sample.texts, data.task, pairs=sample.pairs, show_progress=show_progress).states
    fitted = cross_fit(states, sample.labels, data.task.n_classes, n_folds=options.offramp_folds,
                       seed=options.seed, l2=options.offramp_l2)
    return fitted.final, fitted.layer_probs.astype(np.float32)


def prepare(backbone: Backbone, encoder: KeyEncoder, task: Task, dataset: Dataset, options: BuildOptions,
            head: ExitHead | None = None) -> tuple[Dataset, ExitDBMeta, str]:
    """(examples in processing order, the setup's meta, the collection name): what every build engine shares."""
    rows = build_rows(dataset, options.variant)
    meta = setup_meta(backbone, encoder, task, metric=options.metric, head=head.name if head is not None else "lm")
    return dataset.take(rows), meta, options.collection or collection_name(meta, options.variant)


def fit_build_calibration(backbone: Backbone, data: Dataset, options: BuildOptions, *, known: np.ndarray | None = None,
                          show_progress: bool = False) -> tuple[Calibration, np.ndarray]:
    """(calibration, the sample's layer distributions): fitted on the first calibration_examples of `data`
    (their distributions taken from `known` where it covers them)."""
    n = min(options.calibration_examples, len(data))
    if known is not None and len(known) >= n:
        return fit_calibration(known[:n]), known
    sample = data.take(np.arange(n))
    probs = backbone.layer_probs(sample.texts, data.task, pairs=sample.pairs, show_progress=show_progress)
    return fit_calibration(probs), probs


def build_database(
    backbone: Backbone,
    encoder: KeyEncoder,
    task: Task,
    *,
    db_uri: str = "./raee.db",
    options: BuildOptions | None = None,
    token: str | None = None,
    dataset: Dataset | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> BuildSummary:
    """Build (or complete, or refresh) the exit database of `task` from its training split, in this process.

    dataset defaults to the task's train split under data_dir. Rows are upserted batch by batch, so an
    interrupted build can simply be run again (same variant, same ids, same records)."""
    options = options or BuildOptions()
    dataset = dataset if dataset is not None else load_split(task, "train", data_dir)
    if not len(dataset):
        raise ValueError(f"task {task.name} has no training examples to build from")
    start = time.perf_counter()
    head = known = None
    if options.head == "offramp":
        ordered = dataset.take(build_rows(dataset, options.variant))
        head, known = fit_head(backbone, ordered, options, show_progress=show_progress)
    data, meta, name = prepare(backbone, encoder, task, dataset, options, head)
    target = begin_version(db_uri, name, meta, options.variant, data_digest=data_digest(data), token=token)
    collection = target.collection
    calibration, known = fit_build_calibration(backbone, data, options, known=known, show_progress=show_progress)
    n_records = n_no_correct = n_full_correct = 0
    with ExitDB(db_uri, collection=collection, meta=meta, variant=options.variant, token=token,
                index=choose_index(options.index, len(data)), calibration=calibration,
                properties=target.properties) as db:
        if head is not None:
            db.put_blob("head", head.to_bytes())
        for records, probs in record_batches(backbone, encoder, data, batch_size=options.batch_size,
                                             only_correct=options.only_correct, known_probs=known, head=head,
                                             show_progress=show_progress):
            n_records += db.upsert(records)
            n_no_correct += int((probs == 0).all(axis=1).sum())
            n_full_correct += int((probs[:, -1] > 0).sum())
        n_added = carry_over(db_uri, target, db, token=token)
        db.flush()
        n_in_db = db.count()
        index = db.index.describe()
    finish_version(db_uri, target, expected=n_records + n_added, counted=n_in_db, token=token)
    summary = summarize(task, name, options.variant, len(data), n_records, n_in_db, n_no_correct, n_full_correct,
                        time.perf_counter() - start)
    return replace(summary, version=collection, index=index)


def data_digest(data: Dataset) -> str:
    """DataDigest of the examples a build processes, taken in file order (their processing order follows from
    the variant's seed, which the version records beside it)."""
    digest = DataDigest()
    digest.update(data.take(np.argsort(data.example_idx, kind="stable")))
    return digest.hexdigest()


class DataDigest:
    """sha256 over examples in file order, one record each (text, pair, label, file position), fed batch by batch.

    Stored with each version: a re-run over the same examples rewrites that version instead of making a new
    one. Incremental, so a streaming build digests its split without holding it."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, data: Dataset) -> None:
        pairs = data.pairs if data.pairs is not None else ("",) * len(data)
        rows = (f"{t}\x1f{p}\x1f{y}\x1f{i}\x1e" for t, p, y, i in
                zip(data.texts, pairs, data.labels.tolist(), data.example_idx.tolist(), strict=True))
        self._sha.update("".join(rows).encode("utf-8", "surrogatepass"))

    def hexdigest(self) -> str:
        return self._sha.hexdigest()[:16]


def carry_over(db_uri: str, target: BuildTarget, db: ExitDB, *, token: str | None = None) -> int:
    """Added examples `db` holds after a build wrote its training records: carried from the version the alias
    pointed at into a new version, or already there when the build rewrote that version in place."""
    if not target.versioned:
        return 0
    if target.collection == target.active:
        return count_added(db_uri, db.collection, token=token)
    return carry_added(db_uri, target.active, db, token=token)


def add_examples(backbone: Backbone, encoder: KeyEncoder, db: ExitDB, data: Dataset, *, head: ExitHead | None = None,
                 batch_size: int = 32, token: str | None = None, visible_timeout_s: float = 60.0) -> AddedExamples:
    """Record labelled examples into the built database `db` (live growth) and return once readers see them.

    Each example gets the record a build would compute (same backbone, key encoder and exit head, raw layer
    distributions) under its content id, so adding the same text and label again changes nothing. A build
    made with --only-correct keeps only the examples the full model gets right, as the build did.
    token: the Milvus token `db` writes with, for the visibility check."""
    task = data.task
    expected = setup_meta(backbone, encoder, task, head=db.meta.head, metric=db.meta.metric)
    if expected != db.meta:
        raise MetadataMismatchError(db.collection, db.meta, expected)
    head_name = head.name if head is not None else "lm"
    if head_name != db.meta.head:
        raise ValueError(f"exit database {db.collection!r} was built with head {db.meta.head!r}, given {head_name!r}; "
                         "pass the stored head (inference_workers.engine.stored_head)")
    ids = added_ids(task.name, data.texts, data.pairs, [task.label_values[i] for i in data.labels])  # (N,)
    _, first = np.unique(ids, return_index=True)
    first = np.sort(first)  # each distinct example once, in the order given
    stored = set(db.get(ids[first]).ids.tolist())
    todo = np.array([i for i in first if int(ids[i]) not in stored], dtype=np.int64)
    written: list[int] = []
    offset = 0
    for records, probs in record_batches(backbone, encoder, data.take(todo), batch_size=batch_size, head=head):
        batch_ids = ids[todo[offset : offset + len(records)]]  # (b,) the content ids, for record_ids' row ids
        offset += len(records)
        keep = probs[:, -1] > 0 if db.variant.only_correct else np.ones(len(records), dtype=bool)
        db.upsert(_select(replace(records, ids=batch_ids), keep))
        written += batch_ids[keep].tolist()
    visible = wait_visible(db.uri, db.collection, np.asarray(written, np.int64), token=token,
                           timeout_s=visible_timeout_s)
    return AddedExamples(task.name, db.collection, tuple(int(i) for i in ids), len(written), len(first) - len(todo),
                         len(todo) - len(written), visible)


def _select(records: ExitRecords, keep: np.ndarray) -> ExitRecords:
    rows = np.flatnonzero(keep)
    return ExitRecords(ids=records.ids[rows], vectors=records.vectors[rows], exit_probs=records.exit_probs[rows],
                       labels=records.labels[rows], texts=tuple(records.texts[i] for i in rows),
                       layer_probs=None if records.layer_probs is None else records.layer_probs[rows])


def summarize(task: Task, collection: str, variant: BuildVariant, n: int, n_records: int, n_in_db: int,
              n_no_correct: int, n_full_correct: int, seconds: float) -> BuildSummary:
    return BuildSummary(
        task=task.name, collection=collection, variant=variant.describe(), n_examples=n, n_records=n_records,
        n_in_db=n_in_db, share_no_correct_layer=n_no_correct / n if n else 0.0,
        full_model_accuracy=n_full_correct / n if n else 0.0, seconds=seconds,
        examples_per_s=n / seconds if seconds > 0 else 0.0)
