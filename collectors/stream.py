"""A task's training split as a stream: what the driver learns in two passes, and a Ray Data source of its rows.

A streaming build never holds the split. The driver reads it twice with the spec's own reader
(`raee.tasks.iter_split`, pyarrow record batches), keeping only integers and a sample:
1. count the examples (positions 0..n-1 among the non-empty rows, as `load_split` numbers them);
2. digest the build's examples in file order (`DataDigest`) and keep the rows of the calibration / off-ramp
   sample, the first rows of the build order (`build_rows`), exactly the rows the in-process build samples.

`SplitSource` is a Ray Data datasource over the same reader: one read task streams the file in blocks of
`block_rows` rows with their file position (`example_idx`, record ids) and dataset position (`pos`, the
sample lookup), leaving out rows outside the variant's subset and rows whose record is stored already.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from collectors.build import DataDigest, build_rows
from milvus.exit_db import BuildVariant
from raee.records import record_ids
from raee.tasks import Dataset, Task, concat, iter_split


@dataclass(frozen=True)
class SplitScan:
    """What the driver knows of a split before collecting it: no texts but the sample's."""

    n_examples: int  # examples the build processes (after the variant's subset)
    n_split: int  # non-empty rows of the split
    digest: str  # DataDigest of the build's examples
    subset: np.ndarray | None  # (n_examples,) sorted split positions of a fraction < 1 build; None: all
    sample: Dataset  # the first rows of the build order (calibration / off-ramp sample), in that order
    sample_pos: np.ndarray  # (len(sample),) their split positions


def scan_split(task: Task, variant: BuildVariant, *, n_sample: int, data_dir: str | os.PathLike[str] | None = None,
               block_rows: int = 65536) -> SplitScan:
    """Two streaming passes over the train split: count, then digest and sample (see the module docstring)."""
    n_split = sum(len(part) for part in iter_split(task, "train", data_dir, batch_rows=block_rows))
    order = build_rows(_Positions(task, n_split), variant)  # (n_examples,) split positions, build order
    subset = None if len(order) == n_split else np.sort(order)
    sample_pos = order[:n_sample]
    digest, parts, start = DataDigest(), [], 0
    for part in iter_split(task, "train", data_dir, batch_rows=block_rows):
        pos = np.arange(start, start + len(part))
        start += len(part)
        digest.update(part if subset is None else part.take(np.flatnonzero(in_sorted(pos, subset))))
        hit = np.flatnonzero(np.isin(pos, sample_pos))
        if len(hit):
            parts.append((pos[hit], part.take(hit)))
    found = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64)
    rows = concat([d for _, d in parts]) if parts else _empty(task)
    where = np.searchsorted(found, sample_pos)  # found is sorted: positions come in file order
    return SplitScan(len(order), n_split, digest.hexdigest(), subset, rows.take(where), sample_pos)


class SplitSource(Datasource):
    """The build's examples as Ray Data blocks {text, pair?, label, example_idx, pos}, read by one streaming task.

    subset: sorted split positions to keep (None: all); stored: sorted record ids to leave out (resume)."""

    def __init__(self, task: Task, *, data_dir: str | None, subset: np.ndarray | None, stored: np.ndarray,
                 block_rows: int = 4096) -> None:
        super().__init__()
        self.task, self.data_dir, self.block_rows = task, data_dir, block_rows
        self.subset, self.stored = subset, stored

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object = None) -> list[ReadTask]:
        path = str(self.task.path("train", self.data_dir))
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,))
        return [ReadTask(self._blocks, meta)]

    def _blocks(self) -> Iterator[pa.Table]:
        start = 0
        for part in iter_split(self.task, "train", self.data_dir, batch_rows=self.block_rows):
            pos = np.arange(start, start + len(part))
            start += len(part)
            keep = np.ones(len(part), bool) if self.subset is None else in_sorted(pos, self.subset)
            keep &= ~in_sorted(record_ids(self.task.name, "train", part.example_idx), self.stored)
            rows = np.flatnonzero(keep)
            if not len(rows):
                continue
            columns = {"text": [part.texts[i] for i in rows], "label": part.labels[rows],
                       "example_idx": part.example_idx[rows], "pos": pos[rows]}
            if part.pairs is not None:
                columns["pair"] = [part.pairs[i] for i in rows]
            yield pa.table(columns)


def batch_dataset(task: Task, batch: dict[str, np.ndarray]) -> Dataset:
    """A SplitSource batch (numpy format) as the Dataset the per-batch collector takes."""
    pairs = tuple(str(p) for p in batch["pair"]) if "pair" in batch else None
    return Dataset(task, "train", tuple(str(t) for t in batch["text"]), np.asarray(batch["label"], np.int64),
                   np.asarray(batch["example_idx"], np.int64), pairs)


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """(N,) bool: values[i] in sorted_set, by binary search (no Python loop, no hash set of a million ids)."""
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _empty(task: Task) -> Dataset:
    return Dataset(task, "train", (), np.zeros(0, np.int64), np.zeros(0, np.int64), () if task.has_pairs else None)


@dataclass(frozen=True)
class _Positions:
    """Stands in for a Dataset of n train rows where only the length and split matter (build_rows)."""

    task: Task
    n: int
    split: str = "train"

    def __len__(self) -> int:
        return self.n
