"""A disk cache of recorded forward passes (`Backbone.layer_pass`) for evaluation: the backbone pass is the slow part.

Entries are per example, so runs over different subsets of a split (a 1,000-example database, then the full
split) share every example they have in common. One folder per (backbone name, depth, max_length, task name,
task digest, split) holds chunks of `.npy` arrays: the examples' file positions, a 64-bit hash of each
example's text (and pair), its label distributions (N, L+1, C) float32 and its answer-position states
(N, L+1, H) float32, kept at full precision so trained heads read exactly what inference will compute. An
example is served from the cache only when its position and text hash both match; the rest are computed and
written as new chunks of at most CHUNK_ROWS examples (each file renamed into place, the index file last, so a
killed run never leaves a half-written chunk and the next run resumes after its last finished chunk). No pickle.
Inference never uses it. The key does not hash the weights: after changing a model's files in place under the
same name, delete `<cache_dir>/forward/`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from raee.backbones import Backbone, LayerPass
from raee.tasks import Dataset

_INDEX, _HASH, _PROBS, _STATES = "idx", "hash", "probs", "states"
CHUNK_ROWS = 1024  # examples per written chunk: what a killed multi-hour pass loses at most


def text_hashes(dataset: Dataset) -> np.ndarray:
    """(N,) uint64: blake2b-64 of each example's text, and its pair when the task has pairs."""
    pairs = dataset.pairs or ("",) * len(dataset)
    return np.array([int.from_bytes(hashlib.blake2b(f"{t}\x00{p}".encode("utf-8", "surrogatepass"),
                                                    digest_size=8).digest(), "little")
                     for t, p in zip(dataset.texts, pairs, strict=True)], dtype=np.uint64)


def cache_folder(root: str | os.PathLike[str], backbone: Backbone, dataset: Dataset) -> Path:
    """<root>/forward/<task>-<split>-<16 hex of the setup>: one folder per backbone, task spec and split."""
    task = dataset.task
    parts = [backbone.name, str(backbone.n_layers), str(backbone.max_length), task.name,
             task.digest(backbone.style), dataset.split]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return Path(root) / "forward" / f"{task.name}-{dataset.split}-{digest}"


def cached_layer_pass(backbone: Backbone, dataset: Dataset, cache_dir: str | os.PathLike[str] | None, *,
                      quiet: bool = False, chunk_rows: int = CHUNK_ROWS) -> LayerPass:
    """backbone.layer_pass over the dataset's examples, reading what cache_dir has and adding what it lacks."""
    if cache_dir is None:
        return backbone.layer_pass(dataset.texts, dataset.task, pairs=dataset.pairs, show_progress=not quiet)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    folder = cache_folder(cache_dir, backbone, dataset)
    hashes = text_hashes(dataset)
    found = _lookup(folder, dataset.example_idx, hashes)  # (N,) chunk number or -1, row in that chunk
    missing = np.flatnonzero(found[0] < 0)
    fresh = None
    if len(missing):
        computed = []
        with tqdm(total=len(missing), desc=f"{dataset.task.name} {dataset.split} forward", unit="ex",
                  disable=quiet) as bar:
            for start in range(0, len(missing), chunk_rows):
                rows = missing[start : start + chunk_rows]
                part = dataset.take(rows)
                computed.append(backbone.layer_pass(part.texts, part.task, pairs=part.pairs))
                _write_chunk(folder, part.example_idx, hashes[rows], computed[-1])
                bar.update(len(rows))
        fresh = LayerPass(np.concatenate([c.probs for c in computed]), np.concatenate([c.states for c in computed]))
    return _gather(folder, found, missing, fresh, len(dataset))


def _chunks(folder: Path) -> list[str]:
    return sorted(p.name[: -len(f"-{_INDEX}.npy")] for p in folder.glob(f"*-{_INDEX}.npy")) if folder.is_dir() else []


def _lookup(folder: Path, example_idx: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(chunk number per example or -1, row within it, chunk names); later chunks win on repeats."""
    names = _chunks(folder)
    chunk_of = np.full(len(example_idx), -1, dtype=np.int64)
    row_of = np.zeros(len(example_idx), dtype=np.int64)
    for number, name in enumerate(names):
        idx = np.load(folder / f"{name}-{_INDEX}.npy")
        stored_hash = np.load(folder / f"{name}-{_HASH}.npy")
        if not len(idx):
            continue
        order = np.argsort(idx, kind="stable")
        rows = order[np.minimum(np.searchsorted(idx[order], example_idx), len(idx) - 1)]
        hit = (idx[rows] == example_idx) & (stored_hash[rows] == hashes)
        chunk_of[hit], row_of[hit] = number, rows[hit]
    return chunk_of, row_of, names


def _gather(folder: Path, found: tuple[np.ndarray, np.ndarray, list[str]], missing: np.ndarray,
            fresh: LayerPass | None, n: int) -> LayerPass:
    chunk_of, row_of, names = found
    probs = states = None
    for number in np.unique(chunk_of[chunk_of >= 0]):
        name = names[number]
        chunk_probs = np.load(folder / f"{name}-{_PROBS}.npy", mmap_mode="r")
        chunk_states = np.load(folder / f"{name}-{_STATES}.npy", mmap_mode="r")
        if probs is None:
            probs = np.zeros((n, *chunk_probs.shape[1:]), dtype=np.float32)
            states = np.zeros((n, *chunk_states.shape[1:]), dtype=np.float32)
        mine = np.flatnonzero(chunk_of == number)
        rows = row_of[mine]
        probs[mine], states[mine] = chunk_probs[rows], chunk_states[rows]
    if fresh is not None:
        if probs is None:
            probs = np.zeros((n, *fresh.probs.shape[1:]), dtype=np.float32)
            states = np.zeros((n, *fresh.states.shape[1:]), dtype=np.float32)
        probs[missing], states[missing] = fresh.probs, fresh.states
    if probs is None:  # an empty dataset
        return LayerPass(np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), np.float32))
    return LayerPass(probs, states)


def _write_chunk(folder: Path, example_idx: np.ndarray, hashes: np.ndarray, computed: LayerPass) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex[:12]
    arrays = {_HASH: hashes, _PROBS: computed.probs.astype(np.float32),
              _STATES: computed.states.astype(np.float32), _INDEX: np.asarray(example_idx, dtype=np.int64)}
    for kind, array in arrays.items():  # the index last: a chunk exists once its index does
        tmp = folder / f".{name}-{kind}.tmp.npy"
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, folder / f"{name}-{kind}.npy")
