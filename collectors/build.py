"""Paper Algorithm 3.1, in process: keys and exit sets for a labelled split, written to the exit database.

For each training example the backbone runs once with every layer recorded (`Backbone.layer_probs`); the
exit set is the gold-label probability at each layer that predicts the gold label, 0 at the others.
Records carry deterministic ids (task, split, example index) and are upserted, so a repeated or resumed
build rewrites the same rows instead of adding new ones.

Collections: one per (setup, variant). `collection_name(meta)` (milvus/) names the setup; the variant
adds `_only_correct` (Table 2 "RAEE w/o") and `_frac<f>_seed<s>` (Table 4 subsets), so the full database
and its ablations live side by side in one Milvus file and never overwrite each other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from milvus.exit_db import ExitDB, ExitDBMeta, Metric, collection_name
from milvus.index import IndexConfig
from raee.backbones import Backbone
from raee.calibration import Calibration, fit_calibration
from raee.keys import KeyEncoder
from raee.records import ExitRecords, record_ids
from raee.tasks import Dataset, Task, load_split


@dataclass(frozen=True)
class BuildSummary:
    """What one build wrote, for the CLI summary and the evaluation report."""

    collection: str
    n_examples: int  # examples processed (after the fraction subset)
    n_records: int  # records written (fewer than n_examples with only_correct)
    n_in_db: int  # collection count after the build (== n_records on a fresh collection)
    share_no_correct_layer: float  # share of processed examples no layer classifies correctly
    full_model_accuracy: float  # share of processed examples the last layer classifies correctly
    seconds: float
    examples_per_s: float


def exit_sets(layer_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """e[n, l] = p[n, l, y_n] if argmax_c p[n, l, c] = y_n else 0 (Alg. 3.1's exit set, as probabilities).

    layer_probs (N, L+1, C), labels (N,) -> (N, L+1) float32. argmax ties go to the lower class."""
    labels = np.asarray(labels, dtype=np.int64)
    gold = np.take_along_axis(layer_probs, labels[:, None, None], axis=2)[..., 0]  # (N, L+1)
    correct = layer_probs.argmax(axis=2) == labels[:, None]  # (N, L+1)
    return np.where(correct, gold, 0.0).astype(np.float32)


def exit_db_meta(backbone: Backbone, encoder: KeyEncoder, task: Task, *, metric: Metric = "L2",
                 calibrated: bool = False) -> ExitDBMeta:
    """The setup a collection is valid for: records from any other backbone, encoder, template or calibration
    must not mix."""
    return ExitDBMeta(
        backbone=backbone.name,
        encoder=encoder.name,
        task=task.name,
        template_hash=task.template_hash(backbone.style),
        n_layers=backbone.n_layers,
        dim=encoder.dim,
        metric=metric,
        calibrated=calibrated,
    )


def variant_collection(meta: ExitDBMeta, *, only_correct: bool = False, fraction: float = 1.0, seed: int = 0) -> str:
    """collection_name(meta) plus the ablation variant: "_only_correct", "_frac0p2_seed0" (Milvus-legal)."""
    _check_fraction(fraction)
    name = collection_name(meta)
    if only_correct:
        name += "_only_correct"
    if fraction < 1.0:
        name += f"_frac{fraction:g}_seed{seed}".replace(".", "p").replace("-", "m")
    return name


def build_exit_records(
    backbone: Backbone,
    encoder: KeyEncoder,
    task: Task,
    dataset: Dataset,
    *,
    split: str | None = None,
    example_idx: np.ndarray | None = None,
    batch_size: int = 64,
    only_correct: bool = False,
    calibration: Calibration | None = None,
    show_progress: bool = False,
) -> Iterator[ExitRecords]:
    """Yield one ExitRecords per batch of `batch_size` examples of `dataset`, in dataset order.

    ids come from (task, split, example_idx[i]); split defaults to dataset.split and example_idx to
    0..N-1 (pass the original indices when `dataset` is a subset). With only_correct, examples the last
    layer gets wrong are dropped (a batch may then hold fewer records, or none). With a calibration, exit
    sets and stored layer distributions are calibrated (see raee/calibration.py)."""
    for records, _ in _batches(backbone, encoder, task, dataset, split=split, example_idx=example_idx,
                               batch_size=batch_size, only_correct=only_correct, calibration=calibration,
                               show_progress=show_progress):
        yield records


def _batches(
    backbone: Backbone,
    encoder: KeyEncoder,
    task: Task,
    dataset: Dataset,
    *,
    split: str | None,
    example_idx: np.ndarray | None,
    batch_size: int,
    only_correct: bool,
    show_progress: bool,
    calibration: Calibration | None = None,
    known_probs: np.ndarray | None = None,
) -> Iterator[tuple[ExitRecords, np.ndarray]]:
    """(kept records, exit sets of every example in the batch): the summary counts all processed examples."""
    split = split or dataset.split
    idx_all = np.arange(len(dataset)) if example_idx is None else np.asarray(example_idx, dtype=np.int64)
    if len(idx_all) != len(dataset):
        raise ValueError(f"example_idx has {len(idx_all)} entries for {len(dataset)} examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = tqdm(total=len(dataset), disable=not show_progress, desc=f"build {task.name}", unit="ex")
    with bar:
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            texts = list(dataset.texts[start:stop])
            labels = np.asarray(dataset.labels[start:stop], dtype=np.int64)
            layer_probs = _layer_probs(backbone, task, texts, known_probs, start)  # (B, L+1, C)
            records, probs = exit_records(task, split, idx_all[start:stop], texts, labels, layer_probs, encoder,
                                          calibration=calibration, only_correct=only_correct)
            bar.update(stop - start)
            yield records, probs


def exit_records(task: Task, split: str, example_idx: np.ndarray, texts: list[str], labels: np.ndarray,
                 layer_probs: np.ndarray, encoder: KeyEncoder | np.ndarray, *, calibration: Calibration | None = None,
                 only_correct: bool = False) -> tuple[ExitRecords, np.ndarray]:
    """Records for examples whose layer distributions are known, and the exit sets of all of them.

    layer_probs (N, L+1, C) raw; encoder: a KeyEncoder, or the (N, D) keys when already encoded. With a
    calibration, exit sets and stored distributions are calibrated. only_correct keeps the examples whose
    last layer is right (after calibration, if any)."""
    if calibration is not None:
        layer_probs = calibration.apply(layer_probs).astype(np.float32)
    probs = exit_sets(layer_probs, labels)  # (N, L+1)
    kept = np.flatnonzero(probs[:, -1] > 0) if only_correct else np.arange(len(texts))
    kept_texts = [texts[i] for i in kept]
    if isinstance(encoder, np.ndarray):
        vectors = encoder[kept]
    else:
        vectors = (encoder.encode(kept_texts, task) if kept_texts
                   else np.zeros((0, encoder.dim), dtype=np.float32))  # (b, D)
    records = ExitRecords(
        ids=record_ids(task.name, split, np.asarray(example_idx)[kept]),
        vectors=vectors,
        exit_probs=probs[kept],
        labels=labels[kept],
        texts=tuple(kept_texts),
        layer_probs=np.asarray(layer_probs, dtype=np.float32)[kept],
    )
    return records, probs


def _layer_probs(backbone: Backbone, task: Task, texts: list[str], known: np.ndarray | None,
                 start: int) -> np.ndarray:
    """backbone.layer_probs(texts), taking rows start.. of `known` (already computed) where it has them."""
    have = known[start : start + len(texts)] if known is not None else np.zeros((0,))
    rest = texts[len(have):]
    if not rest:
        return have
    computed = backbone.layer_probs(rest, task)
    return np.concatenate([have, computed]) if len(have) else computed


def build_database(
    backbone: Backbone,
    encoder: KeyEncoder,
    task: Task,
    *,
    db_uri: str = "./raee.db",
    fraction: float = 1.0,
    seed: int = 0,
    only_correct: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    dataset: Dataset | None = None,
    collection: str | None = None,
    metric: Metric = "L2",
    token: str | None = None,
    index: IndexConfig | None = None,
    batch_size: int = 64,
    calibrate: bool = False,
    calibration_examples: int = 2000,
    show_progress: bool = True,
) -> BuildSummary:
    """Build (or complete, or refresh) the exit database of `task` from its training split.

    dataset defaults to the task's train split under data_dir; fraction < 1 keeps a seeded random subset
    of it (same seed, same subset, same record ids). collection defaults to `variant_collection(...)`.
    Rows are upserted batch by batch, so an interrupted build can simply be run again. index: see
    milvus/index.py (None: FLAT for a new collection, as built for an existing one).

    calibrate: fit a contextual calibration on the first `calibration_examples` of a seeded shuffle of the
    (training) examples, store it with the collection and write calibrated exit sets; their forward pass
    is reused for their records, so calibrating costs no extra pass. An existing calibrated collection keeps
    the calibration it was built with, so a resumed build stays consistent."""
    dataset = dataset if dataset is not None else load_split(task, "train", data_dir)
    if calibration_examples < 1:
        raise ValueError(f"calibration_examples must be >= 1, got {calibration_examples}")
    rows = build_rows(dataset, fraction, seed, calibrate=calibrate)
    example_idx = dataset.example_idx[rows]  # file positions: record ids stay stable across subsets
    subset = Dataset(task, dataset.split, tuple(dataset.texts[i] for i in rows), dataset.labels[rows], example_idx)
    meta = exit_db_meta(backbone, encoder, task, metric=metric, calibrated=calibrate)
    collection = collection or variant_collection(meta, only_correct=only_correct, fraction=fraction, seed=seed)
    start = time.perf_counter()
    n_records = n_no_correct = n_full_correct = 0
    known = calibration = None
    if calibrate:
        known = backbone.layer_probs(subset.texts[:calibration_examples], task, show_progress=show_progress)
        calibration = fit_calibration(known)
    with ExitDB(db_uri, collection=collection, meta=meta, token=token, index=index, calibration=calibration) as db:
        for records, probs in _batches(backbone, encoder, task, subset, split=dataset.split, example_idx=example_idx,
                                       batch_size=batch_size, only_correct=only_correct,
                                       show_progress=show_progress, calibration=db.calibration, known_probs=known):
            n_records += db.upsert(records)
            n_no_correct += int((probs == 0).all(axis=1).sum())
            n_full_correct += int((probs[:, -1] > 0).sum())
        db.flush()
        n_in_db = db.count()
    seconds = time.perf_counter() - start
    n = len(subset)
    return BuildSummary(
        collection=collection,
        n_examples=n,
        n_records=n_records,
        n_in_db=n_in_db,
        share_no_correct_layer=n_no_correct / n if n else 0.0,
        full_model_accuracy=n_full_correct / n if n else 0.0,
        seconds=seconds,
        examples_per_s=n / seconds if seconds > 0 else 0.0,
    )


def build_rows(dataset: Dataset, fraction: float, seed: int, *, calibrate: bool) -> np.ndarray:
    """The rows of `dataset` a build processes, in processing order: subset_indices(...), and for a calibrated
    build a seeded shuffle of them, so that the first rows (the calibration sample) are a fair sample (the
    LM-BFF files are grouped by label). Calibrating on any split but train is refused."""
    _check_fraction(fraction)
    if calibrate and dataset.split != "train":
        raise ValueError(f"calibration is fitted on the training split only, got the {dataset.split!r} split")
    rows = subset_indices(len(dataset), fraction, seed)
    return rows[np.random.default_rng(seed).permutation(len(rows))] if calibrate else rows


def subset_indices(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random round(fraction * n) subset of range(n) (at least 1 when n > 0)."""
    _check_fraction(fraction)
    if fraction >= 1.0:
        return np.arange(n)
    size = max(1, round(fraction * n)) if n else 0
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
